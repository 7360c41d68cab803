//! The math of Bone / MiSS, once per variant, on f32 buffers (the CPU backend).
//!
//! These functions know no files and no command line. `w` is a weight `[O, I]` in row-major order,
//! decoded to f32; after each op every value is rounded exactly as PEFT 0.18.1 rounds it (see the
//! spec's "Dtype policy"), so that a chain of ops reproduces PEFT's bytes.

mod crout;
pub mod dtype;
mod fours;
mod gemm;
pub mod lowrank;
mod panels;

use gemm::{dots_as_mkl, heads_as_mkl};
pub use gemm::{faer_is_in_order, gemm_in_order, gemm_is_in_order, BatSums};
use gemm::{gemm, plus_zero};

use dtype::Float;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, MatRef};
use rayon::prelude::*;

/// How results are rounded: `weight` is the weight's dtype D; `adapter` the dtype A that PEFT holds
/// the blocks in while merging: f32 after `PeftModel.from_pretrained` (which upcasts them), or D
/// with `autocast_adapter_dtype=False`. Block values are rounded to A when loaded
/// ([`Rounding::load_block`]); since A is f32 or D, PEFT's casts of a result (`.to(A).to(D)`) come
/// down to one rounding to D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rounding {
    pub weight: Float,
    pub adapter: Float,
    /// BAT merge: round `W + Δ` once instead of PEFT's `R_D(W + R_D(Δ))`.
    pub once: bool,
    /// How BAT's GEMMs sum their products: as PEFT's torch does on which processor.
    pub sums: BatSums,
}

impl Rounding {
    /// PEFT's rounding for weights of dtype `weight` with f32 blocks.
    pub fn peft(weight: Float) -> Rounding {
        Rounding { weight, adapter: Float::F32, once: false, sums: BatSums::Intel }
    }

    /// Round block values to the dtype PEFT holds them in.
    pub fn load_block(&self, block: &mut [f32]) {
        self.adapter.round(block);
    }
}

/// Expand a default block `[r, cols]` (cols = O) or a mini block `[r, mini_r]` (tiled along O,
/// torch's `repeat`) into its transpose `[O, r]`: row `o` holds `E[:, o mod cols]`.
pub fn expand_transposed(block: &[f32], r: usize, cols: usize, o: usize) -> Vec<f32> {
    assert_eq!(block.len(), r * cols);
    let mut et = vec![0f32; o * r];
    for (row, dst) in et.chunks_exact_mut(r).enumerate() {
        let col = row % cols;
        for (k, d) in dst.iter_mut().enumerate() {
            *d = block[k * cols + col];
        }
    }
    et
}

/// One op of a tensor's chain, with its blocks loaded (and, for BAT unmerge, inverted).
#[derive(Clone, Debug)]
pub enum Prepared {
    /// Default or mini: `W ± E[c mod r, o mod cols]`, `et` from [`expand_transposed`].
    Periodic { et: Vec<f32>, r: usize, sign: f32, rounding: Rounding },
    /// BAT merge with blocks `[O/r, r, r]`.
    BatMerge { b: Vec<f32>, r: usize, rounding: Rounding },
    /// BAT unmerge with blocks and their inverses `(I + B_i)⁻¹`; `transposed` where PEFT holds the
    /// weight column-major by then ([`mark_transposed`]).
    BatUnmerge { b: Vec<f32>, inv: Vec<f32>, r: usize, rounding: Rounding, transposed: bool },
}

impl Prepared {
    /// Apply to the rows `row0..row0 + w.len() / i` of a weight with `i` columns. For BAT ops,
    /// `row0` and the row count are multiples of r. `round` false skips the final rounding to D
    /// (for the last op of a chain, whose result is encoded to D anyway: the same bytes, once).
    #[inline(always)]
    pub fn apply_rows(&self, w: &mut [f32], row0: usize, i: usize, scratch: &mut Vec<f32>, round: bool) {
        match self {
            Prepared::Periodic { et, r, sign, rounding } => periodic_rows(w, row0, i, et, *r, *sign, *rounding, round),
            Prepared::BatMerge { r, .. } | Prepared::BatUnmerge { r, .. } => {
                for (s, strip) in w.chunks_exact_mut(r * i).enumerate() {
                    self.apply_view(strip, row0 / r + s, 0, i / r, scratch, round);
                }
            }
        }
    }

    /// A BAT op on the view rows `k0..k0 + w.len() / r` of strip `strip` (rows `strip·r..` of the
    /// weight, read as `[I, r]`; `per_a = I / r` view rows to a tile row): [`bat_merge_view`] or
    /// [`bat_unmerge_view`] with the strip's block, then rounded to D when `round`. Each view row is
    /// computed on its own, so a strip may be done whole or in parts: the same bytes.
    #[inline(always)]
    fn apply_view(&self, w: &mut [f32], strip: usize, k0: usize, per_a: usize, scratch: &mut Vec<f32>, round: bool) {
        let rd = match self {
            Prepared::BatMerge { b, r, rounding } => {
                let at = View { strip, k0, per_a, blocks: b.len() / (r * r) };
                bat_merge_view(w, at, &b[strip * r * r..][..r * r], *r, *rounding, scratch);
                rounding
            }
            Prepared::BatUnmerge { b, inv, r, rounding, transposed } => {
                let blk = strip * r * r..(strip + 1) * r * r;
                let at = View { strip, k0, per_a, blocks: b.len() / (r * r) };
                bat_unmerge_view(w, at, &b[blk.clone()], &inv[blk], *r, rounding.sums, *transposed, scratch);
                rounding
            }
            Prepared::Periodic { .. } => unreachable!("view rows are BAT's"),
        };
        if round {
            rd.weight.round(w);
        }
    }

    fn is_bat(&self) -> bool {
        !matches!(self, Prepared::Periodic { .. })
    }

    /// Whether only the CPU computes this op as PEFT does, on a weight of `i` columns: BAT with the
    /// AMD processor's sums at r = 9 to 11 ([`BatSums::splits_heads`]), and its unmerge at r = 8
    /// to 11 on a weight of a single block row or column ([`BatSums::dots_single_blocks`]); the
    /// GPU's kernel models neither.
    pub fn cpu_only(&self, i: usize) -> bool {
        match self {
            Prepared::Periodic { .. } => false,
            Prepared::BatMerge { r, rounding, .. } => rounding.sums.splits_heads(*r),
            Prepared::BatUnmerge { b, r, rounding, .. } => {
                let single = b.len() == r * r || i == *r;
                rounding.sums.splits_heads(*r) || (rounding.sums.dots_single_blocks(*r) && single)
            }
        }
    }

    fn row_multiple(&self) -> usize {
        match self {
            Prepared::Periodic { .. } => 1,
            Prepared::BatMerge { r, .. } | Prepared::BatUnmerge { r, .. } => *r,
        }
    }
}

/// Set each BAT unmerge's `transposed`: whether PEFT holds the weight column-major when it runs it.
/// A BAT op at r = 1 leaves the weight so (its `permute(1, 2, 0, 3).reshape` is then a transposed
/// view, not a copy), one at a larger r row-major, and a default or mini op as it found it; a
/// chain starts from the weight as stored, row-major. MKL on the AMD processor multiplies a
/// column-major weight of a single block row or column otherwise ([`bat_unmerge_view`]); the
/// other ops' sums do not depend on it (measured on every value of PEFT's merges and unmerges of
/// both layouts at r = 2 to 128, as sampled).
pub fn mark_transposed(chain: &mut [Prepared]) {
    let mut column_major = false;
    for op in chain {
        match op {
            Prepared::Periodic { .. } => {}
            Prepared::BatMerge { r, .. } => column_major = *r == 1,
            Prepared::BatUnmerge { r, transposed, .. } => {
                *transposed = column_major;
                column_major = *r == 1;
            }
        }
    }
}

/// Elements per parallel task.
const TASK_ELEMS: usize = 1 << 15;

/// Rows must be cut in multiples of this for the chain (every BAT r divides it).
pub fn row_unit(ops: &[Prepared]) -> usize {
    ops.iter().map(Prepared::row_multiple).fold(1, lcm)
}

