//! Float element types bone-tool computes on, and their byte encodings.
//!
//! Every computation runs in f32. `round` reproduces what torch does when it stores an f32 result
//! into a narrower tensor (`.to(dtype)`): round to nearest, ties to even.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;
use safetensors::Dtype;

/// The float types a weight or block may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    F32,
    F16,
    BF16,
}

/// Elements per parallel task when converting whole tensors.
const PAR_CHUNK: usize = 1 << 16;

impl Float {
    pub fn from_dtype(d: Dtype) -> Option<Float> {
        match d {
            Dtype::F32 => Some(Float::F32),
            Dtype::F16 => Some(Float::F16),
            Dtype::BF16 => Some(Float::BF16),
            _ => None,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            Float::F32 => Dtype::F32,
            Float::F16 => Dtype::F16,
            Float::BF16 => Dtype::BF16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::BF16 => 2,
        }
    }

    /// The name safetensors and torch users know (`F32`, `BF16`, …).
    pub fn name(self) -> &'static str {
        match self {
            Float::F32 => "F32",
            Float::F16 => "F16",
            Float::BF16 => "BF16",
        }
    }

    /// The largest finite value of this type.
    pub fn max_finite(self) -> f32 {
        match self {
            Float::F32 => f32::MAX,
            Float::BF16 => half::bf16::MAX.to_f32(),
            Float::F16 => half::f16::MAX.to_f32(),
        }
    }

    /// Round every value to this type's precision (the value stays an f32).
    #[inline(always)]
    pub fn round(self, xs: &mut [f32]) {
        match self {
            Float::F32 => {}
            Float::BF16 => xs.iter_mut().for_each(|x| *x = f32::from_bits((bf16_bits(*x) as u32) << 16)),
            // through half's slice conversions, 8 lanes at a time with F16C where the processor has
            // it (element by element, each conversion checked for F16C, it took twice as long)
            Float::F16 => {
                let mut h = [f16::ZERO; 64];
                for c in xs.chunks_mut(64) {
                    let h = &mut h[..c.len()];
                    h.convert_from_f32_slice(c);
                    h.convert_to_f32_slice(c);
                }
            }
        }
    }

    /// Decode little-endian elements of this type into `out` (`bytes.len() == out.len() * size`),
    /// in parallel.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), out.len() * self.size(), "decode: byte count");
        let n = self.size();
        out.par_chunks_mut(PAR_CHUNK).zip(bytes.par_chunks(PAR_CHUNK * n)).for_each(|(o, b)| self.decode_serial(b, o));
    }

    /// Encode `src` as little-endian elements of this type (rounding to nearest even), in parallel.
    pub fn encode(self, src: &[f32], out: &mut [u8]) {
        assert_eq!(out.len(), src.len() * self.size(), "encode: byte count");
        let n = self.size();
        out.par_chunks_mut(PAR_CHUNK * n).zip(src.par_chunks(PAR_CHUNK)).for_each(|(o, s)| self.encode_serial(s, o));
    }

    /// Decode on the calling thread.
    #[inline(always)]
    pub fn decode_serial(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), out.len() * self.size(), "decode: byte count");
        match self {
            Float::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Float::BF16 => match as_words::<u16>(bytes) {
                Some(words) => {
                    for (o, w) in out.iter_mut().zip(words) {
                        *o = f32::from_bits((*w as u32) << 16);
                    }
                }
                None => {
                    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                    }
                }
            },
            Float::F16 => match as_words::<u16>(bytes) {
                // half converts slices with F16C where the processor has it
                Some(words) => words.reinterpret_cast::<f16>().convert_to_f32_slice(out),
                None => {
                    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
            },
        }
    }

    /// Encode on the calling thread.
    #[inline(always)]
    pub fn encode_serial(self, src: &[f32], out: &mut [u8]) {
        assert_eq!(out.len(), src.len() * self.size(), "encode: byte count");
        match self {
            Float::F32 => {
                for (c, x) in out.chunks_exact_mut(4).zip(src) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
            Float::BF16 => match as_words_mut::<u16>(out) {
                Some(words) => {
                    for (w, x) in words.iter_mut().zip(src) {
                        *w = bf16_bits(*x);
                    }
                }
                None => {
                    for (c, x) in out.chunks_exact_mut(2).zip(src) {
                        c.copy_from_slice(&bf16_bits(*x).to_le_bytes());
                    }
                }
            },
            Float::F16 => match as_words_mut::<u16>(out) {
                Some(words) => words.reinterpret_cast_mut::<f16>().convert_from_f32_slice(src),
                None => {
                    for (c, x) in out.chunks_exact_mut(2).zip(src) {
                        c.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
                    }
                }
            },
        }
    }
}

