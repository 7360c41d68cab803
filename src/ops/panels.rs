//! torch's f32 `inverse` from r = 17 on, as MKL computes it on the Intel processor with AVX-512
//! (`getrf`, then `getrs` on `P·I`): [`super::inverse_as_torch`] below r = 17.
//!
//! Found on 2026-12-02 by revealing each element's order of summing (FPRev's method: two inputs
//! of ±2⁴⁰ among ones on a matrix built so that every other product is exact, the sum telling
//! which inputs meet where), then the fused and unfused steps tried on random matrices; checked
//! against torch's `inverse` on every value of random blocks at every r from 17 to [`LARGEST`]
//! (`fixtures/check_inverses.py`; README, "How bone-tool matches PEFT"):
//!
//! - **LU** recursive on columns: a width of at most 16 is a panel ([`panel`]); a wider one is cut
//!   at the largest power of two below it (40: 32 + 8, 64: 32 + 32), the left part factored (all
//!   rows below it too), the rows above the cut of the right part solved with the left part's unit
//!   lower factor ([`solve_down`]: in blocks of 48 rows, each row less one sum over the blocks above,
//!   from +0, then in order within its block), the rows below less `Σ l_ik·u_kj` over the left
//!   part's columns (from +0, in order: a GEMM), and then the right part factored.
//! - **A panel**, column by column: each column's value less its products over the panel's
//!   columns to its left, in order, from the column's own value; but where the panel has at least
//!   8 such columns and the row is in one of the full 16-row vectors counted from the diagonal
//!   down, the first 8 products in one fixed tree ([`eight`]) and the rest in order. The first
//!   row of largest magnitude swapped up, the column below it multiplied by the pivot's rounded
//!   reciprocal, then the row's values right of it within the panel less their products summed
//!   by [`dot`] (rounded, mostly unfused: 8 lanes, then halved).
//! - **Forward** with the unit lower factor on `P·I` as [`solve_down`] over all r rows.
//! - **Backward** with the upper factor the same blocks from the bottom: each row less one sum over
//!   the blocks below (from +0, ascending), then within its block from the last column leftwards,
//!   then multiplied by the pivot's rounded reciprocal.
//!
//! Every helper is `#[inline(always)]`: inlined into the FMA build of
//! [`super::inverse_as_torch`], where `mul_add` is the instruction (the C library's `fmaf`, which
//! some round twice, otherwise); the recursion is unrolled into a [`Step`] list for that reason.

use super::{add_products, identity_plus, permuted_identity, pivot, subtract};

/// The largest r at which [`inverse`] is torch's, whether torch runs on one thread or more and
/// inverts one block or a batch (checked at every r from 17). Above it torch's bytes depend on
/// those: a single block of r = 160 inverts otherwise on two threads than on one (MKL's threaded
/// LU), and at r = 161, 177, 193, … (16k + 1 from 161) even on one thread some sums differ from
/// [`inverse`]'s, not found; at the other r up to 256 it matched batches on two threads.
pub const LARGEST: usize = 128;

/// One step of the recursive LU, unrolled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Factor columns `c..c + w` (w ≤ 16) on all rows from c down.
    Panel { c: usize, w: usize },
    /// Columns `c + n1..c + n`: the rows `c..c + n1` solved with the unit lower factor of columns
    /// `c..c + n1`, the rows below less their products over those columns.
    Update { c: usize, n1: usize, n: usize },
}

pub(super) fn steps(c: usize, n: usize, out: &mut Vec<Step>) {
    if n <= 16 {
        out.push(Step::Panel { c, w: n });
        return;
    }
    let mut n1 = 16;
    while n1 * 2 < n {
        n1 *= 2;
    }
    steps(c, n1, out);
    out.push(Step::Update { c, n1, n });
    steps(c + n1, n - n1, out);
}

/// How MKL's triangular solves cut m rows: blocks of 48 over the rows up to the last multiple of
/// 16, then the rest by its binary digits, largest first (23: 16, 4, 2, 1; 64: 48, 16).
fn blocks(m: usize) -> Vec<std::ops::Range<usize>> {
    let whole = m / 16 * 16;
    let mut out = vec![];
    let mut s = 0;
    while s < whole {
        let e = (s + 48).min(whole);
        out.push(s..e);
        s = e;
    }
    for bit in [8, 4, 2, 1] {
        if (m - s) & bit != 0 {
            out.push(s..s + bit);
            s += bit;
        }
    }
    out
}

