//! The key-broker client: `auth`, `attest` with evidence bound to the challenge and to an
//! ephemeral P-256 key, then `resource`, decrypted with that key. Used by the init's `kbs`
//! key source and by the tests; the caller supplies the evidence for the binding.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::http::{read_message, write_message, HttpError, Message};
use crate::protocol::{
    self as kbs, Attestation, Challenge, Jwe, Jwk, Request, RuntimeData, TeeEvidence,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the key broker at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key broker exchange failed at {step}")]
    Http {
        step: &'static str,
        #[source]
        source: HttpError,
    },
    #[error("the key broker refused {step} (HTTP {status}): {detail}")]
    Refused {
        step: &'static str,
        status: u16,
        detail: String,
    },
    #[error("unexpected answer to {step}: {detail}")]
    Protocol { step: &'static str, detail: String },
    #[error("cannot produce the evidence: {0}")]
    Evidence(String),
    #[error(transparent)]
    Kbs(#[from] kbs::KbsError),
    #[error("TLS with the key broker at {address} failed")]
    Tls {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the broker is and how it is trusted.
#[derive(Clone)]
pub struct Endpoint {
    /// host:port.
    pub address: String,
    /// TLS trusting only the pinned CA or key; `None` = plain HTTP (the secret is still
    /// encrypted to the node's ephemeral key, but the host sees the exchange).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    pub fn plain(address: &str) -> Endpoint {
        Endpoint {
            address: address.to_string(),
            tls: None,
        }
    }

    /// The host part of the address, for the certificate's name.
    fn host(&self) -> &str {
        let host = self
            .address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn connect(endpoint: &Endpoint) -> Result<Box<dyn Stream>, ClientError> {
    let address = &endpoint.address;
    let stream = TcpStream::connect(address).map_err(|source| ClientError::Connect {
        address: address.clone(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Some(config) = &endpoint.tls else {
        return Ok(Box::new(stream));
    };
    let tls_error = |detail: String| ClientError::Tls {
        address: address.clone(),
        source: std::io::Error::other(detail),
    };
    let name = rustls::pki_types::ServerName::try_from(endpoint.host().to_string())
        .map_err(|e| tls_error(format!("{:?} is not a server name: {e}", endpoint.host())))?;
    let connection = rustls::ClientConnection::new(config.clone(), name)
        .map_err(|e| tls_error(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    // The handshake now, so that a refused certificate is reported as such.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|source| ClientError::Tls {
                address: address.clone(),
                source,
            })?;
    }
    Ok(Box::new(tls))
}

fn exchange(
    endpoint: &Endpoint,
    step: &'static str,
    start: &str,
    cookie: Option<&str>,
    body: &[u8],
) -> Result<Message, ClientError> {
    let address = endpoint.address.as_str();
    let mut stream = connect(endpoint)?;
    let cookie_header = cookie.map(|c| format!("kbs-session-id={c}"));
    let mut headers = vec![("Host", address), ("Content-Type", "application/json")];
    if let Some(c) = &cookie_header {
        headers.push(("Cookie", c.as_str()));
    }
    let http = |source| ClientError::Http { step, source };
    write_message(&mut stream, start, &headers, body).map_err(http)?;
    let answer = read_message(&mut stream).map_err(http)?;
    let status: u16 = answer
        .start
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol {
            step,
            detail: format!("status line {:?}", answer.start),
        })?;
    if status != 200 {
        let detail = serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("detail")?.as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).into_owned());
        return Err(ClientError::Refused {
            step,
            status,
            detail,
        });
    }
    Ok(answer)
}

/// Fetches `resource` (`<repository>/<type>/<tag>`) from the broker at `address` (host:port),
/// proving the node with `evidence(report_data)`.
pub fn get_resource(
    endpoint: &Endpoint,
    tee: &str,
    resource: &str,
    evidence: &mut dyn FnMut(&[u8; 64]) -> Result<Value, String>,
) -> Result<Vec<u8>, ClientError> {
    let mut all = get_resources(endpoint, tee, &[resource], evidence)?;
    Ok(std::mem::take(&mut *all[0]))
}

/// Fetches several resources in one attested session, in order. Each is wiped when dropped,
/// so that those already decrypted are not left in freed memory when a later one fails.
pub fn get_resources(
    endpoint: &Endpoint,
    tee: &str,
    resources: &[&str],
    evidence: &mut dyn FnMut(&[u8; 64]) -> Result<Value, String>,
) -> Result<Vec<Zeroizing<Vec<u8>>>, ClientError> {
    get_resources_with(endpoint, tee, resources, None, &mut |binding, _| {
        evidence(binding)
    })
}

/// Evidence for a binding, given the challenge's extra-params.
pub type EvidenceFor<'a> = dyn FnMut(&[u8; 64], &Value) -> Result<Value, String> + 'a;

/// The same, with members added to `auth`'s extra-params (a vTPM's endorsement:
/// `cvm_formats::evidence::TpmEndorsement`, as `{"tpm": …}`) and evidence that also reads the challenge's
/// extra-params (the broker's `tpm-credential`).
pub fn get_resources_with(
    endpoint: &Endpoint,
    tee: &str,
    resources: &[&str],
    auth_extra: Option<serde_json::Map<String, Value>>,
    evidence: &mut EvidenceFor<'_>,
) -> Result<Vec<Zeroizing<Vec<u8>>>, ClientError> {
    let mut extra_params = serde_json::json!({ "supported-hash-algorithms": [kbs::BINDING_HASH] });
    for (name, value) in auth_extra.into_iter().flatten() {
        extra_params[name] = value;
    }
    let request = Request {
        version: kbs::PROTOCOL_VERSION.into(),
        tee: tee.into(),
        extra_params,
    };
    let answer = exchange(
        endpoint,
        "auth",
        "POST /kbs/v0/auth HTTP/1.1",
        None,
        &serde_json::to_vec(&request).expect("serializable"),
    )?;
    let cookie = answer
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .and_then(|c| c.strip_prefix("kbs-session-id="))
        .ok_or(ClientError::Protocol {
            step: "auth",
            detail: "no kbs-session-id cookie".into(),
        })?
        .to_string();
    let challenge: Challenge =
        serde_json::from_slice(&answer.body).map_err(|e| ClientError::Protocol {
            step: "auth",
            detail: e.to_string(),
        })?;
    // Trustee verifies the binding with SHA-384 whatever its challenge says; another selection
    // (a broker that is not Trustee, or someone between) would only yield evidence that fails
    // there for a reason nobody sees, so it is refused here by name.
    let hash = challenge.hash_algorithm();
    if hash != kbs::BINDING_HASH {
        return Err(ClientError::Protocol {
            step: "auth",
            detail: format!(
                "the challenge selects hash {hash:?}: the runtime data is bound with {} only",
                kbs::BINDING_HASH
            ),
        });
    }
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let runtime = RuntimeData {
        nonce: challenge.nonce.clone(),
        tee_pubkey: Jwk::from_public(&secret.public_key()),
    };
    let binding = kbs::report_data(&runtime, "", kbs::BINDING_HASH)?;
    let primary = evidence(&binding, &challenge.extra_params).map_err(ClientError::Evidence)?;
    let attestation = Attestation {
        init_data: None,
        runtime_data: runtime,
        tee_evidence: TeeEvidence {
            primary_evidence: primary,
            additional_evidence: String::new(),
        },
    };
    exchange(
        endpoint,
        "attest",
        "POST /kbs/v0/attest HTTP/1.1",
        Some(&cookie),
        &serde_json::to_vec(&attestation).expect("serializable"),
    )?;
    let mut released = Vec::new();
    for resource in resources {
        let answer = exchange(
            endpoint,
            "resource",
            &format!("GET /kbs/v0/resource/{resource} HTTP/1.1"),
            Some(&cookie),
            &[],
        )?;
        let jwe: Jwe = serde_json::from_slice(&answer.body).map_err(|e| ClientError::Protocol {
            step: "resource",
            detail: format!("{resource}: {e}"),
        })?;
        released.push(Zeroizing::new(kbs::jwe_decrypt(&secret, &jwe)?));
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A broker that answers `auth` with `challenge` (and a session cookie), then closes.
    fn broker_answering(challenge: &'static str) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_message(&mut stream).unwrap();
            write_message(
                &mut stream,
                "HTTP/1.1 200 OK",
                &[("Set-Cookie", "kbs-session-id=s; Path=/kbs")],
                challenge.as_bytes(),
            )
            .unwrap();
        });
        Endpoint::plain(&address)
    }

    /// The same, with the challenge sent in chunks as a proxy in front of Trustee sends it.
    fn chunking_broker_answering(challenge: &'static str) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_message(&mut stream).unwrap();
            let (a, b) = challenge.split_at(challenge.len() / 2);
            let reply = format!(
                "HTTP/1.1 200 OK\r\nSet-Cookie: kbs-session-id=s; Path=/kbs\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
            stream.write_all(reply.as_bytes()).unwrap();
        });
        Endpoint::plain(&address)
    }

    /// Before chunked bodies were read, this challenge read as empty and the attempt failed at
    /// `auth` with a JSON error.
    #[test]
    fn a_chunked_challenge_is_read() {
        let (result, asked) = attempt(&chunking_broker_answering(
            r#"{"nonce":"bm9uY2U=","extra-params":""}"#,
        ));
        assert!(
            matches!(result, Err(ClientError::Evidence(_))),
            "{result:?}"
        );
        assert!(asked.is_some(), "evidence was not asked for");
    }

    /// Evidence is asked for, or not, and the attempt stops there.
    fn attempt(endpoint: &Endpoint) -> (Result<Vec<u8>, ClientError>, Option<[u8; 64]>) {
        let mut asked = None;
        let result = get_resource(endpoint, "snp", "cvm/state-disk/key", &mut |binding| {
            asked = Some(*binding);
            Err("stop here".into())
        });
        (result, asked)
    }

    #[test]
    fn a_challenge_selecting_another_hash_is_refused() {
        for hash in ["sha256", "sha512", "sm3"] {
            let challenge = Box::leak(
                format!(r#"{{"nonce":"bm9uY2U=","extra-params":{{"selected-hash-algorithm":"{hash}"}}}}"#)
                    .into_boxed_str(),
            );
            let (result, asked) = attempt(&broker_answering(challenge));
            assert!(asked.is_none(), "{hash}: evidence was produced");
            match result {
                Err(ClientError::Protocol {
                    step: "auth",
                    detail,
                }) => {
                    assert!(detail.contains(hash), "{detail}")
                }
                other => panic!("{hash}: {other:?}"),
            }
        }
    }

    /// Trustee's challenge for snp, tdx and tpm: `extra-params` is an empty string.
    #[test]
    fn trustees_challenge_binds_sha384() {
        let (result, asked) = attempt(&broker_answering(
            r#"{"nonce":"bm9uY2U=","extra-params":""}"#,
        ));
        assert!(matches!(result, Err(ClientError::Evidence(_))));
        let binding = asked.expect("evidence was asked for");
        assert_eq!(binding[48..], [0u8; 16]);
        assert!(binding[..48].iter().any(|&b| b != 0));
    }
}