impl Float {
    /// Round every element of `src` (this type) to `to` (nearest even, as torch's `.to(dtype)`),
    /// in parallel. Returns the first element that was finite and overflowed to infinity.
    pub fn cast(self, to: Float, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        let (n, m) = (self.size(), to.size());
        assert_eq!(src.len() / n * m, dst.len(), "cast: byte count");
        // Only a narrower exponent can overflow: f32 -> f16/bf16, bf16 -> f16.
        let can_overflow = !matches!((self, to), (_, Float::F32) | (Float::F16, Float::BF16)) && self != to;
        const CHUNK: usize = 1 << 13;
        src.par_chunks(CHUNK * n)
            .zip(dst.par_chunks_mut(CHUNK * m))
            .enumerate()
            .filter_map(|(k, (s, d))| cast_chunk(self, to, s, d, can_overflow).map(|p| k * CHUNK + p))
            .min()
    }
}

/// One chunk of [`Float::cast`] on the calling thread: the first element that overflowed, if
/// `can_overflow`. Compiled twice, as the ops' strips: for AVX2 where the processor has it, and
/// for the baseline.
fn cast_chunk(from: Float, to: Float, s: &[u8], d: &mut [u8], can_overflow: bool) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor supports AVX2, checked just above.
        return unsafe { cast_chunk_avx2(from, to, s, d, can_overflow) };
    }
    cast_chunk_body(from, to, s, d, can_overflow)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn cast_chunk_avx2(from: Float, to: Float, s: &[u8], d: &mut [u8], can_overflow: bool) -> Option<usize> {
    cast_chunk_body(from, to, s, d, can_overflow)
}

#[inline(always)]
fn cast_chunk_body(from: Float, to: Float, s: &[u8], d: &mut [u8], can_overflow: bool) -> Option<usize> {
    const STRIP: usize = 1 << 10;
    let (n, m) = (from.size(), to.size());
    let mut vals = [0f32; STRIP];
    let mut first = None;
    for (j, (s, d)) in s.chunks(STRIP * n).zip(d.chunks_mut(STRIP * m)).enumerate() {
        let v = &mut vals[..s.len() / n];
        from.decode_serial(s, v);
        to.encode_serial(v, d);
        if can_overflow && first.is_none() {
            // an exponent of all ones in the output where the input was finite: overflow. Look
            // for one branch-free; find where only when there is one. (The rest is still cast:
            // with --allow-non-finite the caller writes it.)
            let exp = if to == Float::F16 { 0x7c00u16 } else { 0x7f80 };
            let over = |(h, x): (&[u8], &f32)| x.is_finite() & (u16::from_le_bytes([h[0], h[1]]) & exp == exp);
            if d.chunks_exact(2).zip(v.iter()).fold(false, |acc, p| acc | over(p)) {
                first = d.chunks_exact(2).zip(v.iter()).position(over).map(|p| j * STRIP + p);
            }
        }
    }
    first
}

impl Float {
    /// The first element that is finite in `before` but not in `after` (both encoded in this
    /// type): an exponent of all ones means infinity or NaN. Scans in parallel, branch-free within
    /// each chunk, so that it costs little next to the math.
    pub fn first_new_non_finite(self, before: &[u8], after: &[u8]) -> Option<usize> {
        assert_eq!(before.len(), after.len());
        const CHUNK: usize = 1 << 14;
        let n = self.size();
        before
            .par_chunks(CHUNK * n)
            .zip(after.par_chunks(CHUNK * n))
            .enumerate()
            .find_map_first(|(c, (b, a))| self.first_new_non_finite_serial(b, a).map(|k| c * CHUNK + k))
    }

