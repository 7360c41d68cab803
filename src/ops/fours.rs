//! The triangular solves of torch's f32 `inverse` (MKL's `getrs` on `P·I`) from r = 9 to 16 on
//! the AMD processor with AVX-512 ([`super::BatSums::Amd`]), where each product is rounded and
//! then added (no fused multiply-adds); the LU before them is [`super::inverse_as_torch`]'s.
//!
//! Found on 2026-12-02 on an AMD EPYC (torch 2.15, MKL 2024.2) with `fixtures/probe_sums.py`
//! (each element's tree of sums), then checked against torch's `inverse` on every value of random
//! blocks at every r from 9 to 16 (`fixtures/check_inverses.py --amd`):
//!
//! - the rows are cut into blocks of 4 from the first row solved (the top going forward, the
//!   bottom going backward), then one block of 2 and one of 1 for what is left ([`blocks`]);
//! - each row first sums its products over the rows solved in the blocks before its own, from +0,
//!   as MKL's GEMM kernel for the block's height sums them ([`gemm_sum`]);
//! - **forward** (unit lower factor): then adds its products within its block, in order, and is
//!   its value less that sum;
//! - **backward** (upper factor): then adds its products within its block from the right, the one
//!   nearest the diagonal left out; the row's value less that nearest product, less the sum, is
//!   multiplied by the pivot's rounded reciprocal.

use std::ops::Range;

/// How MKL's solves cut r rows on the AMD processor, in the order solved going forward: blocks of
/// 4, then the rest as one of 2 and one of 1 (11: 0-3, 4-7, 8-9, 10). Going backward the same
/// blocks from the bottom (11: 7-10, 3-6, 1-2, 0).
fn blocks(r: usize) -> Vec<Range<usize>> {
    let mut out = vec![];
    let mut lo = 0;
    while r - lo >= 4 {
        out.push(lo..lo + 4);
        lo += 4;
    }
    for size in [2, 1] {
        if r - lo >= size {
            out.push(lo..lo + size);
            lo += size;
        }
    }
    out
}

/// `Σ p` from +0 as MKL's GEMM kernel for a block of `height` rows sums one row's products:
/// one row, in 8 lanes over the whole chunks of 8 (product k in lane k mod 8), the lanes added in
/// order, then the rest from the last back (below 16 products: the first 8 in order, then the
/// rest from the last back; probed up to 32); two rows, in two lanes (even and odd k) added at
/// the end; four, in order.
fn gemm_sum(p: &[f32], height: usize) -> f32 {
    match height {
        1 => {
            let whole = p.len() / 8 * 8;
            let lanes = (0..8.min(whole)).map(|l| p[l..whole].iter().step_by(8).fold(0f32, |s, v| s + v));
            p[whole..].iter().rev().fold(lanes.fold(0f32, |s, v| s + v), |s, v| s + v)
        }
        2 => {
            let lane = |first: usize| p.iter().skip(first).step_by(2).fold(0f32, |s, v| s + v);
            lane(0) + lane(1)
        }
        _ => p.iter().fold(0f32, |s, v| s + v),
    }
}

/// Solve `x` (`P·I`, `[r, r]`, row-major) forward with the unit lower factor in `a` and backward
/// with its upper one, as torch's `inverse` does on the AMD processor from r = 9 to 16.
pub(super) fn solve(x: &mut [f32], a: &[f32], r: usize) {
    let cut = blocks(r);
    let mut p = Vec::with_capacity(r);
    for rows in &cut {
        for i in rows.clone() {
            for c in 0..r {
                p.clear();
                p.extend((0..rows.start).map(|j| a[i * r + j] * x[j * r + c]));
                let s = (rows.start..i).fold(gemm_sum(&p, rows.len()), |s, j| s + a[i * r + j] * x[j * r + c]);
                x[i * r + c] -= s;
            }
        }
    }
    for rows in cut.iter().map(|b| r - b.end..r - b.start) {
        for i in rows.clone().rev() {
            let recip = 1.0 / a[i * r + i];
            for c in 0..r {
                p.clear();
                p.extend((rows.end..r).map(|j| a[i * r + j] * x[j * r + c]));
                let s = (i + 2..rows.end).rev().fold(gemm_sum(&p, rows.len()), |s, j| a[i * r + j] * x[j * r + c] + s);
                let mut v = x[i * r + c];
                if i + 1 < rows.end {
                    v -= a[i * r + i + 1] * x[(i + 1) * r + c];
                }
                x[i * r + c] = (v - s) * recip;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rows_are_cut_in_fours_then_a_two_and_a_one() {
        let starts = |r| blocks(r).iter().map(|b| (b.start, b.len())).collect::<Vec<_>>();
        assert_eq!(starts(9), [(0, 4), (4, 4), (8, 1)]);
        assert_eq!(starts(10), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(starts(11), [(0, 4), (4, 4), (8, 2), (10, 1)]);
        assert_eq!(starts(16), [(0, 4), (4, 4), (8, 4), (12, 4)]);
        assert_eq!(starts(3), [(0, 2), (2, 1)]);
    }

    #[test]
    fn the_gemm_kernels_sum_in_the_orders_the_probes_found() {
        // 2²⁴ + 1 rounds back to 2²⁴ (a tie, to even): each order loses other ones
        let big = 16_777_216f32;
        let p = [big, 1., 1., 1., 1., 1., 1., 1., 1., -big];
        // four rows, in order: every 1 lost against big, then big − big
        assert_eq!(gemm_sum(&p, 4), 0.0);
        // one row: the first 8 in order (big), then −big and the last 1 from the back
        assert_eq!(gemm_sum(&p, 1), 1.0);
        // two rows: the even lane big (its four 1s lost), the odd one 4 − big (exact), then added
        assert_eq!(gemm_sum(&p, 2), 4.0);
        // one row of 16: lane 0 is big − big, lanes 1 to 7 two 1s each (in order: 7 1s lost)
        let p: Vec<f32> = [big, -big].iter().flat_map(|&v| std::iter::once(v).chain([1.0; 7])).collect();
        assert_eq!(p.iter().fold(0f32, |s, v| s + v), 7.0);
        assert_eq!(gemm_sum(&p, 1), 14.0);
    }
}
