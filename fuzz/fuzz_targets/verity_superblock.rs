//! veritysetup superblocks as a hostile host writes them on the verity partition: the parser,
//! then the geometry checks the init makes against the partition sizes (from the 16 bytes
//! after the superblock when present) and the tree's level sizes.
#![no_main]

use cvm_init::root::check_geometry;
use cvm_formats::verity::{level_blocks, parse_superblock, SUPERBLOCK_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sb) = parse_superblock(data) else {
        return;
    };
    let sizes = data.get(SUPERBLOCK_SIZE..SUPERBLOCK_SIZE + 16).map(|b| {
        (
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..].try_into().unwrap()),
        )
    });
    let (root_bytes, verity_bytes) = sizes.unwrap_or((u64::MAX, u64::MAX));
    if check_geometry(&sb, root_bytes, verity_bytes).is_ok() {
        let _ = level_blocks(sb.data_blocks, sb.hash_block_size);
    }
});
