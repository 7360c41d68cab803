//! Executing a plan on the CPU: for each output shard, the header first, then each tensor in
//! order: untouched tensors are copied as bytes, changed ones are decoded to f32, put through
//! their op chain and encoded back. Memory holds one tensor at a time.

use crate::adapter::Adapter;
use crate::error::{input, Interrupted, Result};
use crate::model::output::ShardWriter;
use crate::model::{Model, SafetensorsFile, TensorEntry};
use crate::ops::dtype::Float;
use crate::ops::{self, add_periodic, bat_merge, bat_unmerge, expand_transposed};
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
    // A replacement of the same dtype with nothing after it is a byte copy.
    if let [Op::Replace { adapter, src }] = job.ops.as_slice() {
        if src.dtype == job.src.dtype {
            return adapters[*adapter].file.read_tensor(src);
        }
    }
    let d = job.weight_float().ok_or_else(|| {
        input(format!(
            "tensor {:?} has dtype {:?}: only float tensors can be changed",
            job.name, job.src.dtype
        ))
    })?;
    let (o, i) = match job.src.shape.as_slice() {
        [o, i] => (*o, *i),
        _ => (0, 0),
    };
    let mut w: Option<Vec<f32>> = None;
    for op in &job.ops {
        match op {
            Op::Replace { adapter, src } => {
                let mut v = read_floats(&adapters[*adapter].file, src)?;
                d.round(&mut v);
                w = Some(v);
            }
            Op::Periodic {
                adapter,
                block,
                r,
                cols,
                sign,
                rounding,
            } => {
                let v = match &mut w {
                    Some(v) => v,
                    None => w.insert(read_floats(src_file, &job.src)?),
                };
                let mut blk = read_floats(&adapters[*adapter].file, block)?;
                rounding.load_block(&mut blk);
                let et = expand_transposed(&blk, *r, *cols, o);
                add_periodic(v, o, i, &et, *r, *sign, *rounding);
            }
            Op::Bat {
                adapter,
                block,
                r,
                inverse,
                rounding,
            } => {
                let v = match &mut w {
                    Some(v) => v,
                    None => w.insert(read_floats(src_file, &job.src)?),
                };
                let a = &adapters[*adapter];
                let mut blk = read_floats(&a.file, block)?;
                rounding.load_block(&mut blk);
                if *inverse {
                    let inv = ops::bat_inverses(&blk, *r).map_err(|s| {
                        input(format!(
                            "{}: {:?}: block {}: I + B is singular (condition number {:.3e})",
                            a.dir.display(),
                            job.name,
                            s.block,
                            s.cond
                        ))
                    })?;
                    bat_unmerge(v, o, i, &blk, &inv.inv, *r, *rounding);
                } else {
                    bat_merge(v, o, i, &blk, *r, *rounding);
                }
            }
        }
    }
    let v = w.expect("a job with ops sets its values");
    let mut out = vec![0u8; v.len() * d.size()];
    d.encode(&v, &mut out);
    Ok(out)
}
