//! BAT's r×r GEMMs, summed as PEFT's torch sums them on the CPU: which products are fused into
//! their sums, and in which blocks of k, depends on the processor torch ran on ([`BatSums`]).
//! faer computes them where it gives exactly those sums, else an in-order loop.

use super::Xorshift;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// How PEFT's torch sums the f32 products of BAT's r×r GEMMs, which depends on the processor it
/// runs on. PEFT's BAT multiplies the r×r tiles with torch's batched matmul; on the CPU, torch
/// (2.15) computes a product with few multiply-adds in a plain loop, every product rounded to f32
/// and then added, k in order from +0; larger ones it hands to Intel MKL (PyPI's x86-64 torch),
/// whose kernels depend on the processor: they sum k in order with one fused multiply-add (one
/// rounding) per product, in blocks of k ([`BatSums::block`]) whose sums are then added in order.
/// Measured on every value of PEFT's own products (README, "How bone-tool matches PEFT").
/// `scripts/peft-sweep.sh` found the first difference as a bf16 BAT merge one ulp off PEFT at
/// r = 3, where the two ways of summing put a delta on either side of a rounding tie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatSums {
    /// An Intel processor with AVX-512, where the fixtures were made: the plain loop below r = 8,
    /// then MKL's fused sums; one block up to r = 384, two halves (ceil(r/2)) up to 768, blocks of
    /// 384 beyond. (MKL's AVX2 code, on a processor without AVX-512, sums otherwise at r = 8 and
    /// from 512.)
    #[default]
    Intel,
    /// An AMD processor (EPYCs with AVX-512 and without, torch 2.15's MKL 2024.2): the plain loop
    /// up to r = 11 (MKL's own at r = 9 to 11, which sums the one to three elements of a row
    /// before its first 16-byte boundary in the output otherwise still: [`heads_as_mkl`]), fused
    /// from 12; one block up to r = 192, blocks of floor(r/2) from 193 to 384 (the last one 1 long
    /// for an odd r), blocks of 192 beyond.
    Amd,
}

impl BatSums {
    /// The smallest r whose GEMM fuses each product into its sum; below it each product is
    /// rounded and then added.
    pub const fn fused_from(self) -> usize {
        match self {
            BatSums::Intel => 8,
            BatSums::Amd => 12,
        }
    }

    /// Whether MKL sums the elements of a product's row before the row's first 16-byte boundary
    /// otherwise than the rest ([`heads_as_mkl`]): on the AMD processor at r = 9 to 11.
    pub const fn splits_heads(self, r: usize) -> bool {
        matches!(self, BatSums::Amd) && r >= 9 && r < self.fused_from()
    }

    /// Whether MKL computes BAT unmerge's `(W − B_i)·(I + B_i)⁻¹` as dot products
    /// ([`dots_as_mkl`]) on a weight of a single block row or column (O = r or I = r): on the AMD
    /// processor at r = 8 to 11. There torch hands MKL the inverse as `torch.inverse` left it,
    /// column-major, where on other weights it copies the inverse out for every tile row first
    /// (row-major, [`gemm`]'s sums).
    pub const fn dots_single_blocks(self, r: usize) -> bool {
        matches!(self, BatSums::Amd) && r >= 8 && r < self.fused_from()
    }

    /// Whether bone-tool knows how PEFT's torch inverts an r×r `I + B_i` in f32 on this processor
    /// ([`super::inverse_as_torch`]): up to r = 128 on the Intel processor, 149 on the AMD one
    /// (measured on each at every r; on the AMD one with 1 to 32 threads). Above, torch's bytes
    /// depend on its threads and on how many blocks it inverts at once (`panels::LARGEST`,
    /// `crout::LARGEST`), not modelled.
    pub const fn inverts_as_torch(self, r: usize) -> bool {
        match self {
            BatSums::Intel => r >= 1 && r <= super::panels::LARGEST,
            BatSums::Amd => r >= 1 && r <= super::crout::LARGEST,
        }
    }

