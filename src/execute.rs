//! Executing a plan on the CPU: for each output shard, the header first, then each tensor in
//! order: untouched tensors are copied as bytes, changed ones are decoded to f32, put through
//! their op chain and encoded back. Memory holds one tensor at a time.

use crate::adapter::Adapter;
use crate::error::{input, Interrupted, Result};
use crate::model::output::ShardWriter;
use crate::model::{Model, SafetensorsFile, TensorEntry};
use crate::ops::dtype::Float;
use crate::ops::{self, expand_transposed, Prepared};
use crate::plan::{Op, Plan, TensorJob};
use anyhow::Context;
use indicatif::ProgressBar;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ask a running execution to stop at the next tensor or chunk (the Ctrl-C handler calls this).
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Bytes copied per read when a tensor passes through untouched.
const COPY_CHUNK: usize = 8 << 20;

/// Write every file of the plan into `dir`.
pub fn run(
    plan: &Plan,
    base: &Model,
    adapters: &[Adapter],
    dir: &Path,
    progress: &ProgressBar,
) -> Result<()> {
    let total_tensors: usize = plan.shards.iter().map(|s| s.jobs.len()).sum();
    let mut done = 0;
    let mut buf = vec![];
    for shard in &plan.shards {
        let input = &base.shards[shard.input];
        let mut w =
            ShardWriter::create(&dir.join(&shard.file_name), &shard.header, shard.data_bytes)?;
        progress.inc(shard.header.len() as u64);
        for job in &shard.jobs {
            check_interrupt()?;
            if job.ops.is_empty() {
                copy_tensor(input, &job.src, &mut w, &mut buf, progress)?;
            } else {
                let bytes = compute(job, input, adapters)?;
                w.write(&bytes)?;
                progress.inc(bytes.len() as u64);
            }
            done += 1;
            progress.set_message(format!("tensor {done}/{total_tensors}"));
        }
        w.finish()?;
    }
    if let Some((name, index)) = &plan.index {
        let text = serde_json::to_string_pretty(index)? + "\n";
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    }
    for f in &plan.side_files {
        let to = dir.join(f.file_name().expect("listed from a folder"));
        std::fs::copy(f, &to)
            .with_context(|| format!("cannot copy {} to {}", f.display(), to.display()))?;
    }
    Ok(())
}

fn copy_tensor(
    input: &SafetensorsFile,
    t: &TensorEntry,
    w: &mut ShardWriter,
    buf: &mut Vec<u8>,
    progress: &ProgressBar,
) -> Result<()> {
    let mut at = t.start;
    while at < t.end {
        check_interrupt()?;
        let n = ((t.end - at) as usize).min(COPY_CHUNK);
        buf.resize(n, 0);
        input.read_at(at, &mut buf[..n])?;
        w.write(&buf[..n])?;
        progress.inc(n as u64);
        at += n as u64;
    }
    Ok(())
}

fn read_floats(file: &SafetensorsFile, t: &TensorEntry) -> Result<Vec<f32>> {
    let float = Float::from_dtype(t.dtype).expect("the plan checked every dtype");
    let bytes = file.read_tensor(t)?;
    let mut out = vec![0f32; t.numel()];
    float.decode(&bytes, &mut out);
    Ok(out)
}

/// Run a tensor's op chain; returns the bytes to write.
fn compute(job: &TensorJob, src_file: &SafetensorsFile, adapters: &[Adapter]) -> Result<Vec<u8>> {
    // A replacement overrides everything before it: start from the last one, or from the base.
    let last_replace = job
        .ops
        .iter()
        .rposition(|op| matches!(op, Op::Replace { .. }));
    let (mut bytes, rest) = match last_replace {
        Some(k) => {
            let Op::Replace { adapter, src } = &job.ops[k] else {
                unreachable!()
            };
            let raw = adapters[*adapter].file.read_tensor(src)?;
            let bytes = if src.dtype == job.src.dtype {
                raw
            } else {
                convert(&raw, src, &job.src)?
            };
            (bytes, &job.ops[k + 1..])
        }
        None => (src_file.read_tensor(&job.src)?, &job.ops[..]),
    };
    if rest.is_empty() {
        return Ok(bytes);
    }
    let d = job.weight_float().ok_or_else(|| {
        input(format!(
            "tensor {:?} has dtype {:?}: only float tensors can be changed",
            job.name, job.src.dtype
        ))
    })?;
    let [o, i] = job.src.shape[..] else {
        return Err(input(format!(
            "tensor {:?} has shape {:?}, expected [out, in]",
            job.name, job.src.shape
        )));
    };
    let prepared = rest
        .iter()
        .map(|op| prepare(op, &job.name, o, adapters))
        .collect::<Result<Vec<_>>>()?;
    ops::apply_chain(&mut bytes, d, o, i, &prepared);
    Ok(bytes)
}

/// A replacement stored in another float dtype than the base tensor: cast it (round to nearest even).
fn convert(raw: &[u8], from: &TensorEntry, to: &TensorEntry) -> Result<Vec<u8>> {
    let (f, t) = (Float::from_dtype(from.dtype), Float::from_dtype(to.dtype));
    let (Some(f), Some(t)) = (f, t) else {
        return Err(input(format!(
            "cannot cast {:?} from {:?} to {:?}",
            from.name, from.dtype, to.dtype
        )));
    };
    let mut vals = vec![0f32; from.numel()];
    f.decode(raw, &mut vals);
    let mut out = vec![0u8; vals.len() * t.size()];
    t.encode(&vals, &mut out);
    Ok(out)
}

/// Load an op's blocks (and invert them for BAT unmerge).
fn prepare(op: &Op, tensor: &str, o: usize, adapters: &[Adapter]) -> Result<Prepared> {
    Ok(match op {
        Op::Replace { .. } => unreachable!("the chain starts after the last replacement"),
        Op::Periodic {
            adapter,
            block,
            r,
            cols,
            sign,
            rounding,
        } => {
            let mut blk = read_floats(&adapters[*adapter].file, block)?;
            rounding.load_block(&mut blk);
            Prepared::Periodic {
                et: expand_transposed(&blk, *r, *cols, o),
                r: *r,
                sign: *sign,
                rounding: *rounding,
            }
        }
        Op::Bat {
            adapter,
            block,
            r,
            inverse,
            rounding,
        } => {
            let a = &adapters[*adapter];
            let mut b = read_floats(&a.file, block)?;
            rounding.load_block(&mut b);
            if *inverse {
                let inv = ops::bat_inverses(&b, *r).map_err(|s| {
                    input(format!(
                        "{}: {tensor:?}: block {}: I + B is singular (condition number {:.3e})",
                        a.dir.display(),
                        s.block,
                        s.cond
                    ))
                })?;
                Prepared::BatUnmerge {
                    b,
                    inv: inv.inv,
                    r: *r,
                    rounding: *rounding,
                }
            } else {
                Prepared::BatMerge {
                    b,
                    r: *r,
                    rounding: *rounding,
                }
            }
        }
    })
}
