//! GEMM throughput on this machine, for the benchmark table: the f32 peak of a large square GEMM
//! (faer, all cores) next to bone-tool's BAT kernel (one `[I, r]·[r, r]` GEMM per row strip plus
//! the `+ B_i` and rounding, all cores) on a Llama-sized weight.
//!
//!   cargo run --release --example gemm_peak -- [r]

use bone_tool::ops::dtype::Float;
use bone_tool::ops::{apply_chain, Prepared, Rounding};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use std::time::Instant;

fn best_of<F: FnMut()>(n: usize, mut f: F) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let r: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(64);
    let n = 2048;
    let a = Mat::<f32>::from_fn(n, n, |i, j| ((i * 7 + j * 3) % 13) as f32 * 0.01);
    let b = Mat::<f32>::from_fn(n, n, |i, j| ((i * 5 + j) % 11) as f32 * 0.01);
    let mut c = Mat::<f32>::zeros(n, n);
    let par = Par::rayon(0);
    let t = best_of(5, || matmul(c.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0f32, par));
    let peak = 2.0 * (n * n * n) as f64 / t / 1e9;

    // BAT merge of one gate_proj-sized bf16 weight, through the same code path as `merge`.
    let (o, i) = (5632usize, 2048usize);
    let w: Vec<f32> = (0..o * i).map(|k| ((k * 2654435761) % 1000) as f32 * 1e-4 - 0.05).collect();
    let mut src = vec![0u8; o * i * 2];
    Float::BF16.encode(&w, &mut src);
    let mut dst = vec![0u8; src.len()];
    let blocks: Vec<f32> = (0..o * r).map(|k| ((k * 40503) % 997) as f32 * 1e-5 - 0.005).collect();
    let op = Prepared::BatMerge { b: blocks, r, rounding: Rounding::peft(Float::BF16) };
    let tb = best_of(5, || {
        apply_chain(&src, &mut dst, Float::BF16, o, i, 0, std::slice::from_ref(&op), false);
    });
    let bat = 2.0 * (o * i * r) as f64 / tb / 1e9;
    // The strip GEMMs alone: [I, r]·[r, r] per strip, strips spread over the cores.
    let wf: Vec<f32> = w.clone();
    let mut out = vec![0f32; o * i];
    let bl = &op;
    let Prepared::BatMerge { b: blk, .. } = bl else { unreachable!() };
    let tg = best_of(5, || {
        use rayon::prelude::*;
        out.par_chunks_mut(r * i).zip(wf.par_chunks(r * i)).enumerate().for_each(|(s, (d, l))| {
            let lhs = faer::MatRef::from_row_major_slice(l, i, r);
            let rhs = faer::MatRef::from_row_major_slice(&blk[s * r * r..][..r * r], r, r);
            let dst = faer::MatMut::from_row_major_slice_mut(d, i, r);
            matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
        })
    });
    let strips = 2.0 * (o * i * r) as f64 / tg / 1e9;
    println!("gemm_peak_gflops {peak:.1}");
    println!("bat_strip_gemm_gflops {strips:.1}");
    println!("bat_strip_gemm_share {:.0}%", 100.0 * strips / peak);
    println!("bat_kernel_gflops {bat:.1}");
    println!("bat_kernel_share {:.0}%", 100.0 * bat / peak);
}
