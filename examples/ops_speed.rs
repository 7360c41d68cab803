//! Single-thread speed of the CPU's default/mini add chain (decode, add, round, encode, the check
//! for new inf/NaN) on a [2048, 5632] weight in each dtype, of BAT's at r = 64, of both unmerges,
//! and of `--dtype`'s casts: ns per element, best of 15.
//!   cargo run --release --example ops_speed
use bone_tool::ops::dtype::Float;
use bone_tool::ops::{apply_chain, expand_transposed, Prepared, Rounding};
use std::time::Instant;

fn main() {
    let (o, i, r) = (2048usize, 5632usize, 64usize);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut rng = bone_tool::ops::Xorshift(7);
    let w32 = rng.values(o * i, 0.02);
    let only: Vec<String> = std::env::args().skip(1).collect(); // e.g. `F16 bat`: only those
    for d in [Float::BF16, Float::F16, Float::F32] {
        let mut src = vec![0u8; o * i * d.size()];
        d.encode_serial(&w32, &mut src);
        let mut dst = vec![0u8; src.len()];
        let block = rng.values(r * o, 0.01);
        let et = expand_transposed(&block, r, o, o);
        let ops = [Prepared::Periodic { et, r, sign: 1.0, rounding: Rounding::peft(d) }];
        let b = rng.values(o / r * r * r, 0.05);
        let inv = bone_tool::ops::bat_inverses(&b, r).expect("I + B is invertible").inv;
        let unbat = [Prepared::BatUnmerge { b: b.clone(), inv, r, rounding: Rounding::peft(d), transposed: false }];
        let bat = [Prepared::BatMerge { b, r, rounding: Rounding::peft(d) }];
        let mut unops = ops.clone();
        if let Prepared::Periodic { sign, .. } = &mut unops[0] {
            *sign = -1.0;
        }
        for to in [Float::BF16, Float::F16, Float::F32].into_iter().filter(|&t| t != d) {
            let name = format!("{d:?} cast to {to:?}");
            if !only.iter().all(|w| name.contains(w.as_str())) {
                continue;
            }
            let mut out = vec![0u8; o * i * to.size()];
            let mut best = f64::MAX;
            for _ in 0..15 {
                let t = Instant::now();
                pool.install(|| d.cast(to, &src, &mut out));
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("{name}: {:.3} ns/element", best * 1e9 / (o * i) as f64);
        }
        for (name, ops) in [
            ("default", &ops[..]),
            ("bat r=64", &bat[..]),
            ("unmerge default", &unops[..]),
            ("unmerge bat r=64", &unbat[..]),
        ] {
            if !only.iter().all(|w| format!("{d:?} {name}").contains(w.as_str())) {
                continue;
            }
            let mut best = f64::MAX;
            for _ in 0..15 {
                let t = Instant::now();
                pool.install(|| apply_chain(&src, &mut dst, d, o, i, 0, ops, true));
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{d:?} {name}: {:.3} ns/element ({:.2} GB/s of weight)",
                best * 1e9 / (o * i) as f64,
                (o * i * d.size()) as f64 / best / 1e9
            );
        }
    }
}
