//! Every boot scenario, one module per subject, in one test binary: the test threads are then
//! shared by all scenarios instead of idling at the end of each subject's binary. Run them with
//! `make boot-tests` (which builds the artifacts first); one subject with
//! `cargo test --workspace --test scenarios state::` and one scenario by its full name.
//!
//! libtest starts tests two at a time in the order of their names: the longest scenario (a
//! node running containerd and the kubelet, in `containers`) must not come last, or one thread
//! idles while it runs alone.

mod attestation;
mod boot;
mod containers;
mod devices;
mod join;
mod measured;
mod network;
mod state;
mod upgrade;
mod verity;
