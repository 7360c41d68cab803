//! Milliseconds per block of BAT unmerge's `(I + B)⁻¹` on one thread as torch computes it
//! (`ops::inverse_as_torch`, on the Intel processor and on the AMD one) and in f64 with faer
//! (`ops::bat_inverses`, all threads, which bone-tool computes too: its condition numbers and the
//! singular check) at r = 16, 32, 64 and 128.
//!
//!     cargo run --release --example inv_speed

use bone_tool::ops::{bat_inverses, inverse_as_torch, BatSums};
use std::time::Instant;
fn main() {
    for r in [16usize, 32, 64, 128] {
        let n = 20_000_000 / (r * r * r) + 4;
        let mut s = 0x1234u64;
        let b: Vec<f32> = (0..n * r * r)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 / (r as f32).sqrt()
            })
            .collect();
        let mut acc = 0f32;
        let mut time = |sums| {
            let t = Instant::now();
            for bi in b.chunks(r * r) {
                acc += inverse_as_torch(bi, r, sums, 0)[0];
            }
            t.elapsed().as_secs_f64() / n as f64
        };
        let (intel, amd) = (time(BatSums::Intel), time(BatSums::Amd));
        let t = Instant::now();
        let f = bat_inverses(&b, r).unwrap();
        let f64s = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "r = {r}: torch's {:.3} ms per block (Intel), {:.3} ms (AMD), f64 (all threads) {:.3} ms ({acc} {})",
            intel * 1e3,
            amd * 1e3,
            f64s * 1e3,
            f.inv[0]
        );
    }
}
