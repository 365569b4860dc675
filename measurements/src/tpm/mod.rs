//! A vTPM beside the TEE: its quote (`quote`) and the admission of its attestation key through
//! the endorsement key's certificate (`credential`).

pub mod credential;
pub mod quote;