    /// `to = from`, in parallel, and with `check`, [`Float::first_new_non_finite`] of `before`
    /// against the copy, each chunk checked while it is still in cache (one pass over the result
    /// rather than two: a GPU's results come back this way, from page-locked memory).
    pub fn copy_checking(self, before: &[u8], from: &[u8], to: &mut [u8], check: bool) -> Option<usize> {
        assert!(before.len() == from.len() && from.len() == to.len(), "copy_checking: byte counts");
        const CHUNK: usize = 1 << 18;
        let n = self.size();
        to.par_chunks_mut(CHUNK * n)
            .zip(from.par_chunks(CHUNK * n))
            .zip(before.par_chunks(CHUNK * n))
            .enumerate()
            .filter_map(|(c, ((t, f), b))| {
                t.copy_from_slice(f);
                if check {
                    self.first_new_non_finite_serial(b, t).map(|k| c * CHUNK + k)
                } else {
                    None
                }
            })
            .min()
    }

    /// [`Float::first_new_non_finite`] on the calling thread.
    #[inline(always)]
    pub fn first_new_non_finite_serial(self, b: &[u8], a: &[u8]) -> Option<usize> {
        let n = self.size();
        let newly = |k: usize| -> bool {
            !self.exponent_all_ones(&b[k * n..][..n]) && self.exponent_all_ones(&a[k * n..][..n])
        };
        let any = match (self, as_words::<u16>(b), as_words::<u16>(a)) {
            (Float::F16 | Float::BF16, Some(bw), Some(aw)) => {
                let m: u16 = if self == Float::F16 { 0x7c00 } else { 0x7f80 };
                let mut acc = 0u16;
                for (x, y) in bw.iter().zip(aw) {
                    acc |= u16::from(y & m == m) & u16::from(x & m != m);
                }
                acc != 0
            }
            (Float::F32, ..) => {
                // four bytes at a time, little-endian, whatever the slices' alignment
                let m = 0x7f80_0000u32;
                let word = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let mut acc = 0u32;
                for (x, y) in b.chunks_exact(4).zip(a.chunks_exact(4)) {
                    let (x, y) = (word(x), word(y));
                    acc |= u32::from(y & m == m) & u32::from(x & m != m);
                }
                acc != 0
            }
            _ => (0..b.len() / n).fold(false, |acc, k| acc | newly(k)),
        };
        if any {
            (0..b.len() / n).position(newly)
        } else {
            None
        }
    }

    /// Distance between two values of this type, in units in the last place. A NaN against a
    /// number: `u64::MAX`. Two NaNs of other bits: 1, the same value written by another conversion
    /// (torch writes every bf16 NaN that an add makes as 0xffff, or 0x7fc0 in its scalar loop).
    pub fn ulps(self, a: f32, b: f32) -> u64 {
        if a.is_nan() || b.is_nan() {
            return if a.to_bits() == b.to_bits() {
                0
            } else if a.is_nan() && b.is_nan() {
                1
            } else {
                u64::MAX
            };
        }
        let key = |v: f32| -> i64 {
            let bits = v.to_bits() as i64;
            let ordered = if bits & (1 << 31) != 0 { -(bits & 0x7fff_ffff) } else { bits };
            match self {
                Float::F32 => ordered,
                // bf16 keeps the top 16 bits of the f32 pattern; f16 has 13 fraction bits fewer
                Float::BF16 => ordered >> 16,
                Float::F16 => ordered >> 13,
            }
        };
        (key(a) - key(b)).unsigned_abs()
    }

    /// The first element where a device's results (`dev`) disagree with the CPU's (`cpu`), for one
    /// tensor or piece: each value within one unit of this dtype of the other, or, in f32, within
    /// 2⁻¹⁸ (3.8e-6) of the largest magnitude in `cpu`. One unit is what a different summation order
    /// can do once a value is rounded to f16/bf16. In f32 it can do more: BAT's r-term GEMMs round
    /// relative to the delta and to the inverse's products, which can be as large as the largest
    /// weight, so where a result is much smaller than those, two correct orders differ by several
    /// units (seen: 2 units of a 0.06 whose delta was as large). The bound stays below the 1e-5
    /// that the comparison with PEFT allows.
    pub fn disagreement(self, cpu: &[f32], dev: &[f32]) -> Option<usize> {
        assert_eq!(cpu.len(), dev.len());
        let scale = cpu.iter().fold(0f32, |m, x| if x.is_finite() { m.max(x.abs()) } else { m });
        let slack = if self == Float::F32 { scale as f64 * 2f64.powi(-18) } else { 0.0 };
        cpu.iter().zip(dev).position(|(a, b)| {
            let gap = (*a as f64 - *b as f64).abs();
            self.ulps(*a, *b) > 1 && (gap.is_nan() || gap > slack)
        })
    }

