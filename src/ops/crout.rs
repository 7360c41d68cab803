//! torch's f32 `inverse` from r = 17 as MKL computes it on the AMD processor
//! ([`super::BatSums::Amd`]): [`super::inverse_as_torch`] below, and up to r = 16 with the solves
//! of [`super::fours`], which this module's LU is followed by too.
//!
//! Found on 2026-12-02 on AMD EPYCs (torch 2.15, MKL 2024.2; one with AVX-512, one without, the
//! same bytes) with `fixtures/probe_sums.py grid` (each element's tree of sums on the LU) and then
//! trying each step fused or not on random blocks; checked against torch's `inverse` on every
//! value of random batches of blocks (`fixtures/check_inverses.py --amd`) at every r from 17 to
//! [`LARGEST`]:
//!
//! - the LU is recursive on columns as on the Intel processor ([`super::panels`]): a width above
//!   16 cut at the largest power of two below it, the left part factored, the rows above the cut
//!   of the right part solved with its unit lower factor (each `a − Σ l·u`, the products summed
//!   from +0 in order, each rounded; from r = 129, 128 rows, in two parts of 64: [`solve_unit`]),
//!   the rows below less their products over the left part:
//!   where the right part is at least 12 wide summed from +0 with fused multiply-adds and then
//!   subtracted, where it is narrower subtracted one by one, each product rounded ([`take`]);
//!   then the right part factored;
//! - **a panel** (at most 16 columns, every row below it) goes column by column, left-looking
//!   (Crout's order): the column's rows above the diagonal are their value less their products
//!   summed from +0 in order, but near the diagonal as MKL's vector code sums ([`upper_sum`]);
//!   its rows from the diagonal down their value less each product in order ([`take`]); the pivot
//!   (the first row of largest magnitude) swapped up, the rows below multiplied by its rounded
//!   reciprocal. Each product rounded, no fused steps.
//!
//! MKL holds the matrix column-major, and torch's batch puts block i at i·r² floats: where a
//! column's elements cross a 16-byte boundary moves with r and, for an odd r, with the block.
//! Its vector code takes the elements before the first boundary apart ([`super::head_end`]), and
//! the rows above the diagonal start their vectors after the first 1 to 4 products by where the
//! row's start lies ([`upper_sum`]); `off`, where the block starts mod 4 floats, says which.

use super::panels::{steps, Step};
use super::{add_products, head_end, identity_plus, permuted_identity, pivot, subtract, take};
use std::ops::Range;

/// The largest r at which [`inverse`] is torch's on the AMD processor (at every r from 17 to it),
/// whatever torch's threads: from r = 150 MKL factors otherwise on more than two threads (every
/// value differs), from 160 on two.
pub const LARGEST: usize = 149;

/// `(I + B)⁻¹` of one r×r block `bi` (row-major) as torch computes it on the AMD processor, up to
/// r = [`LARGEST`] (above it an inverse, summed in the same way, but not torch's); `off`: where
/// the block starts in torch's batch, mod 4 floats (block i: i·r² mod 4).
#[inline(always)]
pub(super) fn inverse(bi: &[f32], r: usize, off: usize) -> Vec<f32> {
    let mut a = identity_plus(bi, r);
    let mut perm: Vec<usize> = (0..r).collect();
    // the recursion unrolled (a recursive function would not be inlined into the FMA build)
    let mut plan = vec![];
    steps(0, r, &mut plan);
    for step in plan {
        match step {
            Step::Panel { c, w } => panel(&mut a, r, c, w, off, &mut perm),
            Step::Update { c, n1, n } => update(&mut a, r, c, n1, n, off),
        }
    }
    let mut x = permuted_identity(&perm);
    super::fours::solve(&mut x, &a, r, off);
    x
}