/// Run a chain of ops over the rows `row0..row0 + rows` of a weight with `i` columns, stored as
/// bytes of dtype `d`: the rows are cut into strips (a multiple of every BAT r), and each strip of
/// `src` is decoded to f32, put through every op, and encoded into the same rows of `dst`, in
/// parallel. Memory beyond the two byte buffers: one strip of f32 per thread.
///
/// With `check_finite`, returns the index (within these rows) of the first value that is finite in
/// `src` but not in `dst`, found while each strip is still in cache.
#[allow(clippy::too_many_arguments)]
pub fn apply_chain(
    src: &[u8],
    dst: &mut [u8],
    d: Float,
    rows: usize,
    i: usize,
    row0: usize,
    ops: &[Prepared],
    check_finite: bool,
) -> Option<usize> {
    assert_eq!(src.len(), rows * i * d.size());
    assert_eq!(dst.len(), src.len());
    let unit = row_unit(ops);
    assert!(rows.is_multiple_of(unit) && row0.is_multiple_of(unit), "rows must split into whole BAT strips");
    let h = unit * (TASK_ELEMS / (unit * i.max(1))).max(1);
    let step = h * i * d.size();
    let first_bad = std::sync::atomic::AtomicUsize::new(usize::MAX);
    dst.par_chunks_mut(step).zip(src.par_chunks(step)).enumerate().for_each(|(s, (out, inp))| {
        let bad =
            STRIP.with_borrow_mut(|bufs| Strip { inp, out, d, row0: row0 + s * h, i, ops, check_finite }.run(bufs));
        if let Some(k) = bad {
            first_bad.fetch_min(s * h * i + k, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Some(first_bad.into_inner()).filter(|&k| k != usize::MAX)
}

thread_local! {
    /// Each worker's buffers, reused from tensor to tensor.
    static STRIP: std::cell::RefCell<Buffers> = const { std::cell::RefCell::new(Buffers { w: Vec::new(), scratch: Vec::new() }) };
}

/// A worker's f32 buffers: the decoded strip (or part) and the GEMM's scratch.
struct Buffers {
    w: Vec<f32>,
    scratch: Vec<f32>,
}

/// Rows of a weight to put through a chain: their bytes in and out, of dtype `d`; the first row's
/// index `row0` in a weight of `i` columns; the ops; and whether to look for new inf/NaN.
struct Strip<'a> {
    inp: &'a [u8],
    out: &'a mut [u8],
    d: Float,
    row0: usize,
    i: usize,
    ops: &'a [Prepared],
    check_finite: bool,
}

impl Strip<'_> {
    /// Decode, every op, encode, and with `check_finite` the index of the first value that became
    /// infinite or NaN. Compiled twice: for AVX2 where the processor has it (the same operations in
    /// wider registers, so the same results) and for the baseline.
    fn run(self, bufs: &mut Buffers) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2, checked just above.
            return unsafe { self.run_avx2(bufs) };
        }
        self.body(bufs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(self, bufs: &mut Buffers) -> Option<usize> {
        self.body(bufs)
    }

    /// The chain's fastest way: one pass for a single default/mini add, parts in L2 for BAT ops of
    /// one r, else [`Strip::passes`].
    #[inline(always)]
    fn body(mut self, bufs: &mut Buffers) -> Option<usize> {
        match self.ops {
            [Prepared::Periodic { et, r, sign, .. }] => {
                if let Some(found) = periodic_fused(&mut self, et, *r, *sign) {
                    return found;
                }
            }
            [first, ..] if self.ops.iter().all(|op| op.is_bat() && op.row_multiple() == first.row_multiple()) => {
                return self.bat_in_parts(bufs);
            }
            _ => {}
        }
        self.passes(bufs)
    }

    /// A chain of BAT merges and unmerges with one r (one adapter, the usual case, or stacked
    /// ones), each strip in parts of whole view rows: decode, each op's GEMM and its `± B_i` (and
    /// the rounding between ops), encode and the check for new inf/NaN, while the part is in cache.
    /// The same operations as [`Strip::passes`] (the same bytes).
    #[inline(always)]
    fn bat_in_parts(self, Buffers { w, scratch }: &mut Buffers) -> Option<usize> {
        let Strip { inp, out, d, row0, i, ops, check_finite } = self;
        let r = ops[0].row_multiple();
        let (per_a, rows) = (i / r, (BAT_PART_ELEMS / r).max(1));
        let strip_bytes = r * i * d.size();
        let mut first = None;
        for (s, (src, dst)) in inp.chunks_exact(strip_bytes).zip(out.chunks_exact_mut(strip_bytes)).enumerate() {
            for (p, (a, b)) in src.chunks(rows * r * d.size()).zip(dst.chunks_mut(rows * r * d.size())).enumerate() {
                w.resize(a.len() / d.size(), 0.0);
                d.decode_serial(a, w);
                for (k, op) in ops.iter().enumerate() {
                    // rounded between ops, as the passes round each op's result (the last by encoding)
                    op.apply_view(w, row0 / r + s, p * rows, per_a, scratch, k + 1 < ops.len());
                }
                d.encode_serial(w, b);
                if check_finite && first.is_none() {
                    first = d.first_new_non_finite_serial(a, b).map(|k| s * r * i + p * rows * r + k);
                }
            }
        }
        first
    }

    /// [`Strip::body`] as separate passes over the strip: decode, each op, encode, check.
    #[inline(always)]
    fn passes(self, Buffers { w, scratch }: &mut Buffers) -> Option<usize> {
        let Strip { inp, out, d, row0, i, ops, check_finite } = self;
        w.resize(inp.len() / d.size(), 0.0);
        d.decode_serial(inp, w);
        for (k, op) in ops.iter().enumerate() {
            op.apply_rows(w, row0, i, scratch, k + 1 < ops.len());
        }
        d.encode_serial(w, out);
        // while the strip is in cache, in this function's wider registers
        if check_finite {
            d.first_new_non_finite_serial(inp, out)
        } else {
            None
        }
    }
}

/// Values of a BAT strip that [`Strip::bat_in_parts`] decodes, multiplies and encodes at a time:
/// with the GEMM's result, 128 KB of f32, which stay in the core's L2 cache. (A whole strip is 1.4
/// MB of f32 at r = 64 on a 5632-column weight, and went to L3 and back in each of five passes.)
const BAT_PART_ELEMS: usize = 1 << 14;

/// The row loop of the one-pass kernels: each row of 16-bit words `src` into `dst` through
/// `$kernel` (an `unsafe fn(&[u16], &mut [u16], &[f32]) -> bool` with target features the caller
/// has checked for), a tile's length at a time, the tile filled for the row by `$fill`. Evaluates to
/// whether any part made a new inf or NaN. A macro, so that the kernel is called where
/// `Strip::run_avx2` has been inlined (AVX2) and can be inlined there; through a closure it was a call
/// for every part.
#[cfg(target_arch = "x86_64")]
macro_rules! each_part {
    ($src:expr, $dst:expr, $i:expr, $tile:expr, $fill:expr, $kernel:ident) => {{
        let (src, dst, tile): (&[u16], &mut [u16], &mut [f32]) = ($src, $dst, $tile);
        let mut newly = false;
        for (n, (a, b)) in src.chunks_exact($i).zip(dst.chunks_exact_mut($i)).enumerate() {
            $fill(n, &mut *tile);
            for (a, b) in a.chunks(tile.len()).zip(b.chunks_mut(tile.len())) {
                // SAFETY: the caller checked that the processor has the kernel's features
                newly |= unsafe { $kernel(a, b, &tile[..a.len()]) };
            }
        }
        newly
    }};
}

/// A chain that is one default/mini op on a bf16 or f32 weight (the usual single adapter), in one
/// pass: each value is decoded, has `sign·E` added in f32 and is rounded to D, in registers, with
/// the same operations as the separate passes of [`Strip::passes`] (the same bytes). Returns
/// `Some(first new non-finite)`, or None where the bytes are not aligned as words (then the passes
/// run).
#[inline(always)]
fn periodic_fused(strip: &mut Strip, et: &[f32], r: usize, sign: f32) -> Option<Option<usize>> {
    let (inp, out, d, row0, i) = (strip.inp, &mut *strip.out, strip.d, strip.row0, strip.i);
    if i == 0 {
        return Some(None);
    }
    let reps = 64usize.div_ceil(r);
    let mut tile = vec![0f32; r * reps];
    let fill = |row: usize, tile: &mut [f32]| {
        let e = &et[(row0 + row) * r..][..r];
        for chunk in tile.chunks_exact_mut(r) {
            for (x, v) in chunk.iter_mut().zip(e) {
                *x = sign * v;
            }
        }
    };
    let mut newly = false;
    match d {
        Float::BF16 => {
            let (src, dst) = (dtype::as_words::<u16>(inp)?, dtype::as_words_mut::<u16>(out)?);
            if avx2() {
                // avx2() found AVX2 on this processor
                #[cfg(target_arch = "x86_64")]
                {
                    newly = each_part!(src, dst, i, &mut tile, fill, bf16_add_avx2);
                }
            } else {
                for (n, (a, b)) in src.chunks_exact(i).zip(dst.chunks_exact_mut(i)).enumerate() {
                    fill(n, &mut tile);
                    let mut acc = 0u16;
                    for (a, b) in a.chunks(tile.len()).zip(b.chunks_mut(tile.len())) {
                        for ((x, y), t) in a.iter().zip(b.iter_mut()).zip(&tile) {
                            *y = dtype::bf16_bits(add_to_weight(f32::from_bits((*x as u32) << 16), *t));
                            acc |= u16::from(*y & 0x7f80 == 0x7f80) & u16::from(*x & 0x7f80 != 0x7f80);
                        }
                    }
                    newly |= acc != 0;
                }
            }
        }
        Float::F32 => {
            let (src, dst) = (dtype::as_words::<f32>(inp)?, dtype::as_words_mut::<f32>(out)?);
            for (n, (a, b)) in src.chunks_exact(i).zip(dst.chunks_exact_mut(i)).enumerate() {
                fill(n, &mut tile);
                let mut acc = 0u32;
                for (a, b) in a.chunks(tile.len()).zip(b.chunks_mut(tile.len())) {
                    for ((x, y), t) in a.iter().zip(b.iter_mut()).zip(&tile) {
                        *y = add_to_weight(*x, *t);
                        let (xb, yb) = (x.to_bits(), y.to_bits());
                        acc |= u32::from(yb & 0x7f80_0000 == 0x7f80_0000) & u32::from(xb & 0x7f80_0000 != 0x7f80_0000);
                    }
                }
                newly |= acc != 0;
            }
        }
        Float::F16 => {
            if !f16c() {
                return None;
            }
            // f16c() found F16C and AVX2 on this processor
            #[cfg(target_arch = "x86_64")]
            {
                let (src, dst) = (dtype::as_words::<u16>(inp)?, dtype::as_words_mut::<u16>(out)?);
                newly = each_part!(src, dst, i, &mut tile, fill, f16_add_f16c);
            }
        }
    }
    Some(if strip.check_finite && newly { d.first_new_non_finite_serial(inp, out) } else { None })
}

/// Whether the processor has AVX2: the one-pass bf16 add's intrinsics need it.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the processor converts f16 in hardware (F16C, with AVX2): the one-pass f16 add needs it.
fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The loop of the one-pass kernels over 16-bit words `a` with addends `t` into `b`: `$eight!(x,
/// t)` turns eight words (`__m128i`) and eight addends (`__m256`) into eight result words and a
/// mask of the new non-finite lanes; full groups of eight are loaded in place, a shorter tail
/// through padded copies (padding lanes: +0 + 0, never a new non-finite). Evaluates to whether any
/// value became inf or NaN. A macro, expanded in each kernel, so that it is compiled with that
/// kernel's target features (a closure or a plain function would not be).
#[cfg(target_arch = "x86_64")]
macro_rules! eight_at_a_time {
    ($a:expr, $b:expr, $t:expr, $eight:ident) => {{
        let (a, b, t): (&[u16], &mut [u16], &[f32]) = ($a, $b, $t);
        assert!(a.len() == b.len() && a.len() == t.len());
        let mut acc = _mm_setzero_si128();
        let full = a.len() / 8 * 8;
        for k in (0..full).step_by(8) {
            let (y, new) =
                $eight!(_mm_loadu_si128(a.as_ptr().add(k) as *const __m128i), _mm256_loadu_ps(t.as_ptr().add(k)));
            _mm_storeu_si128(b.as_mut_ptr().add(k) as *mut __m128i, y);
            acc = _mm_or_si128(acc, new);
        }
        if full < a.len() {
            let m = a.len() - full;
            let (mut xa, mut ta, mut ya) = ([0u16; 8], [0f32; 8], [0u16; 8]);
            xa[..m].copy_from_slice(&a[full..]);
            ta[..m].copy_from_slice(&t[full..]);
            let (y, new) = $eight!(_mm_loadu_si128(xa.as_ptr() as *const __m128i), _mm256_loadu_ps(ta.as_ptr()));
            _mm_storeu_si128(ya.as_mut_ptr() as *mut __m128i, y);
            b[full..].copy_from_slice(&ya[..m]);
            acc = _mm_or_si128(acc, new);
        }
        _mm_movemask_epi8(acc) != 0
    }};
}

/// `b = R_f16(a + t)` for f16 words `a`, eight at a time with F16C, as the separate passes do it
/// (half's slice conversions use the same instructions where the processor has them): decode,
/// [`add_to_weight`], round to nearest even. Returns whether a finite value became inf or NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_add_f16c(a: &[u16], b: &mut [u16], t: &[f32]) -> bool {
    use std::arch::x86_64::*;
    let quiet = _mm256_castsi256_ps(_mm256_set1_epi32(0x0040_0000));
    let exp = _mm_set1_epi16(0x7c00);
    // eight values from `x` (f16 words) and `t`: their f16 sum, and the new non-finite lanes (a
    // macro, not a closure: a closure would not be compiled with this function's F16C and AVX2)
    macro_rules! eight {
        ($x:expr, $t:expr) => {{
            let (x, t): (__m128i, __m256) = ($x, $t);
            let w = _mm256_cvtph_ps(x);
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(w, w);
            let v = _mm256_blendv_ps(_mm256_add_ps(w, t), _mm256_or_ps(w, quiet), nan);
            let y = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            let was = _mm_cmpeq_epi16(_mm_and_si128(x, exp), exp);
            let is = _mm_cmpeq_epi16(_mm_and_si128(y, exp), exp);
            (y, _mm_andnot_si128(was, is))
        }};
    }
    eight_at_a_time!(a, b, t, eight)
}

/// `b = R_bf16(a + t)` for bf16 words `a`, eight at a time in AVX2: the operations of the separate
/// passes (decode, [`add_to_weight`], `bf16_bits`). Returns whether a finite value became inf or NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_add_avx2(a: &[u16], b: &mut [u16], t: &[f32]) -> bool {
    use std::arch::x86_64::*;
    let quiet = _mm256_set1_epi32(0x0040_0000);
    let bias = _mm256_set1_epi32(0x7fff);
    let one = _mm256_set1_epi32(1);
    let nan_bit = _mm256_set1_epi32(0x40);
    let exp = _mm_set1_epi16(0x7f80);
    macro_rules! eight {
        ($x:expr, $t:expr) => {{
            let (x, t): (__m128i, __m256) = ($x, $t);
            let w = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(x)));
            let wnan = _mm256_cmp_ps::<_CMP_UNORD_Q>(w, w);
            let v = _mm256_blendv_ps(_mm256_add_ps(w, t), _mm256_or_ps(w, _mm256_castsi256_ps(quiet)), wnan);
            let vb = _mm256_castps_si256(v);
            let hi = _mm256_srli_epi32::<16>(vb);
            let rounded =
                _mm256_srli_epi32::<16>(_mm256_add_epi32(vb, _mm256_add_epi32(bias, _mm256_and_si256(hi, one))));
            let vnan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            let y32 = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, nan_bit), vnan);
            // 32-bit lanes 0-3 and 4-7 sit in the two 128-bit halves: pack them in order
            let y = _mm_packus_epi32(_mm256_castsi256_si128(y32), _mm256_extracti128_si256::<1>(y32));
            let was = _mm_cmpeq_epi16(_mm_and_si128(x, exp), exp);
            let is = _mm_cmpeq_epi16(_mm_and_si128(y, exp), exp);
            (y, _mm_andnot_si128(was, is))
        }};
    }
    eight_at_a_time!(a, b, t, eight)
}