    /// [`Float::disagreement`] on encoded values: the first element that disagrees, with the CPU's
    /// value and the device's.
    pub fn disagreement_in(self, cpu: &[u8], dev: &[u8]) -> Option<(usize, f32, f32)> {
        let (mut a, mut b) = (vec![0f32; cpu.len() / self.size()], vec![0f32; dev.len() / self.size()]);
        self.decode(cpu, &mut a);
        self.decode(dev, &mut b);
        self.disagreement(&a, &b).map(|k| (k, a[k], b[k]))
    }

    /// Writes NaNs of every kind into every 7th of the encoded values `bytes`: quiet and
    /// signalling, with payloads, of either sign, in turn. For the checks that a merge or unmerge
    /// of NaN weights gives each NaN back quieted, as the CPU (x86's add and F16C, torch) does,
    /// on the GPU too, where its own arithmetic would give its canonical NaN (the host emulation's
    /// test and `examples/gpu_check.rs`).
    #[doc(hidden)]
    pub fn put_test_nans(self, bytes: &mut [u8]) {
        let words: [Vec<u8>; 4] = match self {
            Float::F32 => [0x7fc0_0001u32, 0x7f80_0001, 0xffc1_2345, 0xffa0_0000].map(|w| w.to_le_bytes().to_vec()),
            Float::F16 => [0x7e01u16, 0x7c01, 0xfe03, 0xfd00].map(|w| w.to_le_bytes().to_vec()),
            Float::BF16 => [0x7fc1u16, 0x7f81, 0xffc3, 0xffa0].map(|w| w.to_le_bytes().to_vec()),
        };
        for (n, value) in bytes.chunks_exact_mut(self.size()).step_by(7).enumerate() {
            value.copy_from_slice(&words[n % 4]);
        }
    }

    /// The largest |value| among encoded values, NaN left out (infinity counts): the largest of
    /// their magnitude bits, which order as the values do. A plain integer maximum the compiler
    /// vectorises, and a second pass that leaves NaN out only where it found one; for `verify`'s
    /// scale of every changed tensor.
    pub fn max_abs(self, bytes: &[u8]) -> f32 {
        fn largest<T: Copy + Ord + Default>(xs: impl Iterator<Item = T> + Clone, below: T) -> T {
            let all = xs.clone().fold(T::default(), Ord::max);
            if all <= below {
                all
            } else {
                xs.filter(|&b| b <= below).fold(T::default(), Ord::max)
            }
        }
        match self {
            Float::F32 => {
                let words = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff);
                f32::from_bits(largest(words, 0x7f80_0000))
            }
            Float::F16 | Float::BF16 => {
                let inf = if self == Float::F16 { 0x7c00 } else { 0x7f80 };
                let bits = match as_words::<u16>(bytes) {
                    Some(words) => largest(words.iter().map(|w| w & 0x7fff), inf),
                    None => largest(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff), inf),
                };
                let mut one = [0f32];
                self.decode_serial(&bits.to_le_bytes(), &mut one);
                one[0]
            }
        }
    }

    fn exponent_all_ones(self, e: &[u8]) -> bool {
        match self {
            Float::F32 => u32::from_le_bytes([e[0], e[1], e[2], e[3]]) & 0x7f80_0000 == 0x7f80_0000,
            Float::F16 => u16::from_le_bytes([e[0], e[1]]) & 0x7c00 == 0x7c00,
            Float::BF16 => u16::from_le_bytes([e[0], e[1]]) & 0x7f80 == 0x7f80,
        }
    }
}

/// f32 → bf16 bits, round to nearest even (as torch does); NaN stays a quiet NaN.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    // x.is_nan() is `b & 0x7fff_ffff > 0x7f80_0000`; as a float compare it vectorises in one
    // instruction, the unsigned integer compare in three
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// Element types bytes may be viewed as: plain numbers, every bit pattern a value.
///
/// # Safety
/// Only for types with no invalid bit patterns and no padding.
pub(crate) unsafe trait Word: Copy {}
// SAFETY: plain numbers, every bit pattern valid
unsafe impl Word for u16 {}
// SAFETY: as above
unsafe impl Word for f32 {}