/// Columns `c + h..c + n` once columns `c..c + h` are factored: the rows above the cut solved
/// with their unit lower factor, the rows below less their products over them (summed first where
/// the right part is at least 12 wide, else one by one, each column's head as [`take`] says).
#[inline(always)]
fn update(a: &mut [f32], r: usize, c: usize, h: usize, n: usize, off: usize) {
    let right = c + h..c + n;
    let mut acc = vec![0f32; n - h];
    solve_unit(a, r, c, h, right.clone(), &mut acc, off);
    if n - h >= 12 {
        for i in c + h..r {
            sum_into(a, r, i, c..c + h, right.clone(), &mut acc, true);
        }
    } else {
        let mut p = Vec::with_capacity(h);
        for j in right {
            let head = head_end(r, c + h..r, j, off);
            for i in c + h..r {
                p.clear();
                p.extend((c..c + h).map(|k| a[i * r + k] * a[k * r + j]));
                a[i * r + j] = take(a[i * r + j], &p, i < head);
            }
        }
    }
}

/// Rows `c + 1..c + h` of the columns `right` solved with the unit lower factor of rows and
/// columns `c..c + h`: up to 64 rows each row less its products summed from +0 in order, each
/// rounded; more (from r = 129, where the left part is 128 wide) cut in two at 64 (probed at 128
/// rows; beyond, at the largest power of two below, as the LU is), the first part solved, the
/// rest less their products over it (summed from +0 with fused multiply-adds and then subtracted
/// where `right` is at least 4 wide, else one by one, [`take`]), then solved. The recursion
/// unrolled into [`solve_steps`] (see [`inverse`]).
#[inline(always)]
fn solve_unit(a: &mut [f32], r: usize, c: usize, h: usize, right: Range<usize>, acc: &mut [f32], off: usize) {
    let mut plan = vec![];
    solve_steps(c, h, &mut plan);
    for (c, h1, h) in plan {
        if h1 == h {
            for i in c + 1..c + h {
                sum_into(a, r, i, c..i, right.clone(), acc, false);
            }
            continue;
        }
        let rows = c + h1..c + h;
        if right.len() >= 4 {
            for i in rows.clone() {
                sum_into(a, r, i, c..c + h1, right.clone(), acc, true);
            }
            continue;
        }
        let mut p = Vec::with_capacity(h1);
        for j in right.clone() {
            let head = head_end(r, rows.clone(), j, off);
            for i in rows.clone() {
                p.clear();
                p.extend((c..c + h1).map(|k| a[i * r + k] * a[k * r + j]));
                a[i * r + j] = take(a[i * r + j], &p, i < head);
            }
        }
    }
}

/// [`solve_unit`]'s steps in order: `(c, h, h)` solves rows `c + 1..c + h` by their sums,
/// `(c, h1, h)` takes rows `c + h1..c + h` less their products over columns `c..c + h1`.
fn solve_steps(c: usize, h: usize, out: &mut Vec<(usize, usize, usize)>) {
    if h <= 64 {
        out.push((c, h, h));
        return;
    }
    let mut h1 = 64;
    while h1 * 2 < h {
        h1 *= 2;
    }
    solve_steps(c, h1, out);
    out.push((c, h1, h));
    solve_steps(c + h1, h - h1, out);
}

/// Row `i`'s columns `cols` less `Σ l_ik·u_kj` over `ks`, summed from +0 in order first: with
/// fused multiply-adds or each product rounded. A row at a time, each column's element in a lane
/// of its own (the same steps).
#[inline(always)]
fn sum_into(a: &mut [f32], r: usize, i: usize, ks: Range<usize>, cols: Range<usize>, acc: &mut [f32], fused: bool) {
    acc.fill(0.0);
    for k in ks {
        add_products(acc, a[i * r + k], &a[k * r + cols.start..k * r + cols.end], fused);
    }
    subtract(&mut a[i * r + cols.start..i * r + cols.end], acc);
}