/// `w + t` for a weight `w`, where a NaN weight gives that NaN (quieted), as x86's add and torch's
/// `W + Δ` do. Which operand's NaN a sum of two NaNs keeps is otherwise the compiler's choice, and
/// the one-pass and the separate-pass adds must give the same bytes.
#[inline(always)]
fn add_to_weight(w: f32, t: f32) -> f32 {
    let v = w + t;
    if w.is_nan() {
        f32::from_bits(w.to_bits() | 0x0040_0000)
    } else {
        v
    }
}

pub fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// Default and mini on rows `row0..`: `W'[o,c] = R_D(W[o,c] ± E[c mod r, o mod cols])`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn periodic_rows(w: &mut [f32], row0: usize, i: usize, et: &[f32], r: usize, sign: f32, rd: Rounding, round: bool) {
    // The row's pattern E[c mod r] tiled to a length of at least 64, so the inner loop vectorises.
    let reps = 64usize.div_ceil(r);
    let mut tile = vec![0f32; r * reps];
    for (n, row) in w.chunks_exact_mut(i).enumerate() {
        let e = &et[(row0 + n) * r..][..r];
        for chunk in tile.chunks_exact_mut(r) {
            for (x, v) in chunk.iter_mut().zip(e) {
                *x = sign * v;
            }
        }
        for part in row.chunks_mut(tile.len()) {
            for (x, d) in part.iter_mut().zip(&tile) {
                *x = add_to_weight(*x, *d);
            }
        }
        if round {
            rd.weight.round(row);
        }
    }
}

/// Where a run of a strip's view rows sits: rows `k0..` of strip `strip` (rows `strip·r..` of the
/// weight) of the weight's `blocks` strips, read as `[I, r]` with `per_a = I / r` view rows a tile
/// row.
#[derive(Clone, Copy)]
struct View {
    strip: usize,
    k0: usize,
    per_a: usize,
    blocks: usize,
}

impl View {
    /// Where view row `k0 + n` lands in PEFT's product of the tiles, `[I/r, O/r, r, r]` (torch's
    /// batched matmul writes it contiguous): the index of its first element, row `a` of tile
    /// `(strip, j)`, `((j·O/r + strip)·r + a)·r` ([`heads_as_mkl`] needs its alignment).
    fn product_row(&self, n: usize, r: usize) -> usize {
        let k = self.k0 + n;
        ((k % self.per_a * self.blocks + self.strip) * r + k / self.per_a) * r
    }
}

