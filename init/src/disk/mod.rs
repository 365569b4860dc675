//! Disks: partition tables and the discovery of the partitions the init needs.

pub mod crc32;
pub mod crypt;
pub mod discover;
pub mod gpt;
pub mod integrity;
pub mod luks2;
pub mod state;
