//! SHA-384 of many 4 KiB pages, four pages at a time.
//!
//! The SNP launch digest hashes every firmware page on its own, and SHA-384 is most of what
//! `cvm-measure snp` spends on the firmware. SHA-512's rounds are one chain within a message,
//! so a message uses one 64-bit lane at a time; four pages side by side fill a 256-bit vector,
//! and AVX2 computes their rounds together (2.5x the sha2 crate's rate on an EPYC here, which
//! has no SHA-512 instructions). Without AVX2 each page goes to the sha2 crate.

use sha2::{Digest, Sha384};

pub const PAGE: usize = 4096;
const LANES: usize = 4;

const IV384: [u64; 8] = [
    0xcbbb9d5dc1059ed8,
    0x629a292a367cd507,
    0x9159015a3070dd17,
    0x152fecd8f70e5939,
    0x67332667ffc00b31,
    0x8eb44a8768581511,
    0xdb0c2e0d64f98fa7,
    0x47b5481dbefa4fa4,
];

const K: [u64; 80] = [
    0x428a2f98d728ae22,
    0x7137449123ef65cd,
    0xb5c0fbcfec4d3b2f,
    0xe9b5dba58189dbbc,
    0x3956c25bf348b538,
    0x59f111f1b605d019,
    0x923f82a4af194f9b,
    0xab1c5ed5da6d8118,
    0xd807aa98a3030242,
    0x12835b0145706fbe,
    0x243185be4ee4b28c,
    0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f,
    0x80deb1fe3b1696b1,
    0x9bdc06a725c71235,
    0xc19bf174cf692694,
    0xe49b69c19ef14ad2,
    0xefbe4786384f25e3,
    0x0fc19dc68b8cd5b5,
    0x240ca1cc77ac9c65,
    0x2de92c6f592b0275,
    0x4a7484aa6ea6e483,
    0x5cb0a9dcbd41fbd4,
    0x76f988da831153b5,
    0x983e5152ee66dfab,
    0xa831c66d2db43210,
    0xb00327c898fb213f,
    0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2,
    0xd5a79147930aa725,
    0x06ca6351e003826f,
    0x142929670a0e6e70,
    0x27b70a8546d22ffc,
    0x2e1b21385c26c926,
    0x4d2c6dfc5ac42aed,
    0x53380d139d95b3df,
    0x650a73548baf63de,
    0x766a0abb3c77b2a8,
    0x81c2c92e47edaee6,
    0x92722c851482353b,
    0xa2bfe8a14cf10364,
    0xa81a664bbc423001,
    0xc24b8b70d0f89791,
    0xc76c51a30654be30,
    0xd192e819d6ef5218,
    0xd69906245565a910,
    0xf40e35855771202a,
    0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8,
    0x1e376c085141ab53,
    0x2748774cdf8eeb99,
    0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63,
    0x4ed8aa4ae3418acb,
    0x5b9cca4f7763e373,
    0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc,
    0x78a5636f43172f60,
    0x84c87814a1f0ab72,
    0x8cc702081a6439ec,
    0x90befffa23631e28,
    0xa4506cebde82bde9,
    0xbef9a3f7b2c67915,
    0xc67178f2e372532b,
    0xca273eceea26619c,
    0xd186b8c721c0c207,
    0xeada7dd6cde0eb1e,
    0xf57d4f7fee6ed178,
    0x06f067aa72176fba,
    0x0a637dc5a2c898a6,
    0x113f9804bef90dae,
    0x1b710b35131c471b,
    0x28db77f523047d84,
    0x32caab7b40c72493,
    0x3c9ebe0a15c9bebc,
    0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6,
    0x597f299cfc657e2a,
    0x5fcb6fab3ad6faec,
    0x6c44198c4a475817,
];

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{IV384, K, LANES, PAGE};
    use std::arch::x86_64::*;

    macro_rules! rotr {
        ($x:expr, $n:literal) => {
            _mm256_or_si256(
                _mm256_srli_epi64::<$n>($x),
                _mm256_slli_epi64::<{ 64 - $n }>($x),
            )
        };
    }

    #[target_feature(enable = "avx2")]
    fn compress(state: &mut [__m256i; 8], w: &mut [__m256i; 16]) {
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
        for t in 0..80 {
            if t >= 16 {
                let x = w[(t + 1) % 16];
                let s0 = _mm256_xor_si256(
                    _mm256_xor_si256(rotr!(x, 1), rotr!(x, 8)),
                    _mm256_srli_epi64::<7>(x),
                );
                let x = w[(t + 14) % 16];
                let s1 = _mm256_xor_si256(
                    _mm256_xor_si256(rotr!(x, 19), rotr!(x, 61)),
                    _mm256_srli_epi64::<6>(x),
                );
                w[t % 16] = _mm256_add_epi64(
                    _mm256_add_epi64(w[t % 16], s0),
                    _mm256_add_epi64(w[(t + 9) % 16], s1),
                );
            }
            let sum1 = _mm256_xor_si256(_mm256_xor_si256(rotr!(e, 14), rotr!(e, 18)), rotr!(e, 41));
            let ch = _mm256_xor_si256(_mm256_and_si256(e, f), _mm256_andnot_si256(e, g));
            let k = _mm256_set1_epi64x(K[t] as i64);
            let t1 = _mm256_add_epi64(
                _mm256_add_epi64(_mm256_add_epi64(h, sum1), _mm256_add_epi64(ch, w[t % 16])),
                k,
            );
            let sum0 = _mm256_xor_si256(_mm256_xor_si256(rotr!(a, 28), rotr!(a, 34)), rotr!(a, 39));
            let maj = _mm256_or_si256(
                _mm256_and_si256(a, b),
                _mm256_and_si256(c, _mm256_or_si256(a, b)),
            );
            let t2 = _mm256_add_epi64(sum0, maj);
            h = g;
            g = f;
            f = e;
            e = _mm256_add_epi64(d, t1);
            d = c;
            c = b;
            b = a;
            a = _mm256_add_epi64(t1, t2);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = _mm256_add_epi64(*s, v);
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn four_pages(pages: [&[u8; PAGE]; LANES]) -> [[u8; 48]; LANES] {
        let word = |lane: usize, at: usize| {
            u64::from_be_bytes(pages[lane][at..at + 8].try_into().unwrap()) as i64
        };
        let mut state = IV384.map(|v| _mm256_set1_epi64x(v as i64));
        let mut w = [_mm256_setzero_si256(); 16];
        for block in 0..PAGE / 128 {
            for (t, slot) in w.iter_mut().enumerate() {
                let at = block * 128 + t * 8;
                *slot = _mm256_set_epi64x(word(3, at), word(2, at), word(1, at), word(0, at));
            }
            compress(&mut state, &mut w);
        }
        // The padding block of a 4096-byte message: 0x80, zeros, the length in bits.
        w = [_mm256_setzero_si256(); 16];
        w[0] = _mm256_set1_epi64x(i64::MIN);
        w[15] = _mm256_set1_epi64x((PAGE * 8) as i64);
        compress(&mut state, &mut w);
        let mut lanes = [[0u64; LANES]; 8];
        for (out, v) in lanes.iter_mut().zip(state) {
            // SAFETY: [u64; 4] and __m256i have the same size, and storeu needs no alignment.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        }
        std::array::from_fn(|lane| {
            let mut out = [0u8; 48];
            for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&lanes[i][lane].to_be_bytes());
            }
            out
        })
    }
}