/// `dst = lhs·rhs` on the view rows `at`, summed as PEFT's torch sums them on the processor `sums`
/// names: [`gemm()`], and where MKL sums the heads of some rows otherwise, those again
/// ([`heads_as_mkl`]). The GEMM of BAT's merge and of its unmerge.
#[inline(always)]
fn gemm_as_torch(dst: &mut [f32], lhs: &[f32], rhs: &[f32], r: usize, sums: BatSums, at: View) {
    gemm(dst, lhs, rhs, lhs.len() / r, r, sums);
    if sums.splits_heads(r) {
        heads_as_mkl(dst, lhs, rhs, r, |n| at.product_row(n, r));
    }
}

/// BAT merge on the view rows `k0..k0 + w.len() / r` of one strip, with the strip's block `bi`:
/// for every output block row `i` and column block `j`, `W'_ij = W_ij + R_D(W_ij·B_i + B_i)` (or
/// `W_ij + W_ij·B_i + B_i` with `rd.once`), not yet rounded to D ([`Prepared::apply_view`]).
///
/// The row strip `W[i·r..(i+1)·r, :]` is contiguous; read as an `[I, r]` row-major matrix its rows
/// are the rows of the tiles `W_ij`, so one GEMM `[I, r]·[r, r]` does the whole strip (or any run
/// of its view rows). View row `k` belongs to tile row `a = k / per_a`, `per_a = I / r`.
#[inline(always)]
fn bat_merge_view(w: &mut [f32], at: View, bi: &[f32], r: usize, rd: Rounding, delta: &mut Vec<f32>) {
    delta.resize(w.len(), 0.0);
    bat_delta_view(delta, w, at, bi, r, rd.sums);
    for (drow, wrow) in delta.chunks_exact_mut(r).zip(w.chunks_exact_mut(r)) {
        if !rd.once {
            rd.weight.round(drow);
        }
        for (x, d) in wrow.iter_mut().zip(drow.iter()) {
            *x += d;
        }
    }
}

/// `delta = W_ij·B_i + B_i` on the view rows `k0..` of one strip, as [`bat_merge_view`] reads them.
#[inline(always)]
fn bat_delta_view(delta: &mut [f32], w: &[f32], at: View, bi: &[f32], r: usize, sums: BatSums) {
    gemm_as_torch(delta, w, bi, r, sums, at);
    for (k, drow) in delta.chunks_exact_mut(r).enumerate() {
        for (d, bv) in drow.iter_mut().zip(&bi[((at.k0 + k) / at.per_a) * r..][..r]) {
            *d = plus_zero(*d) + bv;
        }
    }
}

/// BAT unmerge on the view rows `k0..` of one strip, as [`bat_merge_view`]:
/// `W_ij = (W'_ij − B_i)·inv_i`, `inv` the `(I + B_i)⁻¹`, not yet rounded to D. On a weight of a
/// single block row or column, where [`BatSums::dots_single_blocks`], the product is MKL's dot
/// products (view row `k` starts at `strip·r·I + k·r` in the weight), or where PEFT holds the
/// weight column-major (`transposed`, [`mark_transposed`]) its in-order sums without the heads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bat_unmerge_view(
    w: &mut [f32],
    at: View,
    bi: &[f32],
    invi: &[f32],
    r: usize,
    sums: BatSums,
    transposed: bool,
    diff: &mut Vec<f32>,
) {
    let n = w.len() / r;
    diff.resize(n * r, 0.0);
    for (k, (drow, wrow)) in diff.chunks_exact_mut(r).zip(w.chunks_exact(r)).enumerate() {
        let brow = &bi[((at.k0 + k) / at.per_a) * r..][..r];
        for ((d, x), bv) in drow.iter_mut().zip(wrow).zip(brow) {
            *d = x - bv;
        }
    }
    if sums.dots_single_blocks(r) && (at.blocks == 1 || at.per_a == 1) {
        if transposed {
            gemm(w, diff, invi, n, r, sums);
        } else {
            let i = at.per_a * r;
            dots_as_mkl(w, diff, invi, r, |n| at.strip * r * i + (at.k0 + n) * r);
        }
    } else {
        gemm_as_torch(w, diff, invi, r, sums, at);
    }
    w.iter_mut().for_each(|x| *x = plus_zero(*x));
}

/// The BAT delta `Δ_ij = W_ij·B_i + B_i` of a whole weight, in f32 without rounding (what PEFT's
/// `get_delta_weight` returns on an Intel processor; the LoRA conversion approximates it).
pub fn bat_delta(w: &[f32], o: usize, i: usize, b: &[f32], r: usize) -> Vec<f32> {
    check_bat(w, o, i, b, r);
    let mut delta = vec![0f32; o * i];
    delta.par_chunks_mut(r * i).zip(w.par_chunks(r * i)).enumerate().for_each(|(s, (d, strip))| {
        let at = View { strip: s, k0: 0, per_a: i / r, blocks: o / r };
        bat_delta_view(d, strip, at, &b[s * r * r..][..r * r], r, BatSums::Intel);
    });
    delta
}

/// Whole-tensor default/mini merge (`sign = 1`) or unmerge (`sign = -1`) on f32 values.
pub fn add_periodic(w: &mut [f32], o: usize, i: usize, et: &[f32], r: usize, sign: f32, rd: Rounding) {
    assert_eq!((w.len(), et.len()), (o * i, o * r));
    let h = (TASK_ELEMS / i.max(1)).max(1);
    w.par_chunks_mut(h * i).enumerate().for_each(|(t, rows)| periodic_rows(rows, t * h, i, et, r, sign, rd, true));
}

/// Whole-tensor BAT merge on f32 values.
pub fn bat_merge(w: &mut [f32], o: usize, i: usize, b: &[f32], r: usize, rd: Rounding) {
    check_bat(w, o, i, b, r);
    apply_strips(w, i, &Prepared::BatMerge { b: b.to_vec(), r, rounding: rd });
}

/// Whole-tensor BAT unmerge on f32 values.
pub fn bat_unmerge(w: &mut [f32], o: usize, i: usize, b: &[f32], inv: &[f32], r: usize, rd: Rounding) {
    check_bat(w, o, i, b, r);
    assert_eq!(inv.len(), b.len());
    apply_strips(w, i, &Prepared::BatUnmerge { b: b.to_vec(), inv: inv.to_vec(), r, rounding: rd, transposed: false });
}

/// A BAT op on a whole weight of `i` columns, a strip per task, rounded to D.
fn apply_strips(w: &mut [f32], i: usize, op: &Prepared) {
    let r = op.row_multiple();
    w.par_chunks_mut(r * i).enumerate().for_each_init(Vec::new, |scratch, (s, strip)| {
        op.apply_view(strip, s, 0, i / r, scratch, true);
    });
}

fn check_bat(w: &[f32], o: usize, i: usize, b: &[f32], r: usize) {
    assert!(r > 0 && o.is_multiple_of(r) && i.is_multiple_of(r), "BAT needs O and I divisible by r");
    assert_eq!(w.len(), o * i);
    assert_eq!(b.len(), (o / r) * r * r);
}

/// xorshift64: deterministic values for the small problems that the run-time checks and the GPU
/// benchmark compute (no rand crate). The state must not be 0.
pub struct Xorshift(pub u64);

impl Xorshift {
    /// The next value, in [-scale/2, scale/2).
    pub fn next(&mut self, scale: f32) -> f32 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        ((*x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
    }

    /// The next `n` values, in [-scale/2, scale/2).
    pub fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(scale)).collect()
    }
}

/// The inverses `(I + B_i)⁻¹` of every block of a BAT layer, computed in f64 and stored as f32.
pub struct BatInverses {
    pub inv: Vec<f32>,
    /// The 1-norm condition number of each `I + B_i` (from the f64 inverse).
    pub cond: Vec<f64>,
}

/// A block `I + B_i` that has no usable inverse.
#[derive(Debug, Clone, PartialEq)]
pub struct SingularBlock {
    pub block: usize,
    pub cond: f64,
}

/// Beyond this 1-norm condition number `I + B_i` is singular to f64 precision.
pub const SINGULAR_COND: f64 = 1e14;

pub fn bat_inverses(b: &[f32], r: usize) -> Result<BatInverses, SingularBlock> {
    assert!(r > 0 && b.len().is_multiple_of(r * r));
    let results: Vec<Result<(Vec<f32>, f64), SingularBlock>> = b
        .par_chunks(r * r)
        .enumerate()
        .map(|(block, bi)| {
            let m = Mat::<f64>::from_fn(r, r, |x, y| bi[x * r + y] as f64 + if x == y { 1.0 } else { 0.0 });
            let inv = m.partial_piv_lu().inverse();
            // A zero pivot leaves NaNs (which max() would skip) or garbage: check that it inverts.
            let finite = (0..r).all(|x| (0..r).all(|y| inv[(x, y)].is_finite()));
            let residual = (&m * &inv - Mat::<f64>::identity(r, r)).norm_max();
            let cond = if finite { norm1(m.as_ref()) * norm1(inv.as_ref()) } else { f64::INFINITY };
            if !finite || cond > SINGULAR_COND || residual.is_nan() || residual >= 1e-6 {
                return Err(SingularBlock { block, cond });
            }
            let mut out = vec![0f32; r * r];
            for x in 0..r {
                for y in 0..r {
                    out[x * r + y] = inv[(x, y)] as f32;
                }
            }
            Ok((out, cond))
        })
        .collect();
    let mut inv = Vec::with_capacity(b.len());
    let mut cond = Vec::with_capacity(b.len() / (r * r));
    for res in results {
        let (blk, c) = res?;
        inv.extend_from_slice(&blk);
        cond.push(c);
    }
    Ok(BatInverses { inv, cond })
}

