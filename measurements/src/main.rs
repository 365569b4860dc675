//! The `cvm-measure` command line.

use std::path::Path;
use std::process::ExitCode;

use cvm_measure::verity::{self, VerityParams};

const USAGE: &str = "\
usage: cvm-measure <command>

commands:
  digest <file>...   print the SHA-256 of each file (the digest workload events carry)
  verity format <data> <hash-out> [--salt HEX] [--uuid UUID]
                [--data-block-size N] [--hash-block-size N] [--json]
                     build the dm-verity hash tree of <data> (format 1, sha256, with the
                     veritysetup superblock) into <hash-out>; print the root hash, or with
                     --json every parameter. Salt and UUID are random unless given.
  --version          print the version
  --help             print this text
";

/// A command-line failure: the message and the exit code (2 for usage, 1 otherwise).
struct Failure(String, u8);

fn usage(message: String) -> Failure {
    Failure(format!("{message}\n{USAGE}"), 2)
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            eprintln!("cvm-measure: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--version"] => {
            println!("cvm-measure {}", cvm_measure::VERSION);
            Ok(())
        }
        ["--help"] => {
            print!("{USAGE}");
            Ok(())
        }
        ["digest", files @ ..] if !files.is_empty() => {
            for file in files {
                let d =
                    cvm_measure::sha256_file(Path::new(file)).map_err(|e| Failure(chain(&e), 1))?;
                println!("{}  {file}", cvm_measure::hex(&d));
            }
            Ok(())
        }
        ["digest"] => Err(usage("digest needs at least one file".into())),
        ["verity", "format", rest @ ..] => verity_format(rest),
        [other, ..] => Err(usage(format!(
            "unknown command {other:?}: expected digest, verity, --version or --help"
        ))),
        [] => Err(usage("a command is needed".into())),
    }
}

fn verity_format(args: &[&str]) -> Result<(), Failure> {
    let mut positional = Vec::new();
    let mut salt = None;
    let mut uuid = None;
    let mut data_block_size = 4096u32;
    let mut hash_block_size = 4096u32;
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| -> Result<&str, Failure> {
            args.get(i + 1)
                .copied()
                .ok_or_else(|| usage(format!("{} needs a value", args[i])))
        };
        match args[i] {
            "--salt" => {
                let v = value(i)?;
                // "-" is veritysetup's spelling of an empty salt.
                salt = Some(if v == "-" {
                    Vec::new()
                } else {
                    verity::parse_hex(v)
                        .ok_or_else(|| usage(format!("--salt {v:?} is not hex bytes")))?
                });
                i += 2;
            }
            "--uuid" => {
                let v = value(i)?;
                uuid = Some(verity::parse_uuid(v).ok_or_else(|| {
                    usage(format!(
                        "--uuid {v:?} is not a UUID (8-4-4-4-12 hex digits)"
                    ))
                })?);
                i += 2;
            }
            "--data-block-size" | "--hash-block-size" => {
                let v = value(i)?;
                let n: u32 = v
                    .parse()
                    .map_err(|_| usage(format!("{} {v:?} is not a number", args[i])))?;
                if args[i] == "--data-block-size" {
                    data_block_size = n;
                } else {
                    hash_block_size = n;
                }
                i += 2;
            }
            "--json" => {
                json = true;
                i += 1;
            }
            flag if flag.starts_with("--") => {
                return Err(usage(format!("unknown option {flag:?} for verity format")))
            }
            path => {
                positional.push(path);
                i += 1;
            }
        }
    }
    let [data, hash_out] = positional[..] else {
        return Err(usage(format!(
            "verity format needs <data> and <hash-out>, got {} path(s)",
            positional.len()
        )));
    };
    let random = |n| {
        verity::random_bytes(n).map_err(|e| Failure(format!("cannot read /dev/urandom: {e}"), 1))
    };
    let salt = match salt {
        Some(s) => s,
        None => random(32)?,
    };
    let uuid = match uuid {
        Some(u) => u,
        None => {
            let mut u: [u8; 16] = random(16)?.try_into().unwrap();
            u[6] = (u[6] & 0x0f) | 0x40; // version 4
            u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
            u
        }
    };
    let params = VerityParams {
        data_block_size,
        hash_block_size,
        salt,
        uuid,
    };
    let tree = verity::format(Path::new(data), Path::new(hash_out), &params)
        .map_err(|e| Failure(chain(&e), 1))?;
    let root = cvm_measure::hex(&tree.root_hash);
    if json {
        let value = serde_json::json!({
            "root_hash": root,
            "hash_algorithm": "sha256",
            "format": 1,
            "salt": cvm_measure::hex(&tree.params.salt),
            "uuid": verity::format_uuid(&tree.params.uuid),
            "data_block_size": tree.params.data_block_size,
            "hash_block_size": tree.params.hash_block_size,
            "data_blocks": tree.data_blocks,
            "hash_blocks": tree.hash_device_blocks(),
            "hash_start_block": 1,
            "levels": tree.level_blocks,
        });
        println!("{}", serde_json::to_string_pretty(&value).unwrap());
    } else {
        println!("{root}");
    }
    Ok(())
}
