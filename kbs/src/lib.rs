//! cvm-kbs: the key-broker protocol a node and a broker speak: the messages, the canonical
//! JSON binding and JWE (`protocol`), HTTP/1.1 (`http`), TLS with a pinned peer (`tls`), and
//! the node's client (`client`).

pub mod client;
pub mod http;
pub mod protocol;
pub mod tls;

pub use cvm_formats::hex;
