//! `cvm-measure verity format`.

use std::path::PathBuf;

use cvm_formats::verity::{self, VerityParams};

use super::{chain, usage, work, Failure};

/// dm-verity hash trees
#[derive(Debug, clap::Args)]
#[command(arg_required_else_help = false)]
pub struct Args {
    #[command(subcommand)]
    command: Verity,
}

#[derive(Debug, clap::Subcommand)]
enum Verity {
    /// Build the dm-verity hash tree of DATA (format 1, sha256, with the veritysetup
    /// superblock) into HASH_OUT; print the root hash, or with --json every parameter
    Format(Format),
}

#[derive(Debug, clap::Args)]
struct Format {
    /// The data device or file
    data: PathBuf,
    /// Where the hash tree (with its superblock) is written
    hash_out: PathBuf,
    /// The salt in hex ("-" for none, as veritysetup spells it); random unless given
    #[arg(long, value_name = "HEX")]
    salt: Option<String>,
    /// The UUID of the superblock; random unless given
    #[arg(long, value_name = "UUID")]
    uuid: Option<String>,
    /// Bytes per data block
    #[arg(long, value_name = "N", default_value_t = 4096)]
    data_block_size: u32,
    /// Bytes per hash block
    #[arg(long, value_name = "N", default_value_t = 4096)]
    hash_block_size: u32,
    /// Print every parameter as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let Verity::Format(f) = args.command;
    let salt =
        match f.salt.as_deref() {
            // "-" is veritysetup's spelling of an empty salt.
            Some("-") => Vec::new(),
            Some(v) => verity::parse_hex(v)
                .ok_or_else(|| usage(format!("--salt {v:?} is not hex bytes")))?,
            None => verity::random_bytes(32)
                .map_err(|e| work(format!("cannot read /dev/urandom: {e}")))?,
        };
    let uuid = match f.uuid.as_deref() {
        Some(v) => verity::parse_uuid(v).ok_or_else(|| {
            usage(format!(
                "--uuid {v:?} is not a UUID (8-4-4-4-12 hex digits)"
            ))
        })?,
        None => {
            verity::random_uuid_v4().map_err(|e| work(format!("cannot read /dev/urandom: {e}")))?
        }
    };
    let params = VerityParams {
        data_block_size: f.data_block_size,
        hash_block_size: f.hash_block_size,
        salt,
        uuid,
    };
    let tree = verity::format(&f.data, &f.hash_out, &params).map_err(|e| work(chain(&e)))?;
    let root = cvm_formats::hex(&tree.root_hash);
    if f.json {
        super::print_json(&serde_json::json!({
            "root_hash": root,
            "hash_algorithm": "sha256",
            "format": 1,
            "salt": cvm_formats::hex(&tree.params.salt),
            "uuid": verity::format_uuid(&tree.params.uuid),
            "data_block_size": tree.params.data_block_size,
            "hash_block_size": tree.params.hash_block_size,
            "data_blocks": tree.data_blocks,
            "hash_blocks": tree.hash_device_blocks(),
            "hash_start_block": 1,
            "levels": tree.level_blocks,
        }));
    } else {
        println!("{root}");
    }
    Ok(())
}
