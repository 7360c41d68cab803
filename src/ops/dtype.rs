//! Float element types bone-tool computes on, and their byte encodings.
//!
//! Every computation runs in f32. `round` reproduces what torch does when it stores an f32 result
//! into a narrower tensor (`.to(dtype)`): round to nearest, ties to even.

use half::{bf16, f16};
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

    /// Round every value to this type's precision (the value stays an f32).
    pub fn round(self, xs: &mut [f32]) {
        match self {
            Float::F32 => {}
            Float::BF16 => xs.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
            Float::F16 => xs.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
    }

    /// Decode little-endian elements of this type into `out` (`bytes.len() == out.len() * size`).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), out.len() * self.size(), "decode: byte count");
        let n = self.size();
        out.par_chunks_mut(PAR_CHUNK)
            .zip(bytes.par_chunks(PAR_CHUNK * n))
            .for_each(|(o, b)| decode_serial(self, b, o));
    }

    /// Encode `src` as little-endian elements of this type (rounding to nearest even).
    pub fn encode(self, src: &[f32], out: &mut [u8]) {
        assert_eq!(out.len(), src.len() * self.size(), "encode: byte count");
        let n = self.size();
        out.par_chunks_mut(PAR_CHUNK * n)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(o, s)| encode_serial(self, s, o));
    }
}

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn decode_serial(t: Float, bytes: &[u8], out: &mut [f32]) {
    match t {
        Float::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Float::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Float::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

fn encode_serial(t: Float, src: &[f32], out: &mut [u8]) {
    match t {
        Float::F32 => {
            for (c, x) in out.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        Float::BF16 => {
            for (c, x) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        Float::F16 => {
            for (c, x) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
        let mut xs = vec![
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            1.0 + 2f32.powi(-9),
        ];
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
    fn encode_decode_round_trip_is_exact_for_representable_values() {
        for t in [Float::F32, Float::F16, Float::BF16] {
            let mut xs: Vec<f32> = (0..200_000)
                .map(|i| ((i as f32) * 0.37).sin() * 3.0)
                .collect();
            t.round(&mut xs);
            let mut bytes = vec![0u8; xs.len() * t.size()];
            t.encode(&xs, &mut bytes);
            let mut back = vec![0f32; xs.len()];
            t.decode(&bytes, &mut back);
            assert_eq!(xs, back, "{t}");
        }
    }

    #[test]
    fn encode_matches_little_endian_layout() {
        let mut b = [0u8; 2];
        Float::BF16.encode(&[1.0], &mut b);
        assert_eq!(b, [0x80, 0x3f]); // 1.0f32 = 0x3f800000
        Float::F16.encode(&[1.0], &mut b);
        assert_eq!(b, [0x00, 0x3c]); // 1.0f16 = 0x3c00
    }
}