/// The SHA-384 of each page.
pub fn sha384_pages(pages: &[&[u8; PAGE]]) -> Vec<[u8; 48]> {
    let mut out = Vec::with_capacity(pages.len());
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    let mut batches = pages.chunks_exact(LANES);
    for batch in &mut batches {
        let batch: [&[u8; PAGE]; LANES] = batch.try_into().unwrap();
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 (checked above), all that four_pages_avx2 requires.
            out.extend(unsafe { avx2::four_pages(batch) });
            continue;
        }
        out.extend(
            batch
                .iter()
                .map(|p| -> [u8; 48] { Sha384::digest(p).into() }),
        );
    }
    out.extend(
        batches
            .remainder()
            .iter()
            .map(|p| -> [u8; 48] { Sha384::digest(p).into() }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_by_one(pages: &[&[u8; PAGE]]) -> Vec<[u8; 48]> {
        pages.iter().map(|p| Sha384::digest(p).into()).collect()
    }

    #[test]
    fn the_digest_of_a_zero_page() {
        // sha384 of 4096 zero bytes (Python's hashlib).
        let digest = sha384_pages(&[&[0; PAGE]; 5]);
        assert_eq!(
            cvm_formats::hex(&digest[4]),
            "c0e59a3e3ffbd3b5c75428fb36432facabc745944296ff515f737c4fef4efc64586809f7a16f56354a1eaecf2aa8d774"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn equals_one_page_at_a_time(bytes in proptest::collection::vec(any::<u8>(), 0..11 * PAGE)) {
            let pages: Vec<&[u8; PAGE]> =
                bytes.chunks_exact(PAGE).map(|p| p.try_into().unwrap()).collect();
            prop_assert_eq!(sha384_pages(&pages), one_by_one(&pages));
        }
    }
}
