//! `(I + B_i)⁻¹` of each r×r block of a raw little-endian f32 file, as bone-tool computes it for a
//! BAT unmerge (`ops::bat_inverses_as_torch`), written raw to stdout: for
//! `fixtures/check_inverses.py`, which holds them to torch's own `inverse`.
//!
//!     cargo run --release --example inverses -- R BLOCKS.f32 [intel|amd|intel-any|amd-any] > INVERSES.f32
//!
//! `intel-any` and `amd-any` call `ops::inverse_as_torch` itself with that processor's model at
//! any r up to 256, also where bone-tool does not claim it is torch's, to see how far it holds.

use bone_tool::ops::{bat_inverses_as_torch, inverse_as_torch, BatSums};
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 3, "usage: inverses R BLOCKS.f32 [intel|amd|intel-any|amd-any]");
    let r: usize = args[1].parse()?;
    let model = args.get(3).map(String::as_str);
    let bytes = std::fs::read(&args[2])?;
    let b: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    anyhow::ensure!(b.len().is_multiple_of(r * r), "{} values are not whole {r}×{r} blocks", b.len());
    let (sums, any) = match model {
        None | Some("intel") => (BatSums::Intel, false),
        Some("amd") => (BatSums::Amd, false),
        Some("intel-any") => (BatSums::Intel, true),
        Some("amd-any") => (BatSums::Amd, true),
        Some(other) => anyhow::bail!("unknown processor {other:?}: intel, amd, intel-any or amd-any"),
    };
    let inv: Vec<f32> = if any {
        anyhow::ensure!((1..=256).contains(&r), "the models cover r = 1 to 256, not {r}");
        b.chunks(r * r).enumerate().flat_map(|(block, bi)| inverse_as_torch(bi, r, sums, block)).collect()
    } else {
        anyhow::ensure!(sums.inverts_as_torch(r), "bone-tool does not invert as torch at r = {r}");
        bat_inverses_as_torch(&b, r, sums).map_err(|e| anyhow::anyhow!("block {} is singular", e.block))?.inv
    };
    let out: Vec<u8> = inv.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::io::stdout().write_all(&out)?;
    Ok(())
}