/// `(I + B)⁻¹` of one r×r block `bi` (row-major), r from 17 to [`LARGEST`], each multiply-add one
/// fused operation (the Intel processor; the AMD one's is [`super::crout`]).
#[inline(always)]
pub(super) fn inverse(bi: &[f32], r: usize) -> Vec<f32> {
    let mut a = identity_plus(bi, r);
    let mut perm: Vec<usize> = (0..r).collect();
    let mut plan = vec![];
    steps(0, r, &mut plan);
    for step in plan {
        match step {
            Step::Panel { c, w } => panel(&mut a, r, c, w, &mut perm),
            Step::Update { c, n1, n } => {
                let cols = c + n1..c + n;
                solve_down(&mut a, r, c, c + n1, cols.clone());
                // the rows below less their products over the left part: a GEMM's sums
                let mut g = vec![0f32; cols.len()];
                for i in c + n1..r {
                    let (above, rest) = a.split_at_mut(i * r);
                    g.fill(0.0);
                    for k in c..c + n1 {
                        add_products(&mut g, rest[k], &above[k * r + cols.start..][..cols.len()], true);
                    }
                    subtract(&mut rest[cols.clone()], &g);
                }
            }
        }
    }
    let mut x = permuted_identity(&perm);
    forward(&mut x, &a, r);
    backward(&mut x, &a, r);
    x
}

/// Rows `lo..hi` of columns `cols` of `a` solved with the unit lower factor in `a`'s rows and
/// columns `lo..hi`, in [`blocks`] of those rows: each row first less one sum over the blocks
/// above its own (from +0, in order), then less its products within its block, in order.
#[inline(always)]
fn solve_down(a: &mut [f32], r: usize, lo: usize, hi: usize, cols: std::ops::Range<usize>) {
    let w = cols.len();
    let mut g = vec![0f32; w];
    for rows in blocks(hi - lo) {
        let (b0, b1) = (lo + rows.start, lo + rows.end);
        for i in b0..b1 {
            let (above, rest) = a.split_at_mut(i * r);
            // row i: its multipliers (columns below hi) and its values in cols
            let (l, row) = rest[..r].split_at_mut(cols.start);
            let row = &mut row[..w];
            if b0 > lo {
                g.fill(0.0);
                for k in lo..b0 {
                    add_products(&mut g, l[k], &above[k * r + cols.start..][..w], true);
                }
                subtract(row, &g);
            }
            for k in b0..i {
                add_products(row, -l[k], &above[k * r + cols.start..][..w], true);
            }
        }
    }
}

/// The forward solve of `P·I` (in `x`, `[r, r]`) with the unit lower factor in `a`.
#[inline(always)]
fn forward(x: &mut [f32], a: &[f32], r: usize) {
    let mut g = vec![0f32; r];
    for rows in blocks(r) {
        for i in rows.clone() {
            let (above, rest) = x.split_at_mut(i * r);
            let row = &mut rest[..r];
            if rows.start > 0 {
                g.fill(0.0);
                for k in 0..rows.start {
                    add_products(&mut g, a[i * r + k], &above[k * r..][..r], true);
                }
                subtract(row, &g);
            }
            for k in rows.start..i {
                add_products(row, -a[i * r + k], &above[k * r..][..r], true);
            }
        }
    }
}

/// The backward solve of `x` (`[r, r]`) with the upper factor in `a`: the same blocks from the
/// bottom, each row less one sum over the blocks below (from +0, ascending), then its products
/// within its block from the right, then multiplied by the pivot's rounded reciprocal.
#[inline(always)]
fn backward(x: &mut [f32], a: &[f32], r: usize) {
    let mut g = vec![0f32; r];
    for rows in blocks(r).into_iter().rev() {
        for i in rows.clone().rev() {
            let recip = 1.0 / a[i * r + i];
            let (head, below) = x.split_at_mut((i + 1) * r);
            let row = &mut head[i * r..];
            // row k of x is below[(k − i − 1)·r..]
            if rows.end < r {
                g.fill(0.0);
                for k in rows.end..r {
                    add_products(&mut g, a[i * r + k], &below[(k - i - 1) * r..][..r], true);
                }
                subtract(row, &g);
            }
            for k in (i + 1..rows.end).rev() {
                add_products(row, -a[i * r + k], &below[(k - i - 1) * r..][..r], true);
            }
            row.iter_mut().for_each(|v| *v *= recip);
        }
    }
}

/// Factor the panel of columns `c..c + w` on rows `c..r` of `a`, swapping whole rows.
#[inline(always)]
fn panel(a: &mut [f32], r: usize, c: usize, w: usize, perm: &mut [usize]) {
    let mut l = [0f32; 16];
    let mut u = [0f32; 16];
    for j in c..c + w {
        // the column, the diagonal down
        let vectors_end = j + (r - j) / 16 * 16;
        for i in j..r {
            let mut acc = a[i * r + j];
            let mut k0 = c;
            if j - c >= 8 && i < vectors_end {
                for k in 0..8 {
                    l[k] = a[i * r + c + k];
                    u[k] = a[(c + k) * r + j];
                }
                acc = eight(acc, &l, &u);
                k0 = c + 8;
            }
            a[i * r + j] = (k0..j).fold(acc, |acc, k| (-a[i * r + k]).mul_add(a[k * r + j], acc));
        }
        pivot(a, r, j, perm);
        let recip = 1.0 / a[j * r + j];
        for i in j + 1..r {
            a[i * r + j] *= recip;
        }
        // the row, right of the diagonal within the panel: 8 columns at a time, then 4, in
        // vectors; the rest one by one, summed otherwise
        let n = j - c;
        if n == 0 {
            continue;
        }
        l[..n].copy_from_slice(&a[j * r + c..j * r + j]);
        let m = c + w - 1 - j;
        let vectors = m / 8 * 8 + if m % 8 >= 4 { 4 } else { 0 };
        for (t, col) in (j + 1..c + w).enumerate() {
            for k in 0..n {
                u[k] = a[(c + k) * r + col];
            }
            a[j * r + col] -= dot(&l[..n], &u[..n], t < vectors);
        }
    }
}

