//! The triangular solves of torch's f32 `inverse` (MKL's `getrs` on `P·I`) from r = 9 on the AMD
//! processor ([`super::BatSums::Amd`]), where each product is rounded and then added
//! (no fused multiply-adds but in [`update`]); the LU before them is
//! [`super::inverse_as_torch`]'s up to r = 16, then [`super::crout`]'s.
//!
//! Found on 2026-12-02 on an AMD EPYC (torch 2.15, MKL 2024.2) with `fixtures/probe_sums.py`
//! (each element's tree of sums), then checked against torch's `inverse` on every value of random
//! blocks at every r from 9 to 16 and, with [`super::crout`]'s LU, at every r up to 149
//! (`fixtures/check_inverses.py --amd`):
//!
//! - above 64 rows in parts of 64: the first 64 are solved first (backward the last 64), then the
//!   rest less their products over them, and so on ([`halves`], [`update`]), each part as follows;
//! - the rows are cut into blocks of 4 from the first row solved (the top going forward, the
//!   bottom going backward), then one block of 2 and one of 1 for what is left ([`blocks`]);
//! - each row first sums its products over the rows solved in the blocks before its own, from +0,
//!   as MKL's GEMM kernel for the block's height sums them ([`gemm_sum`]);
//! - **forward** (unit lower factor): then adds its products within its block, in order, and is
//!   its value less that sum;
//! - **backward** (upper factor): then adds its products within its block from the right, the one
//!   nearest the diagonal left out; the row's value less that nearest product, less the sum, is
//!   multiplied by the pivot's rounded reciprocal.

use super::{add_products, head_end, subtract, take};
use std::ops::Range;

/// How MKL's solves cut r rows (up to 64: [`halves`]) on the AMD processor, in the order solved
/// going forward: blocks of 4, then the rest as one of 2 and one of 1 (11: 0-3, 4-7, 8-9, 10).
/// Going backward the same blocks from the bottom (11: 7-10, 3-6, 1-2, 0).
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
/// with its upper one, as torch's `inverse` does on the AMD processor (from r = 9; above 64 rows
/// in parts of 64 from the top, backward from the bottom: [`halves`]).
#[inline(always)]
pub(super) fn solve(x: &mut [f32], a: &[f32], r: usize, off: usize) {
    let mut p = Vec::with_capacity(r);
    // a block of 4 rows sums in order: a row at a time, each column's element in a lane of its own
    let mut acc = vec![0f32; r];
    for half in halves(r) {
        for rows in blocks(half.len()).into_iter().map(|b| half.start + b.start..half.start + b.end) {
            for i in rows.clone() {
                if rows.len() == 4 {
                    acc.fill(0.0);
                    for j in half.start..i {
                        add_products(&mut acc, a[i * r + j], &x[j * r..][..r], false);
                    }
                    subtract(&mut x[i * r..][..r], &acc);
                    continue;
                }
                for c in 0..r {
                    p.clear();
                    p.extend((half.start..rows.start).map(|j| a[i * r + j] * x[j * r + c]));
                    let s = (rows.start..i).fold(gemm_sum(&p, rows.len()), |s, j| s + a[i * r + j] * x[j * r + c]);
                    x[i * r + c] -= s;
                }
            }
        }
        // then the rows below less their products over these
        update(x, a, r, half.end..r, half.clone(), off);
    }
    for half in halves(r).into_iter().map(|h| r - h.end..r - h.start) {
        for rows in blocks(half.len()).into_iter().map(|b| half.end - b.end..half.end - b.start) {
            for i in rows.clone().rev() {
                let recip = 1.0 / a[i * r + i];
                if rows.len() == 4 {
                    acc.fill(0.0);
                    for j in (rows.end..half.end).chain((i + 2..rows.end).rev()) {
                        add_products(&mut acc, a[i * r + j], &x[j * r..][..r], false);
                    }
                    let near = if i + 1 < rows.end { a[i * r + i + 1] } else { 0.0 };
                    let (head, tail) = x.split_at_mut((i + 1) * r);
                    let below = if i + 1 < r { &tail[..r] } else { &acc[..0] };
                    for c in 0..r {
                        let mut v = head[i * r + c];
                        if i + 1 < rows.end {
                            v -= near * below[c];
                        }
                        head[i * r + c] = (v - acc[c]) * recip;
                    }
                    continue;
                }
                for c in 0..r {
                    p.clear();
                    p.extend((rows.end..half.end).map(|j| a[i * r + j] * x[j * r + c]));
                    let s =
                        (i + 2..rows.end).rev().fold(gemm_sum(&p, rows.len()), |s, j| a[i * r + j] * x[j * r + c] + s);
                    let mut v = x[i * r + c];
                    if i + 1 < rows.end {
                        v -= a[i * r + i + 1] * x[(i + 1) * r + c];
                    }
                    x[i * r + c] = (v - s) * recip;
                }
            }
        }
        // then the rows above less their products over these
        update(x, a, r, 0..half.start, half.clone(), off);
    }
}

/// How the solves cut the rows (going forward; backward the same from the bottom): into parts of
/// 64, each solved and then taken from all the rows after it ([`update`]); at r = 129 row 128
/// takes its products over rows 0-63 as one sum and then those over 64-127 one by one, the rule
/// for the 65 rows and then the 1 after each part (probed; checked at every r from 129 to 149,
/// [`super::crout::LARGEST`]; above it bone-tool inverts in f64).
fn halves(r: usize) -> Vec<Range<usize>> {
    (0..r).step_by(64).map(|s| s..r.min(s + 64)).collect()
}

/// Rows `rows` of `x` less their products with the rows `over` (solved already): where `rows` are
/// at least 12, summed from +0 with fused multiply-adds and then subtracted; else subtracted one
/// by one in order, each product rounded, but in each column's head ([`head_end`]: `off`, where
/// the block starts in torch's batch, mod 4) the products 4 to 7 of each 8 as one sum ([`take`]).
#[inline(always)]
fn update(x: &mut [f32], a: &[f32], r: usize, rows: Range<usize>, over: Range<usize>, off: usize) {
    if over.is_empty() || rows.is_empty() {
        return;
    }
    let mut acc = vec![0f32; r];
    let fused = rows.len() >= 12;
    let heads: Vec<usize> = if fused { vec![] } else { (0..r).map(|c| head_end(r, rows.clone(), c, off)).collect() };
    let mut p = Vec::with_capacity(over.len());
    for i in rows {
        if fused {
            acc.fill(0.0);
        } else {
            acc.copy_from_slice(&x[i * r..][..r]);
        }
        for j in over.clone() {
            // summed from +0, or subtracted from the value one by one
            let l = if fused { a[i * r + j] } else { -a[i * r + j] };
            add_products(&mut acc, l, &x[j * r..][..r], fused);
        }
        for c in (0..heads.len()).filter(|&c| i < heads[c]) {
            p.clear();
            p.extend(over.clone().map(|j| a[i * r + j] * x[j * r + c]));
            acc[c] = take(x[i * r + c], &p, true);
        }
        let xi = &mut x[i * r..][..r];
        if fused {
            subtract(xi, &acc);
        } else {
            xi.copy_from_slice(&acc);
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