/// The panel of columns `c..c + w` on rows `c..r`, column by column (Crout's order).
#[inline(always)]
fn panel(a: &mut [f32], r: usize, c: usize, w: usize, off: usize, perm: &mut [usize]) {
    let mut p = Vec::with_capacity(w);
    for j in c..c + w {
        for i in c + 1..j {
            p.clear();
            p.extend((c..i).map(|k| a[i * r + k] * a[k * r + j]));
            a[i * r + j] -= upper_sum(&p, w, i - c, j - i, (off + i * r) % 4);
        }
        let head = head_end(r, j..r, j, off);
        for i in j..r {
            p.clear();
            p.extend((c..j).map(|k| a[i * r + k] * a[k * r + j]));
            a[i * r + j] = take(a[i * r + j], &p, i < head);
        }
        pivot(a, r, j, perm);
        let recip = 1.0 / a[j * r + j];
        for i in j + 1..r {
            a[i * r + j] *= recip;
        }
    }
}

/// The sum of the products `p` of the panel's row `i` (counted from the panel's first) above the
/// diagonal, `d` columns right of it, from +0 in order; but within 8 columns of the diagonal where
/// 8 more columns fit in the panel of `w` (`i + 8 < w`), else within 4 where 4 fit, MKL's vector
/// code: the first `4 − s` products in order (`s`: where row i's start lies mod 4 floats), then the
/// products in whole fours into 4 lanes (the first lane from that sum), the lanes added
/// `(l₀ + l₂) + (l₁ + l₃)`, then the rest in order.
#[inline(always)]
fn upper_sum(p: &[f32], w: usize, i: usize, d: usize, s: usize) -> f32 {
    let head = 4 - s;
    let window = if i + 8 < w {
        8
    } else if i + 4 < w {
        4
    } else {
        0
    };
    let vector = d <= window && p.len() >= head + 4;
    if !vector {
        return p.iter().fold(0f32, |s, q| s + q);
    }
    let fours = (p.len() - head) / 4;
    let mut lanes = [p[..head].iter().fold(0f32, |s, q| s + q), 0.0, 0.0, 0.0];
    for t in 0..fours {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let q = p[head + 4 * t + l];
            *lane = if t == 0 && l > 0 { q } else { *lane + q };
        }
    }
    let sum = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
    p[head + 4 * fours..].iter().fold(sum, |s, q| s + q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{head_end, take};

    // 2²⁴ + 1 rounds back to 2²⁴ (a tie, to even): each order of summing loses other ones
    const BIG: f32 = 16_777_216.0;

    #[test]
    fn rows_above_the_diagonal_sum_near_it_as_mkl_s_vector_code() {
        let p = [BIG, 1., 1., 1., 1., 1., -BIG, 1.];
        // in order: BIG (five 1s lost), − BIG, + 1
        assert_eq!(upper_sum(&p, 16, 12, 1, 0), 1.0);
        // row start at 0 mod 4: p₀…p₃ in order (BIG), then lanes BIG + p₄, p₅, p₆, p₇ added
        // (l₀ + l₂) + (l₁ + l₃) = (BIG − BIG) + (1 + 1)
        assert_eq!(upper_sum(&p, 16, 8, 4, 0), 2.0);
        assert_eq!(upper_sum(&p, 16, 11, 1, 0), 2.0);
        // at 2 mod 4: p₀ + p₁ (BIG), lanes BIG + p₂, p₃, p₄, p₅: (BIG + 1) + (1 + 1) = BIG + 2, then
        // − BIG + 1 in order
        assert_eq!(upper_sum(&p, 16, 7, 1, 2), 3.0);
        // the window: 8 columns right of the diagonal where 8 more fit in the panel, else 4
        assert_eq!(upper_sum(&p, 16, 7, 8, 2), 3.0);
        assert_eq!(upper_sum(&p, 16, 7, 9, 2), 1.0);
        assert_eq!(upper_sum(&p, 15, 7, 4, 2), 3.0);
        assert_eq!(upper_sum(&p, 15, 7, 5, 2), 1.0);
        assert_eq!(upper_sum(&p, 11, 7, 1, 2), 1.0);
        // 7 products: at 0 mod 4 too few for a whole four after the first 4 (in order: 0); at 1 mod
        // 4, p₀ + p₁ + p₂ (BIG), lanes BIG + p₃, p₄, p₅, p₆: (BIG + 1) + (1 − BIG) = 1
        assert_eq!(upper_sum(&p[..7], 16, 8, 1, 0), 0.0);
        assert_eq!(upper_sum(&p[..7], 16, 8, 1, 1), 1.0);
    }

    #[test]
    fn a_column_s_head_ends_at_its_first_16_byte_boundary_if_4_rows_follow() {
        // r = 20, column 9 from the diagonal: elements at 9 + 180 = 189 ≡ 1 mod 4, so rows 9 to
        // 11, with 8 rows from 12; column 8 starts at 168 ≡ 0 (no head)
        assert_eq!(head_end(20, 9..20, 9, 0), 12);
        assert_eq!(head_end(20, 8..20, 8, 0), 8);
        // r = 16, column 13: rows 13 to 15, but no row after them
        assert_eq!(head_end(16, 13..16, 13, 0), 13);
        // r = 17, column 9: at 9 + 153 = 162 ≡ 2 (rows 9, 10); in the batch's second block,
        // 17² = 289 ≡ 1 further (row 9 only)
        assert_eq!(head_end(17, 9..17, 9, 0), 11);
        assert_eq!(head_end(17, 9..17, 9, 1), 10);
        // r = 21, rows 16 to 20 of columns 18 (16 + 378 ≡ 2: 3 rows after the head of 2) and 19
        assert_eq!(head_end(21, 16..21, 18, 0), 16);
        assert_eq!(head_end(21, 16..21, 19, 0), 17);
    }

    #[test]
    fn a_head_s_element_takes_products_4_to_7_of_each_8_as_one_sum() {
        let p = [0., 0., 0., 0., -1., 1., 0., 0.];
        // one by one: BIG + 1 is BIG, then − 1; as one sum: − 0
        assert_eq!(take(BIG, &p, false), BIG - 1.0);
        assert_eq!(take(BIG, &p, true), BIG);
        // only whole fours
        assert_eq!(take(BIG, &p[..7], true), BIG - 1.0);
        let mut q = [0f32; 16];
        q[12] = -1.0;
        q[13] = 1.0;
        assert_eq!(take(BIG, &q, true), BIG);
        q.swap(12, 8);
        q.swap(13, 9);
        assert_eq!(take(BIG, &q, true), BIG - 1.0);
    }

    #[test]
    fn at_an_odd_r_the_inverse_depends_on_where_the_block_starts() {
        let mut g = crate::ops::Xorshift(0x0DD5_EED5);
        let r = 19;
        let b = g.values(r * r * 4, 0.3 / (r as f32).sqrt());
        let differ = b.chunks(r * r).filter(|bi| (1..4).any(|off| inverse(bi, r, off) != inverse(bi, r, 0))).count();
        assert!(differ > 0);
    }

    #[test]
    fn a_solve_of_more_than_64_rows_goes_in_two_parts() {
        // (c, h, h): rows solved by their sums; (c, h1, h): rows c + h1.. less their products over
        // the first h1 rows. Up to 64 rows one part; 128 (r = 129 to 149: the LU's cut at 128) in
        // two of 64, as torch's products show
        let plan = |c, h| {
            let mut out = vec![];
            solve_steps(c, h, &mut out);
            out
        };
        assert_eq!(plan(0, 64), [(0, 64, 64)]);
        assert_eq!(plan(16, 32), [(16, 32, 32)]);
        assert_eq!(plan(0, 128), [(0, 64, 64), (0, 64, 128), (64, 64, 64)]);
        assert_eq!(plan(0, 100), [(0, 64, 64), (0, 64, 100), (64, 36, 36)]);
        // and an inverse there is one (I + B times it within a few ulp of I)
        let mut g = crate::ops::Xorshift(0x0C0F_FEE5);
        let r = 136;
        let b = g.values(r * r, 0.3 / (r as f32).sqrt());
        let x = inverse(&b, r, 0);
        for i in 0..r {
            for j in 0..r {
                let e: f64 = (0..r)
                    .map(|k| (f64::from(b[i * r + k]) + f64::from(u8::from(i == k))) * f64::from(x[k * r + j]))
                    .sum();
                assert!((e - f64::from(u8::from(i == j))).abs() < 1e-4, "({i}, {j}): {e}");
            }
        }
    }
}
