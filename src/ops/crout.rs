//! torch's f32 `inverse` from r = 17 as MKL computes it on the AMD processor with AVX-512
//! ([`super::BatSums::Amd`]): [`super::inverse_as_torch`] below, and up to r = 16 with the solves
//! of [`super::fours`], which this module's LU is followed by too.
//!
//! Found on 2026-12-02 on an AMD EPYC (torch 2.15, MKL 2024.2) with `fixtures/probe_sums.py grid`
//! (each element's tree of sums on the LU) and then trying each step fused or not on random
//! blocks; checked against torch's `inverse` on every value of random blocks (`fixtures/
//! check_inverses.py --amd`) at every r that is a multiple of 4 from 20 to [`LARGEST`]:
//!
//! - the LU is recursive on columns as on the Intel processor ([`super::panels`]): a width above
//!   16 cut at the largest power of two below it, the left part factored, the rows above the cut
//!   of the right part solved with its unit lower factor (each `a − Σ l·u`, the products summed
//!   from +0 in order, each rounded), the rows below less their products over the left part:
//!   where the right part is at least 12 wide summed from +0 with fused multiply-adds and then
//!   subtracted, where it is narrower subtracted one by one, each product rounded; then the right
//!   part factored;
//! - **a panel** (at most 16 columns, every row below it) goes column by column, left-looking
//!   (Crout's order): the column's rows above the diagonal are their value less their products
//!   summed from +0 in order, its rows from the diagonal down their value less each product in
//!   order; the pivot (the first row of largest magnitude) swapped up, the rows below multiplied
//!   by its rounded reciprocal. Each product rounded, no fused steps. In a panel of 16 columns some
//!   elements sum otherwise ([`upper_sum`], [`grouped`]): where MKL's vector code takes over.
//!
//! Where r is no multiple of 4 those places move (seen at r = 17, 18, 19 and 21), most likely
//! with the data's alignment (column j of the column-major matrix starts at element j·r; for odd
//! r torch's batch would put its blocks at varying alignments too): not modelled, nor r above
//! [`LARGEST`].

use super::panels::{steps, Step};
use super::{add_products, identity_plus, permuted_identity, pivot, subtract};
use std::ops::Range;

/// The largest r at which [`inverse`] is torch's on the AMD processor (with every r from 17 to it
/// that is a multiple of 4: [`models`]).
pub const LARGEST: usize = 128;

/// Whether [`inverse`] gives torch's bytes at r (from 17): a multiple of 4 up to [`LARGEST`].
pub const fn models(r: usize) -> bool {
    r > 16 && r <= LARGEST && r.is_multiple_of(4)
}

/// `(I + B)⁻¹` of one r×r block `bi` (row-major) as torch computes it on the AMD processor, for
/// the r that [`models`] names (at other r an inverse, summed in the same way, but not torch's).
#[inline(always)]
pub(super) fn inverse(bi: &[f32], r: usize) -> Vec<f32> {
    let mut a = identity_plus(bi, r);
    let mut perm: Vec<usize> = (0..r).collect();
    // the recursion unrolled (a recursive function would not be inlined into the FMA build)
    let mut plan = vec![];
    steps(0, r, &mut plan);
    for step in plan {
        match step {
            Step::Panel { c, w } => panel(&mut a, r, c, w, &mut perm),
            Step::Update { c, n1, n } => update(&mut a, r, c, n1, n),
        }
    }
    let mut x = permuted_identity(&perm);
    super::fours::solve(&mut x, &a, r);
    x
}