/// View bytes as words when aligned (little-endian machines only).
pub(crate) fn as_words<T: Word>(bytes: &[u8]) -> Option<&[T]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid T (Word); align_to only yields the aligned middle part.
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

pub(crate) fn as_words_mut<T: Word>(bytes: &mut [u8]) -> Option<&mut [T]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: as in as_words.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn max_abs_of_encoded_values_leaves_nan_out() {
        for d in [Float::F32, Float::BF16, Float::F16] {
            let cases: [(&[f32], f32); 6] = [
                (&[], 0.0),
                (&[-0.0, 0.0], 0.0),
                (&[0.25, -3.5, 1.0, 2.0], 3.5),
                (&[1.0, f32::NAN, -2.0], 2.0),
                (&[f32::NAN, -f32::NAN], 0.0),
                (&[5.0, f32::NEG_INFINITY, f32::NAN], f32::INFINITY),
            ];
            for (values, expect) in cases {
                let mut bytes = vec![0u8; values.len() * d.size()];
                d.encode_serial(values, &mut bytes);
                assert_eq!(d.max_abs(&bytes), expect, "{d} {values:?}");
                // unaligned bytes take the other path
                let mut shifted = vec![0u8; bytes.len() + 1];
                shifted[1..].copy_from_slice(&bytes);
                assert_eq!(d.max_abs(&shifted[1..]), expect, "{d} {values:?} unaligned");
            }
            // against decoding, on values of every magnitude (subnormals of each type included)
            let values: Vec<f32> = (0..4000).map(|k| (k as f32 - 2000.0) * 1.7f32.powi(k % 90 - 60)).collect();
            let mut bytes = vec![0u8; values.len() * d.size()];
            d.encode_serial(&values, &mut bytes);
            let mut decoded = vec![0f32; values.len()];
            d.decode_serial(&bytes, &mut decoded);
            let expect = decoded.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(d.max_abs(&bytes), expect, "{d}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
        let mut xs = vec![1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-9)];
        Float::BF16.round(&mut xs);
        assert_eq!(xs, vec![1.0, 1.0 + 2.0 * 2f32.powi(-7), 1.0]);
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // f16 has 10 fraction bits: 1 + 2^-11 is a tie between 1 and 1 + 2^-10.
        let mut xs = vec![1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)];
        Float::F16.round(&mut xs);
        assert_eq!(xs, vec![1.0, 1.0 + 2.0 * 2f32.powi(-10)]);
    }

    #[test]
    fn f16_rounding_in_slices_is_halfs_element_by_element() {
        // every exponent, fractions around f16's rounding point (13 bits dropped) and its subnormal
        // range, both signs, specials; 2000 values so that slices of 64 and a shorter tail both run
        let mut xs = vec![0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-45, 65520.0];
        for e in 0..255u32 {
            for f in [0u32, 1, 0xfff, 0x1000, 0x1001, 0x3000, 0x7f_ffff, 0x7f_f000, 0x7f_efff] {
                xs.push(f32::from_bits((e << 23) | f));
                xs.push(-f32::from_bits((e << 23) | f));
            }
        }
        xs.push(f32::NAN);
        assert!(xs.len() > 2000 && xs.len() % 64 != 0);
        let mut rounded = xs.clone();
        Float::F16.round(&mut rounded);
        for (x, y) in xs.iter().zip(&rounded) {
            let want = f16::from_f32(*x).to_f32();
            assert!(y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()), "{x:e}: {y:e} against {want:e}");
        }
    }

    #[test]
    fn encode_decode_round_trip_is_exact_for_representable_values() {
        for t in [Float::F32, Float::F16, Float::BF16] {
            let mut xs: Vec<f32> = (0..200_000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
            t.round(&mut xs);
            let mut bytes = vec![0u8; xs.len() * t.size()];
            t.encode(&xs, &mut bytes);
            let mut back = vec![0f32; xs.len()];
            t.decode(&bytes, &mut back);
            assert_eq!(xs, back, "{t}");
        }
    }

    #[test]
    fn bf16_conversion_agrees_with_half_everywhere_that_matters() {
        // every exponent, with fraction patterns around the rounding point, both signs, specials
        let mut xs = vec![0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-45];
        for e in 0..255u32 {
            for f in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0x18000, 0x7f_ffff, 0x7f_8000, 0x7f_7fff] {
                xs.push(f32::from_bits((e << 23) | f));
                xs.push(-f32::from_bits((e << 23) | f));
            }
        }
        for x in xs {
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{x:e} ({:#x})", x.to_bits());
        }
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn finds_values_that_became_non_finite() {
        for t in [Float::F32, Float::F16, Float::BF16] {
            let enc = |v: &[f32]| {
                let mut b = vec![0u8; v.len() * t.size()];
                t.encode(v, &mut b);
                b
            };
            let before = enc(&[1.0, f32::INFINITY, 2.0, f32::NAN, 3.0]);
            assert_eq!(t.first_new_non_finite(&before, &enc(&[1.5, f32::INFINITY, 2.5, f32::NAN, 3.5])), None, "{t}");
            assert_eq!(
                t.first_new_non_finite(&before, &enc(&[1.5, 0.0, 2.5, f32::NAN, f32::NEG_INFINITY])),
                Some(4),
                "{t}"
            );
            assert_eq!(t.first_new_non_finite(&before, &enc(&[f32::NAN, 0.0, 0.0, 0.0, 0.0])), Some(0), "{t}");
        }
        // f16 overflows where f32 does not
        let mut b = vec![0u8; 2];
        Float::F16.encode(&[70000.0], &mut b);
        assert_eq!(Float::F16.first_new_non_finite(&[0, 0], &b), Some(0));
    }

    #[test]
    fn copy_checking_copies_and_finds_the_first_new_non_finite_value_across_chunks() {
        for t in [Float::F32, Float::F16, Float::BF16] {
            // three chunks and a bit, so that chunks run on several threads and the minimum matters
            let n = (1 << 18) * 3 + 5;
            let vals: Vec<f32> = (0..n).map(|k| (k % 97) as f32 - 48.0).collect();
            let mut before = vec![0u8; n * t.size()];
            t.encode(&vals, &mut before);
            let mut after_vals = vals.clone();
            after_vals[n - 2] = f32::INFINITY; // a later chunk first: the smallest index must win
            after_vals[(1 << 18) + 7] = f32::NAN;
            let mut from = vec![0u8; before.len()];
            t.encode(&after_vals, &mut from);
            let mut to = vec![0u8; before.len()];
            assert_eq!(t.copy_checking(&before, &from, &mut to, true), Some((1 << 18) + 7), "{t}");
            assert_eq!(to, from, "{t}");
            assert_eq!(t.first_new_non_finite(&before, &to), Some((1 << 18) + 7), "{t}");
            let mut unchecked = vec![0u8; before.len()];
            assert_eq!(t.copy_checking(&before, &from, &mut unchecked, false), None, "{t}");
            assert_eq!(unchecked, from, "{t}");
            // non-finite already in the input is not new
            assert_eq!(t.copy_checking(&from, &from, &mut to, true), None, "{t}");
        }
    }

    #[test]
    fn devices_disagree_beyond_one_unit_or_in_f32_beyond_the_scale_slack() {
        let unit = 2f32.powi(-7); // bf16 at 1.0
        assert_eq!(Float::BF16.disagreement(&[1.0, 0.5], &[1.0 + unit, 0.5]), None);
        assert_eq!(Float::BF16.disagreement(&[1.0, 0.5], &[1.0, 0.5 + 2.0 * unit]), Some(1));
        // f32: 0.001 off by 1e-7 (many units of 0.001) is within 2^-18 of the largest value, 1.0
        assert_eq!(Float::F32.disagreement(&[1.0, 0.001], &[1.0, 0.001 + 1e-7]), None);
        assert_eq!(Float::F32.disagreement(&[1.0, 0.001], &[1.0, 0.001 + 1e-5]), Some(1));
        assert_eq!(Float::F32.disagreement(&[1.0, 2.0], &[1.0, f32::NAN]), Some(1));
        // the same on encoded bytes, with both values
        let (mut cpu, mut dev) = ([0u8; 4], [0u8; 4]);
        Float::BF16.encode(&[1.0, 0.5], &mut cpu);
        Float::BF16.encode(&[1.0, 0.5 + 2.0 * unit], &mut dev);
        assert_eq!(Float::BF16.disagreement_in(&cpu, &dev), Some((1, 0.5, 0.5 + 2.0 * unit)));
        assert_eq!(Float::BF16.disagreement_in(&cpu, &cpu), None);
    }

    #[test]
    fn ulps_counts_units_of_the_dtype() {
        assert_eq!(Float::BF16.ulps(1.0, 1.0 + 2f32.powi(-7)), 1);
        assert_eq!(Float::F16.ulps(1.0, 1.0 + 2f32.powi(-10)), 1);
        assert_eq!(Float::F32.ulps(1.0, 1.0 + f32::EPSILON), 1);
        assert_eq!(Float::F32.ulps(-0.0, 0.0), 0);
        assert_eq!(Float::F32.ulps(f32::NAN, 1.0), u64::MAX);
        assert_eq!(Float::BF16.ulps(f32::INFINITY, f32::NAN), u64::MAX);
        let (quiet, torchs) = (f32::from_bits(0x7fc1_0000), f32::from_bits(0xffff_0000));
        assert_eq!((Float::BF16.ulps(quiet, torchs), Float::BF16.ulps(torchs, torchs)), (1, 0));
    }

    #[test]
    fn encode_matches_little_endian_layout() {
        let mut b = [0u8; 2];
        Float::BF16.encode(&[1.0], &mut b);
        assert_eq!(b, [0x80, 0x3f]); // 1.0f32 = 0x3f800000
        Float::F16.encode(&[1.0], &mut b);
        assert_eq!(b, [0x00, 0x3c]); // 1.0f16 = 0x3c00
    }

    /// Casting agrees with the half crate's conversions (round to nearest even) on every element,
    /// across chunk boundaries, and reports the first overflow.
    #[test]
    fn cast_rounds_like_half_and_finds_overflow() {
        let n = 20_000;
        let vals: Vec<f32> = (0..n).map(|k| ((k as f32) * 0.7311).sin() * 3.0 + (k as f32) * 1e-4).collect();
        let mut src = vec![0u8; n * 4];
        Float::F32.encode(&vals, &mut src);
        let mut bf = vec![0u8; n * 2];
        assert_eq!(Float::F32.cast(Float::BF16, &src, &mut bf), None);
        let mut hf = vec![0u8; n * 2];
        assert_eq!(Float::F32.cast(Float::F16, &src, &mut hf), None);
        for (k, v) in vals.iter().enumerate() {
            assert_eq!(u16::from_le_bytes([bf[2 * k], bf[2 * k + 1]]), half::bf16::from_f32(*v).to_bits());
            assert_eq!(u16::from_le_bytes([hf[2 * k], hf[2 * k + 1]]), half::f16::from_f32(*v).to_bits());
        }
        // bf16 -> f16 goes through f32 exactly, like torch's .to()
        let mut hf2 = vec![0u8; n * 2];
        Float::BF16.cast(Float::F16, &bf, &mut hf2);
        let via: Vec<u16> = (0..n)
            .map(|k| {
                half::f16::from_f32(half::bf16::from_bits(u16::from_le_bytes([bf[2 * k], bf[2 * k + 1]])).to_f32())
                    .to_bits()
            })
            .collect();
        assert_eq!(hf2.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>(), via);
        // 1e5 overflows f16 (max 65504): reported at its index, past the first chunk
        let mut big = vals.clone();
        big[9000] = 1e5;
        big[15000] = -1e6;
        Float::F32.encode(&big, &mut src);
        assert_eq!(Float::F32.cast(Float::F16, &src, &mut hf), Some(9000));
        // and every value is still cast, those after it in its chunk too (--allow-non-finite
        // writes them): inf where it overflowed
        for (k, v) in big.iter().enumerate() {
            assert_eq!(u16::from_le_bytes([hf[2 * k], hf[2 * k + 1]]), half::f16::from_f32(*v).to_bits(), "{k}");
        }
        assert_eq!(u16::from_le_bytes([hf[2 * 15000], hf[2 * 15000 + 1]]), half::f16::NEG_INFINITY.to_bits());
    }
}