/// `a − Σ l_k·u_k` over 8 products as MKL's panel sums a column in a full vector of rows:
/// `((a − p₆ − p₄) − (p₅ + p₇)) − ((p₀ + p₂) + (p₁ + p₃))`, the first two fused into a, and in
/// each pair the second product rounded, the first fused into it.
#[inline(always)]
fn eight(a: f32, l: &[f32; 16], u: &[f32; 16]) -> f32 {
    let e = (-l[6]).mul_add(u[6], a);
    let e = (-l[4]).mul_add(u[4], e);
    let e = e - l[5].mul_add(u[5], l[7] * u[7]);
    let low = l[0].mul_add(u[0], l[2] * u[2]) + l[1].mul_add(u[1], l[3] * u[3]);
    e - low
}

/// `Σ l_k·u_k` as MKL's panel sums a row: in 8 lanes, product k ≥ 1 in lane (k − 1) mod 8 (each
/// rounded, then added to its lane's sum), the lanes then halved (lane i + 4 to lane i, then
/// i + 2, then 1). In a vector of columns (`vector`) lane 0 starts from p₀ with p₁ fused into it;
/// one by one, p₀ is added to the halved sum last.
#[inline(always)]
fn dot(l: &[f32], u: &[f32], vector: bool) -> f32 {
    let n = l.len();
    let mut lanes = [0f32; 8];
    let mut used = [false; 8];
    let first = if vector {
        lanes[0] = l[0] * u[0];
        used[0] = true;
        if n > 1 {
            lanes[0] = l[1].mul_add(u[1], lanes[0]);
        }
        2
    } else {
        1
    };
    for k in first..n {
        let lane = (k - 1) % 8;
        let p = l[k] * u[k];
        lanes[lane] = if used[lane] { lanes[lane] + p } else { p };
        used[lane] = true;
    }
    let mut width = 8;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            if used[i + width] {
                lanes[i] = if used[i] { lanes[i] + lanes[i + width] } else { lanes[i + width] };
                used[i] = true;
            }
        }
    }
    match (vector, used[0]) {
        (true, _) => lanes[0],
        (false, true) => l[0] * u[0] + lanes[0],
        (false, false) => l[0] * u[0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_and_blocks_are_those_found() {
        let mut s = vec![];
        steps(0, 40, &mut s);
        let want = [
            Step::Panel { c: 0, w: 16 },
            Step::Update { c: 0, n1: 16, n: 32 },
            Step::Panel { c: 16, w: 16 },
            Step::Update { c: 0, n1: 32, n: 40 },
            Step::Panel { c: 32, w: 8 },
        ];
        assert_eq!(s, want);
        assert_eq!(blocks(23), [0..16, 16..20, 20..22, 22..23]);
        assert_eq!(blocks(64), [0..48, 48..64]);
        assert_eq!(blocks(48).len(), 1);
        assert_eq!(blocks(48)[0], 0..48);
        assert_eq!(blocks(128), [0..48, 48..96, 96..128]);
        assert_eq!(blocks(17), [0..16, 16..17]);
    }

    #[test]
    fn the_sums_are_in_the_trees_found() {
        // products of 1 and one pair ±2⁴⁰: the sum counts the ones outside the pair's subtree
        let big = (2f32).powi(40);
        let probe = |n: usize, x: usize, y: usize, vector: bool| {
            let l = vec![1f32; n];
            let mut u = vec![1f32; n];
            u[x] = big;
            u[y] = -big;
            dot(&l, &u, vector)
        };
        // 6 products in a vector: ((((0+1)+5)+3)+(2+4)): 0 and 5 meet with 3 left to add after
        assert_eq!(probe(6, 0, 5, true), 3.0);
        assert_eq!(probe(6, 2, 4, true), 4.0);
        assert_eq!(probe(6, 0, 2, true), 0.0);
        // one by one: 0 + ((((1+5)+3)+(2+4))): 0 is added last
        assert_eq!(probe(6, 1, 5, false), 4.0);
        assert_eq!(probe(6, 0, 1, false), 0.0);
        // eight: ((a − p6 − p4) − (p5 + p7)) − ((p0 + p2) + (p1 + p3))
        let e = |x: usize, y: usize| {
            let l = [1f32; 16];
            let mut u = [1f32; 16];
            u[x] = big;
            u[y] = -big;
            -eight(0.0, &l, &u)
        };
        assert_eq!(e(6, 4), 6.0);
        assert_eq!(e(5, 7), 6.0);
        assert_eq!(e(6, 5), 4.0);
        assert_eq!(e(0, 2), 6.0);
        assert_eq!(e(0, 6), 0.0);
    }
}