    /// The processor bone-tool runs on, where it is one whose sums are modelled (by CPUID's vendor
    /// and flags): an Intel x86-64 processor with AVX-512, or an AMD one with AVX2 and FMA, with
    /// AVX-512 or without (MKL runs the same code on both: PEFT's bytes on an EPYC without AVX-512
    /// were those of one with it, every AMD fixture). `None` elsewhere (an Intel processor without
    /// AVX-512, whose MKL code sums otherwise; another vendor or architecture).
    pub fn this_processor() -> Option<BatSums> {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f");
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            // SAFETY: every x86-64 processor has CPUID leaf 0 (newer compilers call it safe).
            #[allow(unused_unsafe)]
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            match &vendor[..] {
                b"GenuineIntel" if avx512 => Some(BatSums::Intel),
                b"AuthenticAMD" if avx2 => Some(BatSums::Amd),
                _ => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// How MKL cuts the k of an r×r·r×r product: into blocks of this length from k = 0 (the last
    /// one shorter), each summed in order from +0, and the block sums added in order,
    /// `((s₀ + s₁) + s₂) + …`. Intel: measured on every value of r = 385, 392, 400, 448, 512, 640,
    /// 768, 769, 776, 800, 832, 896, 960, 1024, 1152, 1200, 1536, 1544, 2048, 2304, 3072 and 4096,
    /// on PEFT's tile layout, and on the exact tiles of the tests below; PEFT's and bone-tool's
    /// merges of one r×r weight were the same bytes at r = 4608, 5000, 6144 and 8192. AMD: at
    /// r = 192, 193, 200, 224, 255, 256, 257, 320, 384, 385, 400 and 512, and the fixtures'
    /// `bone-bat-wide-f32` (r = 200).
    pub fn block(self, r: usize) -> usize {
        match (self, r) {
            (BatSums::Intel, 0..=384) => r,
            (BatSums::Intel, 385..=768) => r.div_ceil(2),
            (BatSums::Intel, _) => 384,
            (BatSums::Amd, 0..=192) => r,
            (BatSums::Amd, 193..=384) => r / 2,
            (BatSums::Amd, _) => 192,
        }
    }
}

/// The largest r that [`gemm_in_order`] sums unfused, below the largest [`BatSums::fused_from`]:
/// its loop is compiled for each r up to it.
const UNFUSED_MAX_R: usize = BatSums::Amd.fused_from() - 1;

/// `dst[I, r] = lhs[I, r] · rhs[r, r]`, all row-major, single-threaded (callers parallelise).
/// Below `sums`' [`BatSums::fused_from`], [`gemm_in_order`]; from it, faer's GEMM where it gives exactly
/// [`gemm_in_order`]'s bytes on this processor ([`faer_is_in_order`]: processors with FMA on x86)
/// but for the sign of zero: faer gives -0 where all of an element's products are -0 (on some
/// shapes; a sum from +0 never gives -0), so callers add +0 to every value in their next pass
/// ([`plus_zero`]). Where faer sums in another order (measured on aarch64, whose faer kernels
/// split each element's sum) and the processor fuses multiply-adds in hardware,
/// [`gemm_in_order`] itself, so that BAT's bytes are PEFT's there too; only a processor without
/// FMA keeps faer's order, since a software fused multiply-add costs up to 50 times more.
pub(super) fn gemm(dst: &mut [f32], lhs: &[f32], rhs: &[f32], i: usize, r: usize, sums: BatSums) {
    if r < sums.fused_from() || (hardware_fma() && !faer_is_in_order(r, sums)) {
        return gemm_in_order(dst, lhs, rhs, i, r, sums);
    }
    gemm_faer(dst, lhs, rhs, i, r, sums);
}

/// faer's GEMM, in torch's blocks of k ([`sum_as_torch`]).
fn gemm_faer(dst: &mut [f32], lhs: &[f32], rhs: &[f32], i: usize, r: usize, sums: BatSums) {
    let lhs = MatRef::from_row_major_slice(lhs, i, r);
    let rhs = MatRef::from_row_major_slice(rhs, r, r);
    sum_as_torch(dst, i, r, sums, |dst, ks| {
        let (lhs, rhs) = (lhs.subcols(ks.start, ks.len()), rhs.subrows(ks.start, ks.len()));
        matmul(MatMut::from_row_major_slice_mut(dst, i, r), Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
    });
}

/// Whether the processor has a fused multiply-add instruction (`f32::mul_add` is then one
/// instruction, not a library call): x86-64 with FMA, and every aarch64.
pub(super) fn hardware_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        cfg!(target_arch = "aarch64")
    }
}

/// `sum(dst, ks)` writes into `dst` ([I, r]) every element's sum over k in `ks`: over all of k, or
/// over each block of [`BatSums::block`] on its own, the block sums then added in order as torch does.
fn sum_as_torch(
    dst: &mut [f32],
    i: usize,
    r: usize,
    sums: BatSums,
    mut sum: impl FnMut(&mut [f32], std::ops::Range<usize>),
) {
    let b = sums.block(r);
    sum(dst, 0..b);
    if b == r {
        return;
    }
    let mut part = vec![0f32; i * r];
    for start in (b..r).step_by(b) {
        sum(&mut part, start..(start + b).min(r));
        dst.iter_mut().zip(&part).for_each(|(d, x)| *d += x);
    }
}

/// Where [`BatSums::splits_heads`]: the elements of `dst` (`[n, r]` = `lhs[n, r]·rhs[r, r]`, as
/// [`gemm`] computed them) that MKL on the AMD processor sums otherwise, summed again its way. In
/// PEFT's product of the tiles (contiguous, from a 64-byte aligned address) a row whose first
/// element `row_start(n)` (its index there) is not at a 16-byte boundary has one to three elements
/// before the boundary; MKL sums each of those in chunks of four products, each chunk in order
/// from its first product, the chunk sums added in order, then the last `r mod 4` products one by
/// one, every product and sum rounded: `((((p₀+p₁)+p₂)+p₃) + (((p₄+p₅)+p₆)+p₇)) + p₈ …`. The rest
/// of the row is the in-order sum of [`gemm`]. Measured on every value of PEFT's tile products on
/// an AMD EPYC (merge `W·B` and unmerge `(W − B)·(I + B)⁻¹`, r = 9, 10 and 11, weights of 1×1 to
/// 100×40 tiles, one and two threads): all of them.
pub(super) fn heads_as_mkl(dst: &mut [f32], lhs: &[f32], rhs: &[f32], r: usize, row_start: impl Fn(usize) -> usize) {
    let whole = r - r % 4;
    for (n, (out, x)) in dst.chunks_exact_mut(r).zip(lhs.chunks_exact(r)).enumerate() {
        let head = (4 - row_start(n) % 4) % 4;
        for (c, o) in out.iter_mut().enumerate().take(head) {
            let p = |t: usize| x[t] * rhs[t * r + c]; // rounded: Rust never fuses
            let chunk = |c0: usize| ((p(c0) + p(c0 + 1)) + p(c0 + 2)) + p(c0 + 3);
            let mut acc = chunk(0);
            for c0 in (4..whole).step_by(4) {
                acc += chunk(c0);
            }
            for t in whole..r {
                acc += p(t);
            }
            *o = acc;
        }
    }
}

/// Where [`BatSums::dots_single_blocks`]: `dst` (`[n, r]`) = `lhs[n, r]·rhs[r, r]` as MKL on the AMD
/// processor computes it from a column-major `rhs`, each element a dot product of a row of `lhs`
/// (the tile row of `W − B_i`, whose first element `row_start(n)` is its index in the weight:
/// torch's difference keeps the weight's layout, from a 64-byte aligned address) with a column of
/// `rhs`, every product rounded and then added: the row's one to three elements before its first
/// 16-byte boundary in order (its head), then 8 products in 8 lanes, the head's sum in lane 0, the
/// lanes added `((l₀+l₄)+(l₂+l₆)) + ((l₁+l₅)+(l₃+l₇))`, or where fewer than 8 follow the head but 4 do
/// and the column is one of the first 8, 4 products in 4 lanes, `(l₀+l₂)+(l₁+l₃)`; then the rest in
/// order. Found with leaves of ±2⁴⁰ and ones (FPRev's method) on PEFT's own unmerge at r = 8 to 11,
/// and measured on every value of PEFT's products there (weights of 1 to 7 tiles in a row and of 3
/// to 5 in a column) and of the AMD-only fixtures' unmerges at r = 8 to 11.
pub(super) fn dots_as_mkl(dst: &mut [f32], lhs: &[f32], rhs: &[f32], r: usize, row_start: impl Fn(usize) -> usize) {
    for (n, (out, x)) in dst.chunks_exact_mut(r).zip(lhs.chunks_exact(r)).enumerate() {
        let head = ((4 - row_start(n) % 4) % 4).min(r);
        for (c, o) in out.iter_mut().enumerate() {
            let p = |t: usize| x[t] * rhs[t * r + c]; // rounded: Rust never fuses
            let mut acc = (0..head).fold(0f32, |s, t| s + p(t));
            let mut k = head;
            let lane = |j: usize, acc: f32| if j == 0 { acc + p(k) } else { p(k + j) };
            if r - head >= 8 {
                let l: [f32; 8] = std::array::from_fn(|j| lane(j, acc));
                acc = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
                k += 8;
            } else if r - head >= 4 && c < 8 {
                let l: [f32; 4] = std::array::from_fn(|j| lane(j, acc));
                acc = (l[0] + l[2]) + (l[1] + l[3]);
                k += 4;
            }
            *o = (k..r).fold(acc, |s, t| s + p(t));
        }
    }
}

/// `x + 0`: -0 becomes +0, every other value stays (no compiler may drop this addition). What a sum
/// that starts from +0 gives where [`gemm`] gives -0.
#[inline(always)]
pub(super) fn plus_zero(x: f32) -> f32 {
    x + 0.0
}

/// [`gemm`] summed the way PEFT's torch and the GPU's `strip_gemm` kernel sum: every element from +0
/// over k in order; from r = [`BatSums::fused_from`] one fused multiply-add (one rounding) per
/// product, below it each product rounded and then added; in the blocks of [`BatSums::block`].
pub fn gemm_in_order(dst: &mut [f32], lhs: &[f32], rhs: &[f32], i: usize, r: usize, sums: BatSums) {
    assert!(dst.len() == i * r && lhs.len() == i * r && rhs.len() == r * r);
    if r < sums.fused_from() {
        // r known at compile time: the sums live in registers (twice the speed of a loop over r)
        match r {
            1 => gemm_unfused::<1>(dst, lhs, rhs),
            2 => gemm_unfused::<2>(dst, lhs, rhs),
            3 => gemm_unfused::<3>(dst, lhs, rhs),
            4 => gemm_unfused::<4>(dst, lhs, rhs),
            5 => gemm_unfused::<5>(dst, lhs, rhs),
            6 => gemm_unfused::<6>(dst, lhs, rhs),
            7 => gemm_unfused::<7>(dst, lhs, rhs),
            8 => gemm_unfused::<8>(dst, lhs, rhs),
            9 => gemm_unfused::<9>(dst, lhs, rhs),
            10 => gemm_unfused::<10>(dst, lhs, rhs),
            r => {
                assert_eq!(r, UNFUSED_MAX_R, "every unfused r has its loop above");
                gemm_unfused::<UNFUSED_MAX_R>(dst, lhs, rhs)
            }
        }
        return;
    }
    sum_as_torch(dst, i, r, sums, |dst, ks| in_order_fused(dst, lhs, rhs, r, ks));
}

/// `dst` = the sums over k in `ks` (in order, from +0, fused) of [`gemm_in_order`]'s products.
fn in_order_fused(dst: &mut [f32], lhs: &[f32], rhs: &[f32], r: usize, ks: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if hardware_fma() {
        // SAFETY: the processor has FMA (on x86-64, hardware_fma's own check), just above.
        unsafe { gemm_in_order_fma(dst, lhs, rhs, r, ks) };
        return;
    }
    gemm_in_order_body(dst, lhs, rhs, r, ks);
}

/// [`gemm_in_order`] below [`BatSums::fused_from`], for blocks of `R`: each product rounded, then added.
fn gemm_unfused<const R: usize>(dst: &mut [f32], lhs: &[f32], rhs: &[f32]) {
    let m: [[f32; R]; R] = std::array::from_fn(|k| std::array::from_fn(|t| rhs[k * R + t]));
    for (out, x) in dst.chunks_exact_mut(R).zip(lhs.chunks_exact(R)) {
        let mut acc = [0f32; R];
        for (&a, row) in x.iter().zip(&m) {
            for (s, &b) in acc.iter_mut().zip(row) {
                *s += a * b; // two roundings: Rust never fuses these
            }
        }
        out.copy_from_slice(&acc);
    }
}

/// With the FMA instruction: `mul_add` is otherwise a call into a software fma, whose slow path
/// (taken for some values) costs 50 times more.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn gemm_in_order_fma(dst: &mut [f32], lhs: &[f32], rhs: &[f32], r: usize, ks: std::ops::Range<usize>) {
    gemm_in_order_body(dst, lhs, rhs, r, ks);
}