/// Columns `c + h..c + n` once columns `c..c + h` are factored: the rows above the cut solved
/// with their unit lower factor, the rows below less their products over them.
#[inline(always)]
fn update(a: &mut [f32], r: usize, c: usize, h: usize, n: usize) {
    let right = c + h..c + n;
    let mut acc = vec![0f32; n - h];
    for i in c + 1..c + h {
        sum_into(a, r, i, c..i, right.clone(), &mut acc, false);
    }
    if n - h >= 12 {
        for i in c + h..r {
            sum_into(a, r, i, c..c + h, right.clone(), &mut acc, true);
        }
    } else {
        for i in c + h..r {
            // (rows k above row i: split there to read them while row i changes)
            let (above, row) = a.split_at_mut(i * r);
            for k in c..c + h {
                let l = -row[k];
                add_products(&mut row[right.clone()], l, &above[k * r + right.start..k * r + right.end], false);
            }
        }
    }
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
fn panel(a: &mut [f32], r: usize, c: usize, w: usize, perm: &mut [usize]) {
    let mut p = Vec::with_capacity(w);
    for j in c..c + w {
        for i in c + 1..j {
            p.clear();
            p.extend((c..i).map(|k| a[i * r + k] * a[k * r + j]));
            a[i * r + j] -= upper_sum(&p, w, i - c, j - i);
        }
        for i in j..r {
            p.clear();
            p.extend((c..j).map(|k| a[i * r + k] * a[k * r + j]));
            let v = a[i * r + j];
            a[i * r + j] = if grouped(w, r - c, i - c, j - c) {
                let four = ((p[4] + p[5]) + p[6]) + p[7];
                p[8..].iter().fold(p[..4].iter().fold(v, |v, q| v - q) - four, |v, q| v - q)
            } else {
                p.iter().fold(v, |v, q| v - q)
            };
        }
        pivot(a, r, j, perm);
        let recip = 1.0 / a[j * r + j];
        for i in j + 1..r {
            a[i * r + j] *= recip;
        }
    }
}

/// The sum of the products `p` of the panel's row `i` (counted from the panel's first) above the
/// diagonal, `d` columns right of it: from +0 in order, but in a panel of 16 columns on rows 8 to
/// 11 within 4 columns of the diagonal the first 8 as `(((p₀ + … + p₄) + p₆) + (p₅ + p₇))`.
#[inline(always)]
fn upper_sum(p: &[f32], w: usize, i: usize, d: usize) -> f32 {
    if w == 16 && (8..=11).contains(&i) && d <= 4 {
        let head = p[..5].iter().fold(0f32, |s, q| s + q) + p[6] + (p[5] + p[7]);
        p[8..].iter().fold(head, |s, q| s + q)
    } else {
        p.iter().fold(0f32, |s, q| s + q)
    }
}

/// Whether the panel's element at row `i`, column `j` (both counted from its first column, `i ≥
/// j`; `m` rows from it down) subtracts its products 4 to 7 as one sum: in a panel of 16 columns,
/// columns 9 to 11 down to row 11, and, where the panel has more than 16 rows, columns 13 to 15
/// down to row 15.
#[inline(always)]
fn grouped(w: usize, m: usize, i: usize, j: usize) -> bool {
    w == 16 && (((9..=11).contains(&j) && i <= 11) || (m > 16 && (13..=15).contains(&j) && i <= 15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modelled_r_are_the_multiples_of_4_from_20_to_128() {
        let r: Vec<usize> = (1..200).filter(|&r| models(r)).collect();
        assert_eq!(r, (20..=128).step_by(4).collect::<Vec<_>>());
    }

    #[test]
    fn a_16_column_panel_sums_some_elements_in_its_vector_code_s_order() {
        // 2²⁴ + 1 rounds back to 2²⁴: each order loses other ones
        let big = 16_777_216f32;
        let p = [big, 1., 1., 1., 1., 1., -big, 1.];
        // in order: big (four 1s and p₅ lost), − big, + 1
        assert_eq!(upper_sum(&p, 16, 7, 1), 1.0);
        assert_eq!(upper_sum(&p, 16, 8, 5), 1.0);
        assert_eq!(upper_sum(&p, 8, 8, 1), 1.0);
        // rows 8 to 11 within 4 columns of the diagonal: (big + p₆) + (p₅ + p₇) = 2
        assert_eq!(upper_sum(&p, 16, 8, 4), 2.0);
        assert_eq!(upper_sum(&p, 16, 11, 1), 2.0);
        assert!(grouped(16, 20, 10, 9) && grouped(16, 20, 11, 11) && grouped(16, 17, 15, 13));
        assert!(
            !grouped(16, 20, 12, 9) && !grouped(16, 20, 10, 8) && !grouped(16, 16, 15, 13) && !grouped(12, 20, 10, 9)
        );
    }
}