/// [`bat_inverses`], but at the r where bone-tool knows how PEFT's torch inverts `I + B_i` in f32
/// on the processor `sums` names ([`BatSums::inverts_as_torch`]), those f32 inverses
/// ([`inverse_as_torch`]): PEFT's BAT unmerge, byte for byte. Elsewhere the f64 inverses, which
/// are the more accurate (PEFT's differ from them in the last bits).
pub fn bat_inverses_as_torch(b: &[f32], r: usize, sums: BatSums) -> Result<BatInverses, SingularBlock> {
    let mut inv = bat_inverses(b, r)?;
    if sums.inverts_as_torch(r) {
        inv.inv.par_chunks_mut(r * r).zip(b.par_chunks(r * r)).enumerate().for_each(|(block, (out, bi))| {
            let torch = inverse_as_torch(bi, r, sums, block);
            // (the f64 check above passed: a finite f32 inverse; should it not be, keep f64's)
            if torch.iter().all(|x| x.is_finite()) {
                out.copy_from_slice(&torch);
            }
        });
    }
    Ok(inv)
}

/// `(I + B)⁻¹` in f32 as torch's `inverse` computes it on the CPU, through MKL's `getrf` and
/// `getrs`, for r up to 128 (149 on the AMD processor; measured on the Intel processor at every r from 1 to 16: 100 random
/// blocks each, torch's `lu_factor` and `lu_solve` apart, and the fixtures' f32 BAT unmerges at
/// r = 4, 8, 12 and 16; on the AMD processor at every r to 16, 3,000 random blocks each, and
/// PEFT's unmerges at r = 4, 8, 12 and 16 (`unmerged-amd`), and from 17 to 149 [`crout`]'s; on
/// the Intel processor from r = 17 to 128
/// [`panels::inverse`], whose doc says how). Up to r = 16:
/// - `I + B` rounded to f32; an LU factorisation with partial pivoting, right-looking: for each
///   column k the first row of largest magnitude swapped up, the column below the pivot
///   multiplied by the pivot's rounded reciprocal (up to r = 4 the last column's one multiplier
///   divided by it), then the trailing matrix updated `a_ij − l_ik·u_kj`;
/// - `P·I` solved forward with the unit lower factor: from r = 8 `x_i − l_ij·x_j`, j ascending;
///   below, row 1 so and each further row's products summed apart, row 1's first, then row 0's,
///   then the rest ascending, and added;
/// - and backward with the upper one: below r = 8 each row `(y_i − Σ u_ij·x_j)` multiplied by
///   `u_ii`'s rounded reciprocal (at r = 3 the last column divided by it), the sum's products
///   taken from row r − 2, then r − 1, then upwards (row r − 2's own one product subtracted from
///   y directly); from r = 8 [`backward_blocks`].
///
/// `fused`: each `a − l·u` and each product of a sum one fused multiply-add (the Intel processor)
/// or a rounded product, then a rounded addition (the AMD processor, whose solves from r = 9 go
/// in blocks of 4 rows, [`fours`], and which at r = 3 multiplies the last column by the
/// reciprocal too).
/// From r = 17 MKL's LU is recursive, on panels of 16 columns with their own orders of summing:
/// [`panels::inverse`] on the Intel processor, [`crout::inverse`] on the AMD one; above 128 not
/// modelled ([`BatSums::inverts_as_torch`]).
///
/// `block`: the block's index in the layer's `[O/r, r, r]` batch, which PEFT inverts at once:
/// torch puts block i at i·r² floats, and on the AMD processor from r = 17 where a column crosses
/// a 16-byte boundary changes some sums ([`crout`]), at an odd r from block to block.
pub fn inverse_as_torch(bi: &[f32], r: usize, sums: BatSums, block: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if gemm::hardware_fma() {
        // SAFETY: the processor has FMA (hardware_fma's check), just above.
        return unsafe { inverse_as_torch_fma(bi, r, sums, block) };
    }
    inverse_as_torch_body(bi, r, sums, block)
}

/// With the FMA instruction (`mul_add` is otherwise a call into the C library's `fmaf`, whose
/// results some libraries round twice).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn inverse_as_torch_fma(bi: &[f32], r: usize, sums: BatSums, block: usize) -> Vec<f32> {
    inverse_as_torch_body(bi, r, sums, block)
}

/// `acc + l·u`: one fused multiply-add, or a rounded product then a rounded addition
/// ([`inverse_as_torch`]'s `fused`). Inlined, so that `mul_add` is the FMA instruction in
/// [`inverse_as_torch_fma`].
#[inline(always)]
fn madd(fused: bool, acc: f32, l: f32, u: f32) -> f32 {
    if fused {
        l.mul_add(u, acc)
    } else {
        acc + l * u
    }
}

/// `acc[c] + l·src[c]` for every c: one fused multiply-add each, or the product rounded and then
/// added ([`madd`]). The inverses' row-at-a-time sums: every column's element of a row takes the
/// same steps, so `c` innermost (vector instructions) gives the same values. (`acc − l·src` is
/// this with `−l`: the same roundings.)
#[inline(always)]
fn add_products(acc: &mut [f32], l: f32, src: &[f32], fused: bool) {
    for (s, v) in acc.iter_mut().zip(src) {
        *s = madd(fused, *s, l, *v);
    }
}

/// Where the head of column `j` on `rows` ends ([`take`]), in an r×r matrix that MKL holds
/// column-major: the first of the rows whose element lies at a multiple of 4 floats (`off`: where
/// the block starts in torch's batch, mod 4), if at least 4 of the rows follow from it; else
/// `rows.start` (no head). MKL's AMD vector code takes the rows before it apart.
#[inline(always)]
fn head_end(r: usize, rows: std::ops::Range<usize>, j: usize, off: usize) -> usize {
    let end = rows.clone().find(|&i| (off + i + j * r).is_multiple_of(4)).unwrap_or(rows.end);
    if rows.end - end >= 4 {
        end
    } else {
        rows.start
    }
}

/// `v` less the products `p`, each in order, rounded; in a column's head ([`head_end`]) the
/// products 4 to 7 of each 8 (whole fours only) subtracted as one sum.
#[inline(always)]
fn take(v: f32, p: &[f32], head: bool) -> f32 {
    if !head {
        return p.iter().fold(v, |v, q| v - q);
    }
    let mut v = v;
    let mut k = 0;
    while k < p.len() {
        if k % 8 == 4 && k + 4 <= p.len() {
            v -= ((p[k] + p[k + 1]) + p[k + 2]) + p[k + 3];
            k += 4;
        } else {
            v -= p[k];
            k += 1;
        }
    }
    v
}

/// `dst[c] − sums[c]` for every c.
#[inline(always)]
fn subtract(dst: &mut [f32], sums: &[f32]) {
    for (d, s) in dst.iter_mut().zip(sums) {
        *d -= s;
    }
}

/// `I + B` of one r×r block (row-major), rounded to f32 as torch's `eye(r) + B` is.
fn identity_plus(bi: &[f32], r: usize) -> Vec<f32> {
    (0..r * r).map(|n| bi[n] + if n / r == n % r { 1.0 } else { 0.0 }).collect()
}

/// Partial pivoting at column k of the r×r `a`: the first row from k down of largest magnitude
/// in that column swapped (whole) with row k, and in `perm`.
#[inline(always)]
fn pivot(a: &mut [f32], r: usize, k: usize, perm: &mut [usize]) {
    let mut p = k;
    for i in k + 1..r {
        if a[i * r + k].abs() > a[p * r + k].abs() {
            p = i;
        }
    }
    if p != k {
        for j in 0..r {
            a.swap(k * r + j, p * r + j);
        }
        perm.swap(k, p);
    }
}

/// `P·I` for the LU's row order `perm`: row i is the unit vector of `perm[i]`.
fn permuted_identity(perm: &[usize]) -> Vec<f32> {
    let r = perm.len();
    let mut x = vec![0f32; r * r];
    for (i, &p) in perm.iter().enumerate() {
        x[i * r + p] = 1.0;
    }
    x
}