#[inline(always)]
fn gemm_in_order_body(dst: &mut [f32], lhs: &[f32], rhs: &[f32], r: usize, ks: std::ops::Range<usize>) {
    for (out, x) in dst.chunks_exact_mut(r).zip(lhs.chunks_exact(r)) {
        out.fill(0.0);
        // k outermost, each element's k still in order: rhs is read row by row
        for (&a, row) in x[ks.clone()].iter().zip(rhs.chunks_exact(r).skip(ks.start)) {
            for (o, &b) in out.iter_mut().zip(row) {
                *o = a.mul_add(b, *o);
            }
        }
    }
}

/// Whether [`gemm`] gives exactly [`gemm_in_order`]'s bytes (once -0 is made +0) for blocks of `r`
/// on this machine: below [`BatSums::fused_from`] it is that function; from it, where faer's GEMM
/// does ([`faer_is_in_order`]) or where [`gemm`] uses [`gemm_in_order`] instead (a processor with
/// FMA). Then BAT's bytes are the same on the CPU and on a GPU, so that the pipeline may compute
/// BAT on the CPU while the GPU starts.
pub fn gemm_is_in_order(r: usize, sums: BatSums) -> bool {
    r < sums.fused_from() || hardware_fma() || faer_is_in_order(r, sums)
}

