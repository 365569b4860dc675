//! The `[[service]]` sections: what the supervisor runs, and its checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, Invalid};

/// What restarts a service after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whatever the exit status.
    #[default]
    Always,
    /// Restart after a non-zero exit or a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// One supervised process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How long a service gets between SIGTERM and SIGKILL at shutdown.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// The working directory (default `/`).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// A unix socket that accepts connections once the service is ready; without one, a
    /// service is ready once started.
    #[serde(default)]
    pub ready_socket: Option<PathBuf>,
    /// How long the socket may take to accept; then the service counts as failed and its
    /// restart policy applies.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// Services (earlier in the file) that must be ready before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    /// The kernel's OOM-killer bias, -1000 (never) to 1000.
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    /// Resource limits (setrlimit), soft and hard alike.
    #[serde(default)]
    pub limits: Limits,
    /// Controller settings for the service's own cgroup (/sys/fs/cgroup/<name>).
    #[serde(default)]
    pub cgroup: CgroupSettings,
}

fn default_stop_timeout_ms() -> u64 {
    5000
}

fn default_ready_timeout_ms() -> u64 {
    60_000
}

/// A resource limit: a number, or "infinity".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Limit {
    Value(u64),
    Named(Unlimited),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unlimited {
    Infinity,
}

impl Limit {
    /// The value for setrlimit.
    pub fn raw(self) -> u64 {
        match self {
            Limit::Value(v) => v,
            Limit::Named(Unlimited::Infinity) => u64::MAX,
        }
    }
}

/// The limits a container runtime usually needs raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub nofile: Option<Limit>,
    pub nproc: Option<Limit>,
    pub memlock: Option<Limit>,
    pub core: Option<Limit>,
}

/// cgroup v2 settings written into the service's cgroup before it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupSettings {
    /// memory.max in bytes.
    pub memory_max: Option<u64>,
    /// cpu.weight, 1 to 10000.
    pub cpu_weight: Option<u32>,
    /// pids.max.
    pub pids_max: Option<u64>,
}

impl ServiceConfig {
    /// The checks of service `i` of the file, given the services before it (names are
    /// unique, and `after` names only earlier services).
    pub fn validate(&self, i: usize, earlier: &[ServiceConfig]) -> Result<(), Invalid> {
        let field = |f: &str| format!("service[{i}].{f}");
        let service = self;
        let valid_name = !service.name.is_empty()
            && service.name.len() <= 32
            && service
                .name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            // Its output is forwarded as `<name>: <line>`: named cvm-init, a workload would
            // write the init's own marker lines.
            && service.name != crate::logger::PREFIX;
        if !valid_name {
            return Err(invalid(
                field("name"),
                &service.name,
                "1 to 32 characters of [a-z0-9-], other than cvm-init",
            ));
        }
        if earlier.iter().any(|s| s.name == service.name) {
            return Err(invalid(
                field("name"),
                &service.name,
                "a name no other service has",
            ));
        }
        if !service.path.is_absolute() {
            return Err(invalid(
                field("path"),
                &service.path.to_string_lossy(),
                "an absolute path",
            ));
        }
        for (key, value) in &service.env {
            let valid_key = !key.is_empty()
                && !key.as_bytes()[0].is_ascii_digit()
                && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
            if !valid_key {
                return Err(invalid(
                    field("env"),
                    key,
                    "variable names of [A-Za-z0-9_], not starting with a digit",
                ));
            }
            if value.contains('\0') {
                return Err(invalid(
                    format!("{}.{key}", field("env")),
                    value,
                    "a value without NUL",
                ));
            }
        }
        if service.args.iter().any(|a| a.contains('\0')) {
            return Err(invalid(field("args"), "…", "arguments without NUL"));
        }
        if !(100..=300_000).contains(&service.stop_timeout_ms) {
            return Err(invalid(
                field("stop_timeout_ms"),
                &service.stop_timeout_ms.to_string(),
                "100 to 300000",
            ));
        }
        if !(100..=3_600_000).contains(&service.ready_timeout_ms) {
            return Err(invalid(
                field("ready_timeout_ms"),
                &service.ready_timeout_ms.to_string(),
                "100 to 3600000",
            ));
        }
        for (what, path) in [
            ("workdir", service.workdir.as_ref()),
            ("ready_socket", service.ready_socket.as_ref()),
        ] {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                return Err(invalid(
                    field(what),
                    &path.to_string_lossy(),
                    "an absolute path",
                ));
            }
        }
        for dependency in &service.after {
            // Only earlier services: the order of the file is the start order, and there can
            // be no cycle.
            if !earlier.iter().any(|s| &s.name == dependency) {
                return Err(invalid(
                    field("after"),
                    dependency,
                    "the name of a service earlier in the file",
                ));
            }
        }
        if let Some(adj) = service
            .oom_score_adj
            .filter(|a| !(-1000..=1000).contains(a))
        {
            return Err(invalid(
                field("oom_score_adj"),
                &adj.to_string(),
                "-1000 to 1000",
            ));
        }
        if let Some(w) = service
            .cgroup
            .cpu_weight
            .filter(|w| !(1..=10_000).contains(w))
        {
            return Err(invalid(
                field("cgroup.cpu_weight"),
                &w.to_string(),
                "1 to 10000",
            ));
        }
        Ok(())
    }
}