#[inline(always)]
fn inverse_as_torch_body(bi: &[f32], r: usize, sums: BatSums, block: usize) -> Vec<f32> {
    // the Intel processor fuses each multiply-add; the AMD one rounds the product first
    let fused = sums == BatSums::Intel;
    if r > 16 {
        return if fused { panels::inverse(bi, r) } else { crout::inverse(bi, r, block * r * r % 4) };
    }
    // a − l·u, and acc + l·u
    let sub = |a: f32, l: f32, u: f32| madd(fused, a, -l, u);
    let madd = |acc: f32, l: f32, u: f32| madd(fused, acc, l, u);
    let mut a = identity_plus(bi, r);
    let mut perm: Vec<usize> = (0..r).collect();
    for k in 0..r {
        pivot(&mut a, r, k, &mut perm);
        let (d, recip) = (a[k * r + k], 1.0 / a[k * r + k]);
        // up to r = 4 the last column's one multiplier is divided out
        let divide = r <= 4 && k + 2 == r;
        for i in k + 1..r {
            a[i * r + k] = if divide { a[i * r + k] / d } else { a[i * r + k] * recip };
            let l = a[i * r + k];
            for j in k + 1..r {
                a[i * r + j] = sub(a[i * r + j], l, a[k * r + j]);
            }
        }
    }
    let mut x = permuted_identity(&perm);
    if !fused && r > 8 {
        // the AMD processor's solves, in blocks of 4 rows
        fours::solve(&mut x, &a, r, 0);
        return x;
    }
    // forward, with the unit lower factor
    for i in 1..r {
        for c in 0..r {
            x[i * r + c] = if r >= 8 || i == 1 {
                (0..i).fold(x[i * r + c], |v, j| sub(v, a[i * r + j], x[j * r + c]))
            } else {
                // below r = 8 the products summed apart (the second first), then added
                let first = -(a[i * r + 1] * x[r + c]);
                let acc = madd(first, -a[i * r], x[c]);
                x[i * r + c] + (2..i).fold(acc, |acc, j| madd(acc, -a[i * r + j], x[j * r + c]))
            };
        }
    }
    // backward, with the upper one
    if r < 8 {
        for i in (0..r).rev() {
            let recip = 1.0 / a[i * r + i];
            for c in 0..r {
                let y = x[i * r + c];
                let v = if i + 1 == r {
                    y
                } else if i + 2 == r {
                    sub(y, a[i * r + r - 1], x[(r - 1) * r + c])
                } else {
                    // the products summed apart (row r − 2's first, then r − 1's, then upwards)
                    let first = -(a[i * r + r - 2] * x[(r - 2) * r + c]);
                    let acc = madd(first, -a[i * r + r - 1], x[(r - 1) * r + c]);
                    y + (i + 1..r - 2).rev().fold(acc, |acc, j| madd(acc, -a[i * r + j], x[j * r + c]))
                };
                // (at r = 3 the Intel processor divides the last column)
                x[i * r + c] = if fused && r == 3 && c == 2 { v / a[i * r + i] } else { v * recip };
            }
        }
    } else {
        backward_blocks(&mut x, &a, r, fused);
    }
    x
}

/// The backward solve of [`inverse_as_torch`] from r = 8 on `x` (`[r, r]`) with the upper
/// factor in `a`: the rows cut into blocks of powers of two, largest first (13 rows: 8, 4, 1),
/// solved from the last block up, each block's rows first less their sums `Σ u_ij·x_j` over all
/// the rows below it (each from +0, j ascending, as a GEMM sums), then column by column (row j
/// scaled by `u_jj`, divided at r = 8 and multiplied by its rounded reciprocal otherwise, then
/// `x_i − u_ij·x_j` for the block's rows above it, j descending). (MKL recurses: the largest
/// power of two on top, the rest below, that first; unrolled.) Inlined into
/// [`inverse_as_torch_fma`], so that `mul_add` is the FMA instruction there (not the C library's
/// `fmaf`, which some round twice: Windows' MinGW).
#[inline(always)]
fn backward_blocks(x: &mut [f32], a: &[f32], r: usize, fused: bool) {
    let mut blocks = vec![];
    let mut lo = 0;
    while lo < r {
        let top = 1 << (usize::BITS - 1 - (r - lo).leading_zeros());
        blocks.push(lo..lo + top);
        lo += top;
    }
    for rows in blocks.into_iter().rev() {
        for i in rows.clone() {
            for c in 0..r {
                let acc = (rows.end..r).fold(0f32, |acc, j| madd(fused, acc, a[i * r + j], x[j * r + c]));
                x[i * r + c] -= acc;
            }
        }
        for j in rows.clone().rev() {
            let d = a[j * r + j];
            if r == 8 {
                x[j * r..][..r].iter_mut().for_each(|v| *v /= d);
            } else {
                let recip = 1.0 / d;
                x[j * r..][..r].iter_mut().for_each(|v| *v *= recip);
            }
            for i in rows.start..j {
                let u = a[i * r + j];
                for c in 0..r {
                    x[i * r + c] = madd(fused, x[i * r + c], -u, x[j * r + c]);
                }
            }
        }
    }
}

/// The first block whose `I + B_i` is singular, found from an f64 LU factorisation alone (a third
/// of the work of the inverses): a zero or non-finite pivot, or one negligible next to the largest.
pub fn bat_singular(b: &[f32], r: usize) -> Option<SingularBlock> {
    assert!(r > 0 && b.len().is_multiple_of(r * r));
    b.par_chunks(r * r)
        .enumerate()
        .find_first(|(_, bi)| {
            let m = Mat::<f64>::from_fn(r, r, |x, y| bi[x * r + y] as f64 + if x == y { 1.0 } else { 0.0 });
            let lu = m.partial_piv_lu();
            let u = lu.U();
            let pivots: Vec<f64> = (0..r).map(|k| u[(k, k)].abs()).collect();
            let largest = pivots.iter().cloned().fold(0.0, f64::max);
            largest.is_nan() || largest <= 0.0 || pivots.iter().any(|p| !p.is_finite() || *p <= largest * 1e-14)
        })
        .map(|(block, _)| SingularBlock { block, cond: f64::INFINITY })
}