/// Whether the GEMM results `got` are exactly the in-order sums `in_order` once -0 is made +0
/// ([`plus_zero`]; see [`gemm`]).
fn same_sums(got: &[f32], in_order: &[f32]) -> bool {
    got.iter().zip(in_order).all(|(a, b)| plus_zero(*a).to_bits() == b.to_bits())
}

/// Whether faer's GEMM ([`gemm_faer`]) gives exactly [`gemm_in_order`]'s bytes for blocks of `r`
/// (measured on the AVX-512 build machine: faer's kernels sum each element's products in order up
/// to k = 512, and from r = 385 [`gemm_faer`] asks them for blocks of k of at most 384; at k = 1024
/// they sum in blocks of their own, where 94% of the values differ in the last bit, so that a
/// change of [`BatSums::block`] could make this false; on aarch64 they split the sums at every r
/// tried). Checked once per r and `sums` in a process, on 16 rows of random values (a different
/// order changes most of them): r = 64 takes well under a millisecond, r = 512 about 10 ms. Later
/// calls read an atomic for r below 4096.
pub fn faer_is_in_order(r: usize, sums: BatSums) -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    const UNKNOWN: u8 = 0;
    const YES: u8 = 1;
    const NO: u8 = 2;
    static SMALL: [[AtomicU8; 4096]; 2] = [const { [const { AtomicU8::new(UNKNOWN) }; 4096] }; 2];
    static LARGE: std::sync::Mutex<Vec<(usize, BatSums, bool)>> = std::sync::Mutex::new(Vec::new());
    let measure = || {
        let i = 16;
        let mut g = Xorshift(0x9E37_79B9_7F4A_7C15u64 ^ r as u64);
        let (lhs, rhs) = (g.values(i * r, 1.0), g.values(r * r, 0.1));
        let (mut faer, mut ours) = (vec![0f32; i * r], vec![0f32; i * r]);
        gemm_faer(&mut faer, &lhs, &rhs, i, r, sums);
        gemm_in_order(&mut ours, &lhs, &rhs, i, r, sums);
        same_sums(&faer, &ours)
    };
    if let Some(slot) = SMALL[sums as usize].get(r) {
        return match slot.load(Ordering::Relaxed) {
            YES => true,
            NO => false,
            _ => {
                // two threads may both measure it: they find the same
                let yes = measure();
                slot.store(if yes { YES } else { NO }, Ordering::Relaxed);
                yes
            }
        };
    }
    let mut known = LARGE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, _, yes)) = known.iter().find(|(k, s, _)| (*k, *s) == (r, sums)) {
        return yes;
    }
    let yes = measure();
    known.push((r, sums, yes));
    yes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::dtype::Float;
    use crate::ops::tests::Lcg;
    use crate::ops::{bat_merge, Rounding};

    #[test]
    fn the_cpu_gemm_sums_each_element_in_order_with_one_rounding_a_product() {
        // What makes BAT PEFT's bytes, and lets a GPU give the CPU's (see gemm_is_in_order): the
        // CPU's products summed in order by fused multiply-adds, on this machine's shapes: view rows
        // from 1 to a 7b weight's 11008, r from 1 to 1200 (from 385 in torch's blocks), signed
        // zeros included. On x86 with FMA faer's own GEMM does that; elsewhere with FMA (aarch64),
        // where faer sums otherwise, gemm sums in order itself.
        let mut g = Lcg(5);
        let fma = hardware_fma();
        for sums in [BatSums::Intel, BatSums::Amd] {
            for (i, r) in [
                (1, 1),
                (3, 1),
                (5, 3),
                (40, 8),
                (7, 7),
                (64, 16),
                (11008, 64),
                (300, 96),
                (512, 128),
                (32, 256),
                (9, 392),
                (4, 512),
                (3, 640),
                (2, 768),
                (2, 800),
                (1, 1024),
                (1, 1200),
            ] {
                let mut lhs = g.vec(i * r, 1.0);
                let rhs = g.vec(r * r, 0.2);
                // signed zeros: a row of -0 (-0 or +0 products by rhs's signs), and scattered +0
                lhs[..r].fill(-0.0);
                lhs[r..].iter_mut().step_by(5).for_each(|x| *x = 0.0);
                let (mut faer, mut ours) = (vec![0f32; i * r], vec![7f32; i * r]);
                gemm(&mut faer, &lhs, &rhs, i, r, sums);
                gemm_in_order(&mut ours, &lhs, &rhs, i, r, sums);
                let same = same_sums(&faer, &ours);
                // (below fused_from the CPU's GEMM is the in-order sum itself)
                let expect = fma || r < sums.fused_from();
                assert_eq!(same, expect, "[{i}, {r}]·[{r}, {r}] {sums:?}: the CPU's GEMM and the in-order sum");
                assert_eq!(gemm_is_in_order(r, sums), expect, "r {r} {sums:?}: the run-time check");
                if r >= sums.fused_from() {
                    // faer's own GEMM: in order on x86 with FMA
                    gemm_faer(&mut faer, &lhs, &rhs, i, r, sums);
                    let same = same_sums(&faer, &ours);
                    if cfg!(target_arch = "x86_64") && fma {
                        assert!(same, "[{i}, {r}]·[{r}, {r}] {sums:?}: faer and the in-order sum");
                    }
                    if !same {
                        assert!(!faer_is_in_order(r, sums), "r {r} {sums:?}: the check finds faer's order");
                    }
                }
            }
        }
        // the check answers what it finds: at r = 1024 faer sums in blocks of k
        let r = 1024;
        let (lhs, rhs) = (g.vec(16 * r, 1.0), g.vec(r * r, 0.1));
        let (mut faer, mut ours) = (vec![0f32; 16 * r], vec![0f32; 16 * r]);
        gemm_faer(&mut faer, &lhs, &rhs, 16, r, BatSums::Intel);
        gemm_in_order(&mut ours, &lhs, &rhs, 16, r, BatSums::Intel);
        assert_eq!(faer_is_in_order(r, BatSums::Intel), faer == ours);
        // the in-order sum itself, against f64 for a small case: one rounding per product
        let (lhs, rhs) = ([0.5f32, 0.25, 3.0], [1.0f32, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        let mut out = [0f32; 3];
        gemm_in_order(&mut out, &lhs, &rhs, 1, 3, BatSums::Intel);
        assert_eq!(out, [0.5 + 2.0 + 192.0, 1.0 + 4.0 + 384.0, 2.0 + 8.0 + 768.0]);
    }

    #[test]
    fn products_are_fused_into_the_sum_from_r_8_as_in_torch() {
        // Row 0 of W is [1, 1 + 2^-12, 0...], column 0 of B_0 is [-1, 1 + 2^-12, 0...]. The second
        // product is 1 + 2^-11 + 2^-24: rounded on its own it loses the 2^-24 (a tie, to even), fused
        // into the sum it keeps it. torch 2.15 on the CPU (PEFT's BAT, `o @ B`, on these exact
        // tiles) gives 2^-11 at r = 2 and 7 and 2^-11 + 2^-24 at r = 8 on an Intel processor with
        // AVX-512; on an AMD one 2^-11 up to r = 11 and 2^-11 + 2^-24 at 12 and 13.
        for (sums, fused) in [
            (BatSums::Intel, [false, false, true, true, true, true, true]),
            (BatSums::Amd, [false, false, false, false, false, true, true]),
        ] {
            for (r, fused) in [2, 7, 8, 9, 11, 12, 13].into_iter().zip(fused) {
                assert_eq!(r >= sums.fused_from(), fused);
                let mut w = vec![0f32; r * r];
                (w[0], w[1]) = (1.0, 1.0 + 2f32.powi(-12));
                let mut b = vec![0f32; r * r];
                (b[0], b[r]) = (-1.0, 1.0 + 2f32.powi(-12));
                let expect = if fused { 2f32.powi(-11) + 2f32.powi(-24) } else { 2f32.powi(-11) };
                let (mut cpu, mut in_order) = (vec![0f32; r * r], vec![0f32; r * r]);
                gemm(&mut cpu, &w, &b, r, r, sums);
                gemm_in_order(&mut in_order, &w, &b, r, r, sums);
                assert_eq!((cpu[0], in_order[0]), (expect, expect), "r = {r} {sums:?}");
                // and through the merge: Δ = that + B[0, 0] = -1 + it, the weight 1 + Δ in f32
                let mut merged = w.clone();
                bat_merge(&mut merged, r, r, &b, r, Rounding { sums, ..Rounding::peft(Float::F32) });
                assert_eq!(merged[0], 1.0 + (expect - 1.0), "r = {r} {sums:?}");
            }
        }
    }

    #[test]
    fn products_are_summed_in_torchs_blocks_of_k_from_r_385() {
        // Row 0 of W has 1 at k = 0 and at `ks`; column 0 of B_0 has 1 at k = 0 and 2^-24 at `ks`.
        // In order, 1 + 2^-24 rounds back to 1 (a tie, to even) each time: 1. Summed in blocks,
        // the two small products of a block (at its start) make 2^-23 first, and each such block
        // adds one ulp of 1. torch 2.15 on these exact tiles (PEFT's `o @ B`) gives these ulps:
        // on an Intel processor with AVX-512 none at r = 384, one at 386-768 (halves) and at 769
        // and 800 (blocks of 384: 384, 384, the rest), two at 1024, three at 1536; on an AMD one
        // none at 192, one at 193 (blocks of floor(r/2) = 96: 96, 96, 1), 200, 256, 384, 385 and 400
        // (blocks of 192), two at 512, three at 768.
        let intel = [
            (384, vec![1, 2], 0),
            (386, vec![193, 194], 1),
            (392, vec![196, 197], 1),
            (512, vec![256, 257], 1),
            (768, vec![384, 385], 1),
            (769, vec![384, 385], 1),
            (800, vec![384, 385], 1),
            (1024, vec![384, 385, 768, 769], 2),
            (1536, vec![384, 385, 768, 769, 1152, 1153], 3),
        ];
        let amd = [
            (192, vec![1, 2], 0),
            (193, vec![96, 97], 1),
            (200, vec![100, 101], 1),
            (256, vec![128, 129], 1),
            (384, vec![192, 193], 1),
            (385, vec![192, 193], 1),
            (400, vec![192, 193], 1),
            (512, vec![192, 193, 384, 385], 2),
            (768, vec![192, 193, 384, 385, 576, 577], 3),
        ];
        let cases = intel.into_iter().map(|c| (BatSums::Intel, c)).chain(amd.into_iter().map(|c| (BatSums::Amd, c)));
        for (sums, (r, ks, ulps)) in cases {
            let mut w = vec![0f32; r]; // row 0 alone
            let mut b = vec![0f32; r * r];
            (w[0], b[0]) = (1.0, 1.0);
            for &k in &ks {
                (w[k], b[k * r]) = (1.0, 2f32.powi(-24));
            }
            let expect = 1.0 + ulps as f32 * 2f32.powi(-23);
            let (mut cpu, mut in_order) = (vec![0f32; r], vec![0f32; r]);
            gemm(&mut cpu, &w, &b, 1, r, sums);
            gemm_in_order(&mut in_order, &w, &b, 1, r, sums);
            assert_eq!((cpu[0], in_order[0]), (expect, expect), "r = {r} {sums:?}");
        }
        // the blocks' sums are added in order, ((s0 + s1) + s2) + s3: at r = 1536 (Intel; 768 on
        // the AMD processor, where torch gives the same), s0 = 1 and s1 = s2 = s3 = 2^-24 (one
        // small product each) give 1 + 2^-24 = 1 (a tie, to even) three times; a pairwise
        // (1 + 2^-24) + (2^-24 + 2^-24) would give 1 + 2^-23
        for (sums, r, ks) in [(BatSums::Intel, 1536, [384, 768, 1152]), (BatSums::Amd, 768, [192, 384, 576])] {
            let (mut w, mut b) = (vec![0f32; r], vec![0f32; r * r]);
            (w[0], b[0]) = (1.0, 1.0);
            for k in ks {
                (w[k], b[k * r]) = (1.0, 2f32.powi(-24));
            }
            let mut out = vec![0f32; r];
            gemm_in_order(&mut out, &w, &b, 1, r, sums);
            assert_eq!(out[0], 1.0, "{sums:?}");
        }
    }

    #[test]
    fn unmerges_of_single_block_weights_are_dot_products_on_the_amd_processor() {
        // FPRev's probe: a row of ones but +2^40 at k = p and -2^40 at q, times a column of ones,
        // gives the count of ones summed outside the smallest subtree that holds p and q (inside
        // it they vanish into 2^40). torch 2.15 on an AMD EPYC, PEFT's unmerge `(o - B) @ inv`
        // with inv all ones as torch.inverse leaves it (column-major) on a weight of one block row
        // and 4 block columns (tile a's rows start at a·r mod 4 = 0, r, 2r, 3r), gave these counts
        // in tile a's row 0, columns 0 and r − 1: (r, p, q, [column 0 for a = 0..4], [column r − 1]).
        type Counts = [u32; 4];
        let torch: [(usize, usize, usize, Counts, Counts); 15] = [
            (8, 0, 4, [6; 4], [6; 4]),
            (8, 3, 7, [6; 4], [6; 4]),
            (8, 2, 6, [6; 4], [6; 4]),
            (9, 0, 4, [7, 2, 5, 0], [7, 4, 4, 0]),
            (9, 3, 7, [7, 1, 1, 7], [7, 1, 1, 7]),
            (9, 1, 2, [1, 6, 6, 0], [1, 6, 6, 0]),
            (9, 2, 6, [7, 2, 2, 7], [7, 2, 2, 7]),
            (10, 0, 4, [8, 4, 8, 4], [8, 4, 8, 4]),
            (10, 3, 7, [8; 4], [8; 4]),
            (10, 1, 2, [2, 7, 2, 7], [2, 7, 2, 7]),
            (10, 2, 6, [8, 6, 8, 6], [8, 6, 8, 6]),
            (11, 0, 4, [9, 2, 5, 0], [9, 2, 5, 0]),
            (11, 3, 7, [9, 9, 9, 6], [9, 9, 9, 6]),
            (11, 1, 2, [3, 2, 8, 8], [3, 2, 8, 8]),
            (11, 2, 6, [9, 9, 7, 0], [9, 9, 7, 0]),
        ];
        let big = 2f32.powi(40);
        let mut in_order_differs = 0;
        for (r, p, q, first, last) in torch {
            assert!(BatSums::Amd.dots_single_blocks(r) && !BatSums::Intel.dots_single_blocks(r));
            let mut row = vec![1f32; r];
            (row[p], row[q]) = (big, -big);
            let lhs: Vec<f32> = (0..4).flat_map(|_| row.iter().copied()).collect();
            let rhs = vec![1f32; r * r];
            let mut out = vec![0f32; 4 * r];
            dots_as_mkl(&mut out, &lhs, &rhs, r, |a| a * r);
            for a in 0..4 {
                let got = (out[a * r], out[a * r + r - 1]);
                assert_eq!(got, (first[a] as f32, last[a] as f32), "r {r}, ±2^40 at {p} and {q}, tile {a}");
            }
            let mut in_order = vec![0f32; 4 * r];
            gemm_in_order(&mut in_order, &lhs, &rhs, 4, r, BatSums::Amd);
            in_order_differs += (in_order != out) as usize;
        }
        assert_eq!(in_order_differs, 15, "the in-order sum gives other counts in each case");
        for r in (1..8).chain(12..=16) {
            assert!(!BatSums::Amd.dots_single_blocks(r));
        }
    }
}