/// Largest absolute column sum.
fn norm1(m: MatRef<'_, f64>) -> f64 {
    (0..m.ncols()).map(|c| (0..m.nrows()).map(|x| m[(x, c)].abs()).sum::<f64>()).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_as_torch_computes_it_is_an_inverse() {
        // (its bytes are PEFT's: tests/peft_fixtures.rs, the BAT unmerges at r = 8)
        let mut g = Xorshift(0x5EED_1234);
        let b = g.values(8 * 8 * 20, 0.05);
        let f64s = bat_inverses(&b, 8).unwrap().inv;
        for sums in [BatSums::Intel, BatSums::Amd] {
            for (n, bi) in b.chunks(64).enumerate() {
                let inv = inverse_as_torch(bi, 8, sums, n);
                for (k, (x, y)) in inv.iter().zip(&f64s[n * 64..][..64]).enumerate() {
                    assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "block {n} element {k}: {x} vs {y}");
                }
            }
        }
        // and the two processors' arithmetic differs somewhere
        let (a, c): (Vec<f32>, Vec<f32>) = (
            b.chunks(64).flat_map(|bi| inverse_as_torch(bi, 8, BatSums::Intel, 0)).collect(),
            b.chunks(64).flat_map(|bi| inverse_as_torch(bi, 8, BatSums::Amd, 0)).collect(),
        );
        assert!(a != c);
        // a block that needs pivoting (a zero on the diagonal of I + B)
        let mut swap = vec![0f32; 64];
        for i in 0..8 {
            swap[i * 8 + i] = -1.0;
            swap[i * 8 + (i + 1) % 8] = 1.0;
        }
        let inv = inverse_as_torch(&swap, 8, BatSums::Intel, 0);
        let want = bat_inverses(&swap, 8).unwrap().inv;
        assert!(inv.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-6), "{inv:?}");
    }

    #[test]
    fn the_inverse_as_torch_at_every_r_it_models_is_an_inverse() {
        // every way of summing (r below 8, 8, the blocks from 9 to 15, 16, the recursive LU's
        // panels and blocks from 17; the AMD processor's blocks of 4 rows and Crout panels) is an
        // inverse (their bytes are PEFT's: tests/peft_fixtures.rs, the BAT unmerges at r = 4, 8,
        // 12, 16, 24, 48 and 100); scale 0.5 (up to r = 16, then as well conditioned): rows
        // swapped often
        let mut g = Xorshift(0x1A7E_5EED);
        for r in (1..=25).chain([28, 31, 32, 33, 36, 40, 44, 47, 48, 49, 52, 60, 64, 65, 100, 128]) {
            let b = g.values(r * r * 10, 2.0 / (r.max(16) as f32).sqrt());
            let f64s = bat_inverses(&b, r).unwrap();
            for (n, bi) in b.chunks(r * r).enumerate() {
                for sums in [BatSums::Intel, BatSums::Amd] {
                    let inv = inverse_as_torch(bi, r, sums, n);
                    // f32 against f64: within the inverse's condition number's worth of f32 rounding
                    let tol = 1e-6 * f64s.cond[n].max(1.0) as f32;
                    for (k, (x, y)) in inv.iter().zip(&f64s.inv[n * r * r..][..r * r]).enumerate() {
                        assert!((x - y).abs() <= tol * y.abs().max(1.0), "r = {r} block {n} {k}: {x} vs {y}");
                    }
                }
            }
        }
    }

    /// A small deterministic generator (tests need no rand crate).
    pub(super) struct Lcg(pub(super) u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
        pub(super) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.next() * scale).collect()
        }
    }

    /// The spec's formula, element by element: `W'[o,c] = W[o,c] + B[c mod r, o mod cols]`.
    fn naive_default(w: &[f32], o: usize, i: usize, b: &[f32], r: usize, cols: usize) -> Vec<f32> {
        let mut out = w.to_vec();
        for oo in 0..o {
            for c in 0..i {
                out[oo * i + c] = w[oo * i + c] + b[(c % r) * cols + oo % cols];
            }
        }
        out
    }

    /// BAT merge tile by tile in f64: `W_ij·(I + B_i) + B_i`.
    fn naive_bat(w: &[f32], o: usize, i: usize, b: &[f32], r: usize) -> Vec<f64> {
        let mut out = vec![0f64; o * i];
        for bi in 0..o / r {
            for bj in 0..i / r {
                for a in 0..r {
                    for c in 0..r {
                        let mut s = 0f64;
                        for k in 0..r {
                            s += w[(bi * r + a) * i + bj * r + k] as f64 * b[bi * r * r + k * r + c] as f64;
                        }
                        let orig = w[(bi * r + a) * i + bj * r + c] as f64;
                        out[(bi * r + a) * i + bj * r + c] = orig + s + b[bi * r * r + a * r + c] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn default_merge_matches_formula_with_tail_columns_and_r_above_in_features() {
        let mut g = Lcg(1);
        for (o, i, r) in [(12, 10, 4), (6, 9, 9), (5, 3, 7), (40, 48, 7)] {
            let w = g.vec(o * i, 1.0);
            let b = g.vec(r * o, 0.1);
            let mut got = w.clone();
            add_periodic(&mut got, o, i, &expand_transposed(&b, r, o, o), r, 1.0, Rounding::peft(Float::F32));
            assert_eq!(got, naive_default(&w, o, i, &b, r, o), "o={o} i={i} r={r}");
        }
    }

    #[test]
    fn mini_merge_tiles_the_block_along_out_features() {
        let mut g = Lcg(2);
        let (o, i, r, mini) = (12, 10, 3, 4);
        let w = g.vec(o * i, 1.0);
        let m = g.vec(r * mini, 0.1);
        let mut got = w.clone();
        add_periodic(&mut got, o, i, &expand_transposed(&m, r, mini, o), r, 1.0, Rounding::peft(Float::F32));
        assert_eq!(got, naive_default(&w, o, i, &m, r, mini));
    }

    #[test]
    fn default_unmerge_undoes_merge_in_f32_within_rounding() {
        let mut g = Lcg(3);
        let (o, i, r) = (16, 20, 6);
        let w = g.vec(o * i, 1.0);
        let et = expand_transposed(&g.vec(r * o, 0.1), r, o, o);
        let mut x = w.clone();
        add_periodic(&mut x, o, i, &et, r, 1.0, Rounding::peft(Float::F32));
        add_periodic(&mut x, o, i, &et, r, -1.0, Rounding::peft(Float::F32));
        for (a, b) in x.iter().zip(&w) {
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * b.abs().max(0.1), "{a} vs {b}");
        }
    }

    #[test]
    fn bf16_default_merge_rounds_the_f32_sum_once() {
        let (o, i, r) = (2, 2, 1);
        let w = vec![1.0f32, 1.0, 1.0, 1.0];
        // 2^-8 is half a bf16 ulp at 1.0: the tie rounds to even (1.0); 2^-8 + 2^-12 rounds up.
        let b = vec![2f32.powi(-8), 2f32.powi(-8) + 2f32.powi(-12)];
        let mut got = w.clone();
        add_periodic(&mut got, o, i, &expand_transposed(&b, r, o, o), r, 1.0, Rounding::peft(Float::BF16));
        assert_eq!(got, vec![1.0, 1.0, 1.0 + 2f32.powi(-7), 1.0 + 2f32.powi(-7)]);
    }

    #[test]
    fn bat_merge_matches_tilewise_formula() {
        let mut g = Lcg(4);
        for (o, i, r) in [(8, 12, 4), (6, 6, 3), (16, 8, 8)] {
            let w = g.vec(o * i, 1.0);
            let b = g.vec(o * r, 0.2);
            let expect = naive_bat(&w, o, i, &b, r);
            let mut got = w.clone();
            bat_merge(&mut got, o, i, &b, r, Rounding::peft(Float::F32));
            for (k, (a, e)) in got.iter().zip(&expect).enumerate() {
                assert!((*a as f64 - e).abs() < 1e-5 * e.abs().max(1.0), "o={o} i={i} r={r} at {k}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn bat_delta_is_merge_minus_weight() {
        let mut g = Lcg(6);
        let (o, i, r) = (8, 12, 4);
        let w = g.vec(o * i, 1.0);
        let b = g.vec(o * r, 0.2);
        let expect = naive_bat(&w, o, i, &b, r);
        for (k, d) in bat_delta(&w, o, i, &b, r).iter().enumerate() {
            assert!((*d as f64 - (expect[k] - w[k] as f64)).abs() < 1e-6, "{k}");
        }
    }

    #[test]
    fn bat_unmerge_inverts_merge() {
        let mut g = Lcg(5);
        let (o, i, r) = (12, 16, 4);
        let w = g.vec(o * i, 1.0);
        let b = g.vec(o * r, 0.2);
        let mut x = w.clone();
        bat_merge(&mut x, o, i, &b, r, Rounding::peft(Float::F32));
        let inv = bat_inverses(&b, r).unwrap();
        assert!(inv.cond.iter().all(|c| *c >= 1.0 && *c < 10.0));
        bat_unmerge(&mut x, o, i, &b, &inv.inv, r, Rounding::peft(Float::F32));
        for (a, e) in x.iter().zip(&w) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
    }

    #[test]
    fn an_unmerge_after_bat_at_r_1_is_marked_transposed_until_bat_at_a_larger_r() {
        // PEFT's layouts (torch 2.15, the ops' own expressions on 8×8 to 16×24 weights): BAT at
        // r = 1 leaves a column-major weight, BAT at r = 2 or 4 a row-major one, default and mini
        // ops (also with tail columns) the layout they found
        let rd = Rounding::peft(Float::F32);
        let merge = |r: usize| Prepared::BatMerge { b: vec![0.0; r * r], r, rounding: rd };
        let unmerge = |r: usize| Prepared::BatUnmerge {
            b: vec![0.0; r * r],
            inv: vec![0.0; r * r],
            r,
            rounding: rd,
            transposed: true,
        };
        let add = Prepared::Periodic { et: vec![0.0; 4], r: 2, sign: -1.0, rounding: rd };
        let marks = |mut chain: Vec<Prepared>| {
            mark_transposed(&mut chain);
            chain
                .iter()
                .filter_map(|op| match op {
                    Prepared::BatUnmerge { transposed, .. } => Some(*transposed),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(marks(vec![unmerge(10)]), [false]);
        assert_eq!(marks(vec![unmerge(1), add.clone(), unmerge(10)]), [false, true]);
        assert_eq!(marks(vec![merge(1), unmerge(8), unmerge(9)]), [true, false]);
        assert_eq!(marks(vec![unmerge(1), unmerge(1), add.clone(), add, unmerge(11)]), [false, true, true]);
        assert_eq!(marks(vec![unmerge(2), unmerge(8)]), [false, false]);
    }

    #[test]
    fn bat_inverse_reports_the_singular_block() {
        let r = 2;
        // block 0: I + B invertible; block 1: B = -I makes I + B zero.
        let b = vec![0.1, 0.0, 0.0, 0.1, -1.0, 0.0, 0.0, -1.0];
        let err = bat_inverses(&b, r).err().expect("singular");
        assert_eq!(err.block, 1);
        // rank-deficient but not zero: [[1, 1], [1, 1]] = I + [[0, 1], [1, 0]]
        let b = vec![0.0, 1.0, 1.0, 0.0];
        assert_eq!(bat_inverses(&b, r).err().map(|e| e.block), Some(0));
        // the LU-only check agrees, and passes invertible blocks
        assert_eq!(bat_singular(&b, r).map(|e| e.block), Some(0));
        assert_eq!(bat_singular(&[0.1, 0.0, 0.0, 0.1, -1.0, 0.0, 0.0, -1.0], r).map(|e| e.block), Some(1));
        assert_eq!(bat_singular(&[0.1, 0.2, -0.3, 0.1], r), None);
    }

    #[test]
    fn bat_sums_of_negative_zero_products_are_plus_zero_as_on_a_gpu() {
        // faer gives -0 where all of an element's products are -0 (here, r = 8); a sum from +0, as
        // the GPU's kernel and PEFT's BLAS start it, gives +0, and so must the CPU.
        let r = 8;
        let rd = Rounding::peft(Float::F32);
        // unmerge with B = 0 (inverse I): row 0 of W' is -0 then -1s, so element [0, 0] sums
        // -0·1 and -1·(+0)s
        let mut w = vec![-1.0f32; r * r];
        w[0] = -0.0;
        let b = vec![0.0f32; r * r];
        let inv = bat_inverses(&b, r).unwrap().inv;
        bat_unmerge(&mut w, r, r, &b, &inv, r, rd);
        assert_eq!(w[0].to_bits(), 0, "unmerge: {}", w[0]);
        assert!(w[1..r].iter().all(|&x| x == -1.0));
        // merge: element [1, 0] (tile row a = 1, column j = 0): W[1, 0] = -0, W[1, 1] = 1 against
        // B[1, 0] = -0, the other W[1, k] = -1 against +0: every product -0; the `+ B_i` term is
        // B[1, 0] = -0 too, and W[1, 0] + Δ is +0 only if the GEMM's sum was
        let mut w = vec![-1.0f32; r * r];
        (w[r], w[r + 1]) = (-0.0, 1.0);
        let mut b = vec![0.0f32; r * r];
        b[r] = -0.0;
        bat_merge(&mut w, r, r, &b, r, rd);
        assert_eq!(w[r].to_bits(), 0, "merge: {}", w[r]);
        // bat_delta: the same Δ, +0 + -0 = +0
        let mut w = vec![-1.0f32; r * r];
        (w[r], w[r + 1]) = (-0.0, 1.0);
        assert_eq!(bat_delta(&w, r, r, &b, r)[r].to_bits(), 0);
    }

    #[test]
    fn bat_merge_rounds_delta_before_adding_like_peft() {
        // One 1x1 tile: W = 1, B = 2^-9 + 2^-10. Δ = W·B + B = 2^-8 + 2^-9 (exact in f32).
        // PEFT: R_bf16(Δ) = 2^-8 + 2^-9 (representable), W + Δ = 1.01171875 → R_bf16 = 1 + 2^-7 (above the tie).
        // A case where the double rounding differs: W = 1, Δ just below half an ulp after its own rounding.
        let w0 = 1.0f32;
        let b0 = 2f32.powi(-9) - 2f32.powi(-20); // Δ = 2^-8 - 2^-19 → R_bf16(Δ) = 2^-8 (rounds up)
        let mut peft = vec![w0];
        bat_merge(&mut peft, 1, 1, &[b0], 1, Rounding::peft(Float::BF16));
        let mut once = vec![w0];
        bat_merge(&mut once, 1, 1, &[b0], 1, Rounding { once: true, ..Rounding::peft(Float::BF16) });
        // PEFT: 1 + 2^-8 is a tie → 1.0 (even). Once: 1 + 2^-8 - 2^-19 is below the tie → 1.0 too;
        // both agree here, and each equals the independent computation:
        assert_eq!(peft, vec![1.0]);
        assert_eq!(once, vec![1.0]);
        // Δ slightly above a bf16 tie at its own scale, so that R(Δ) moves it onto the W tie upward:
        let b1 = 2f32.powi(-9) + 2f32.powi(-21); // Δ = 2^-8 + 2^-20: R_bf16(Δ) = 2^-8; W+2^-8 ties to 1.0
        let mut peft = vec![w0];
        bat_merge(&mut peft, 1, 1, &[b1], 1, Rounding::peft(Float::BF16));
        let mut once = vec![w0];
        bat_merge(&mut once, 1, 1, &[b1], 1, Rounding { once: true, ..Rounding::peft(Float::BF16) });
        assert_eq!(peft, vec![1.0], "double rounding: the delta lost the bit that breaks the tie");
        assert_eq!(once, vec![1.0 + 2f32.powi(-7)], "single rounding keeps it");
    }

    /// A whole weight's bytes `src` (`i` columns), moved `shift` bytes off its alignment, through
    /// `ops` as one strip, checked for new inf/NaN: [`Strip::body`]'s way must give the bytes and
    /// the first new non-finite of [`Strip::passes`]; returns that index.
    fn body_against_passes(
        src: &[u8],
        shift: usize,
        d: Float,
        i: usize,
        ops: &[Prepared],
        what: &str,
    ) -> Option<usize> {
        let mut padded = vec![0u8; src.len() + shift];
        padded[shift..].copy_from_slice(src);
        let inp = &padded[shift..];
        let (mut body, mut passes) = (vec![0u8; inp.len() + shift], vec![0u8; inp.len()]);
        let strip = |out| Strip { inp, out, d, row0: 0, i, ops, check_finite: true };
        let buffers = || Buffers { w: vec![], scratch: vec![] };
        let a = strip(&mut body[shift..]).body(&mut buffers());
        let p = strip(&mut passes).passes(&mut buffers());
        assert!(body[shift..] == passes[..], "{what} shift={shift}");
        assert_eq!(a, p, "{what} shift={shift}: first new non-finite");
        a
    }

    #[test]
    fn bat_in_parts_gives_the_bytes_of_the_separate_passes() {
        // a single BAT merge or unmerge runs each strip in parts of view rows; it must equal the
        // strip done whole in passes: r below and above 8 (fused_from) and beyond Intel's one block of 384,
        // several parts to a strip with a short last one, two strips, and a weight that overflows
        // in a later part (the first new inf's index); aligned or not
        let mut g = Lcg(12);
        for d in [Float::BF16, Float::F32, Float::F16] {
            let big = match d {
                Float::BF16 => 3.389_531_4e38,
                Float::F16 => 65504.0,
                Float::F32 => f32::MAX,
            };
            for (r, i) in [(3, 5469), (8, 2056), (64, 320), (392, 784)] {
                let o = 2 * r;
                let rows = (BAT_PART_ELEMS / r).max(1);
                assert!(i > rows && i % rows != 0, "several parts, the last one short");
                let mut w = g.vec(o * i, 2.0);
                // positive blocks: a huge weight's delta is huge and of its sign
                let b: Vec<f32> = g.vec(o * r, 1.0).iter().map(|x| x.abs() + 0.1).collect();
                let inv = bat_inverses(&b, r).expect("I + B is invertible").inv;
                for k in [rows * r + 5, o * i - 1] {
                    w[k] = big;
                }
                let mut src = vec![0u8; o * i * d.size()];
                d.encode_serial(&w, &mut src);
                let merge = Prepared::BatMerge { b: b.clone(), r, rounding: Rounding::peft(d) };
                let unmerge =
                    Prepared::BatUnmerge { b: b.clone(), inv, r, rounding: Rounding::peft(d), transposed: false };
                let once = Prepared::BatMerge {
                    b: b.iter().map(|x| x * 0.5).collect(),
                    r,
                    rounding: Rounding { once: true, ..Rounding::peft(d) },
                };
                let chains = [
                    ("merge", vec![merge.clone()], true),
                    ("unmerge", vec![unmerge.clone()], false),
                    // stacked: rounded to D between the ops
                    ("merge, merge once", vec![merge.clone(), once], true),
                    ("merge, unmerge", vec![merge, unmerge], false),
                ];
                for (name, ops, overflows) in chains {
                    for shift in [0, 1] {
                        let what = format!("{d:?} r={r} i={i} {name}");
                        let a = body_against_passes(&src, shift, d, i, &ops, &what);
                        if overflows {
                            assert!(a.is_some_and(|k| k >= rows * r), "{what}: the overflow in a later part");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn one_pass_default_add_gives_the_bytes_of_the_separate_passes() {
        // single default/mini adds take the one-pass loop (f16 where the processor has F16C); it
        // must equal decode, add, encode and check as separate passes, on every kind of value:
        // ties, overflow to inf, inputs already inf or NaN, -0, subnormals, tail columns (f16:
        // eight at a time and a padded tail); aligned or not
        let mut g = Lcg(11);
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            -f32::MAX,
            1.0e-40,
            -1.0e-40,
            1.0 + 2f32.powi(-8),
            3.3895314e38,
            65504.0,
            65519.0,
            6.0e-8,
            -3.0e-5,
            1.0,
        ];
        for d in [Float::BF16, Float::F32, Float::F16] {
            for (o, i, r, cols, sign) in [
                (6, 10, 4, 6, 1.0f32),
                (5, 7, 3, 1, -1.0),
                (3, 130, 64, 3, 1.0),
                (4, 3, 9, 2, 1.0),
                (2, 77, 5, 2, -1.0),
            ] {
                let mut w = g.vec(o * i, 4.0);
                for (k, v) in w.iter_mut().enumerate().filter(|(k, _)| k % 3 == 0) {
                    *v = specials[k / 3 % specials.len()];
                }
                let mut block = g.vec(r * cols, 1.0);
                block[0] = f32::MAX; // a finite weight plus this overflows
                let n = block.len();
                block[1 % n] = f32::NAN;
                let et = expand_transposed(&block, r, cols, o);
                let ops = [Prepared::Periodic { et, r, sign, rounding: Rounding::peft(d) }];
                let mut src = vec![0u8; o * i * d.size()];
                d.encode_serial(&w, &mut src);
                // shifted by a byte, the words are unaligned and the passes run instead
                for shift in [0, 1] {
                    let a = body_against_passes(&src, shift, d, i, &ops, &format!("{d:?} o={o} i={i} r={r}"));
                    assert!(a.is_some(), "{d:?}: the overflow is found");
                }
            }
        }
    }
}
