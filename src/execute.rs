//! Executing a plan on the CPU, as a three-stage pipeline so that disk and math overlap:
//! a reader thread reads each changed tensor's bytes, this thread runs its op chain in place
//! (in parallel over row strips), and a writer thread writes the shards in order: header first,
//! then each tensor; untouched tensors go from input to output inside the kernel
//! (`copy_file_range`) without passing through memory. Each finished shard is fsynced in the
//! background while the next one is written. At most a few tensors are in memory at once.

use crate::adapter::Adapter;
use crate::error::{input, Interrupted, Result};
use crate::model::output::ShardWriter;
use crate::model::{Model, SafetensorsFile, TensorBytes, TensorEntry};
use crate::ops::dtype::Float;
use crate::ops::{self, expand_transposed, Prepared};
use crate::plan::{Op, Plan, TensorJob};
use anyhow::Context;
use indicatif::ProgressBar;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender};

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

/// A BAT block whose `I + B` has a larger condition number earns a warning on unmerge.
const BADLY_CONDITIONED: f64 = 1e3;

/// Bytes copied per step when a tensor passes through untouched (progress and Ctrl-C in between).
const COPY_CHUNK: u64 = 64 << 20;

/// One tensor on its way through the pipeline.
enum Payload<'a> {
    /// Bytes that pass through unchanged, copied file to file.
    Copy { file: &'a SafetensorsFile, start: u64, len: u64 },
    /// The bytes a chain starts from (mapped), for the compute stage.
    Source(TensorBytes),
    /// The result, for the writer.
    Bytes(Vec<u8>),
}

/// Write every file of the plan into `dir`.
/// Returns warnings found on the way (badly conditioned BAT blocks).
pub fn run(plan: &Plan, base: &Model, adapters: &[Adapter], dir: &Path, progress: &ProgressBar) -> Result<Vec<String>> {
    let mut warnings = vec![];
    std::thread::scope(|scope| {
        let (to_compute, from_reader) = sync_channel::<Result<Payload>>(1);
        let (to_writer, from_compute) = sync_channel::<Payload>(1);
        // Written buffers come back to the compute stage: no fresh pages to fault in per tensor.
        let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();

        scope.spawn(move || {
            for shard in &plan.shards {
                let input = &base.shards[shard.input];
                for job in &shard.jobs {
                    let item = check_interrupt().and_then(|_| source(job, input, adapters));
                    let failed = item.is_err();
                    if to_compute.send(item).is_err() || failed {
                        return;
                    }
                }
            }
        });

        let writer = scope.spawn(move || write_all(plan, dir, from_compute, recycle, progress, scope));

        let mut computed: Result<()> = Ok(());
        let jobs = plan.shards.iter().flat_map(|s| s.jobs.iter());
        for (item, job) in from_reader.into_iter().zip(jobs) {
            let step = item.and_then(|payload| match payload {
                Payload::Source(src) => {
                    let mut out = recycled.try_recv().unwrap_or_default();
                    compute(job, src.bytes(), &mut out, adapters, &mut warnings)?;
                    Ok(Payload::Bytes(out))
                }
                other => Ok(other),
            });
            match step {
                Ok(item) => {
                    if to_writer.send(item).is_err() {
                        break; // the writer failed: its error is the one to report
                    }
                }
                Err(e) => {
                    computed = Err(e);
                    break;
                }
            }
        }
        drop(to_writer);
        let written =
            writer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the writer thread panicked")));
        computed?;
        written
    })?;
    if let Some((name, index)) = &plan.index {
        let text = serde_json::to_string_pretty(index)? + "\n";
        std::fs::write(dir.join(name), text).with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    }
    for f in &plan.side_files {
        let to = dir.join(f.file_name().expect("listed from a folder"));
        std::fs::copy(f, &to).with_context(|| format!("cannot copy {} to {}", f.display(), to.display()))?;
    }
    Ok(warnings)
}

/// The writer stage: every shard in order, each tensor as it arrives; fsyncs run in the background.
fn write_all<'scope>(
    plan: &'scope Plan,
    dir: &'scope Path,
    items: Receiver<Payload<'scope>>,
    recycle: Sender<Vec<u8>>,
    progress: &'scope ProgressBar,
    scope: &'scope std::thread::Scope<'scope, '_>,
) -> Result<()> {
    let total: usize = plan.shards.iter().map(|s| s.jobs.len()).sum();
    let mut done = 0;
    let mut syncs = vec![];
    for shard in &plan.shards {
        let mut w = ShardWriter::create(&dir.join(&shard.file_name), &shard.header, shard.data_bytes)?;
        progress.inc(shard.header.len() as u64);
        for _ in &shard.jobs {
            let Ok(item) = items.recv() else {
                return Ok(()); // the compute stage stopped early and reports why
            };
            match item {
                Payload::Bytes(b) => {
                    w.write(&b)?;
                    progress.inc(b.len() as u64);
                    let _ = recycle.send(b);
                }
                Payload::Copy { file, start, len } => {
                    let mut at = start;
                    while at < start + len {
                        check_interrupt()?;
                        let n = (start + len - at).min(COPY_CHUNK);
                        w.copy_from(file.file(), at, n)?;
                        progress.inc(n);
                        at += n;
                    }
                }
                Payload::Source(_) => unreachable!("the compute stage turns sources into bytes"),
            }
            done += 1;
            progress.set_message(format!("tensor {done}/{total}"));
        }
        let (file, path) = w.finish()?;
        syncs.push(scope.spawn(move || file.sync_all().with_context(|| format!("cannot sync {}", path.display()))));
    }
    for s in syncs {
        s.join().unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: an fsync thread panicked")))?;
    }
    Ok(())
}

/// What a job starts from: a byte copy (untouched, or replaced outright by a tensor of the same
/// dtype), or the bytes its op chain runs on: the last replacement's (cast to the base tensor's
/// dtype) or the base tensor's.
fn source<'a>(job: &TensorJob, base: &'a SafetensorsFile, adapters: &'a [Adapter]) -> Result<Payload<'a>> {
    let last = job.ops.iter().rposition(|op| matches!(op, Op::Replace { .. }));
    let (file, entry) = match last.map(|k| &job.ops[k]) {
        Some(Op::Replace { adapter, src }) if src.dtype != job.src.dtype => {
            let raw = adapters[*adapter].file.read_tensor(src)?;
            return Ok(Payload::Source(TensorBytes::Owned(convert(&raw, src, &job.src)?)));
        }
        Some(Op::Replace { adapter, src }) => (&adapters[*adapter].file, src),
        _ => (base, &job.src),
    };
    let chain_len = job.ops.len() - last.map_or(0, |k| k + 1);
    if chain_len == 0 {
        return Ok(Payload::Copy { file, start: entry.start, len: entry.len_bytes() });
    }
    Ok(Payload::Source(file.map_tensor(entry)?))
}

/// Run the op chain after the last replacement on `src`, writing the result into `out`.
fn compute(
    job: &TensorJob,
    src: &[u8],
    out: &mut Vec<u8>,
    adapters: &[Adapter],
    warnings: &mut Vec<String>,
) -> Result<()> {
    let start = job.ops.iter().rposition(|op| matches!(op, Op::Replace { .. })).map_or(0, |k| k + 1);
    let d = job.weight_float().ok_or_else(|| {
        input(format!("tensor {:?} has dtype {:?}: only float tensors can be changed", job.name, job.src.dtype))
    })?;
    let [o, i] = job.src.shape[..] else {
        return Err(input(format!("tensor {:?} has shape {:?}, expected [out, in]", job.name, job.src.shape)));
    };
    let prepared =
        job.ops[start..].iter().map(|op| prepare(op, &job.name, o, adapters, warnings)).collect::<Result<Vec<_>>>()?;
    // Only growth is zero-filled; a recycled buffer is reused as it is, then overwritten.
    if out.len() < src.len() {
        out.resize(src.len(), 0);
    }
    out.truncate(src.len());
    ops::apply_chain(src, out, d, o, i, &prepared);
    Ok(())
}

/// A replacement stored in another float dtype than the base tensor: cast it (round to nearest even).
fn convert(raw: &[u8], from: &TensorEntry, to: &TensorEntry) -> Result<Vec<u8>> {
    let (f, t) = (Float::from_dtype(from.dtype), Float::from_dtype(to.dtype));
    let (Some(f), Some(t)) = (f, t) else {
        return Err(input(format!("cannot cast {:?} from {:?} to {:?}", from.name, from.dtype, to.dtype)));
    };
    let mut vals = vec![0f32; from.numel()];
    f.decode(raw, &mut vals);
    let mut out = vec![0u8; vals.len() * t.size()];
    t.encode(&vals, &mut out);
    Ok(out)
}

/// Load an op's blocks (and invert them for BAT unmerge).
fn prepare(op: &Op, tensor: &str, o: usize, adapters: &[Adapter], warnings: &mut Vec<String>) -> Result<Prepared> {
    Ok(match op {
        Op::Replace { .. } => unreachable!("the chain starts after the last replacement"),
        Op::Periodic { adapter, block, r, cols, sign, rounding } => {
            let mut blk = read_floats(&adapters[*adapter].file, block)?;
            rounding.load_block(&mut blk);
            Prepared::Periodic { et: expand_transposed(&blk, *r, *cols, o), r: *r, sign: *sign, rounding: *rounding }
        }
        Op::Bat { adapter, block, r, inverse, rounding } => {
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
                let (worst, cond) =
                    inv.cond.iter().enumerate().fold((0, 0f64), |m, (k, &c)| if c > m.1 { (k, c) } else { m });
                if cond > BADLY_CONDITIONED {
                    warnings.push(format!(
                        "{}: {tensor:?}: block {worst}: I + B has condition number {cond:.3e}; \
                         the unmerge multiplies rounding errors by about that much",
                        a.dir.display()
                    ));
                }
                Prepared::BatUnmerge { b, inv: inv.inv, r: *r, rounding: *rounding }
            } else {
                Prepared::BatMerge { b, r: *r, rounding: *rounding }
            }
        }
    })
}

fn read_floats(file: &SafetensorsFile, t: &TensorEntry) -> Result<Vec<f32>> {
    let float = Float::from_dtype(t.dtype).expect("the plan checked every dtype");
    let bytes = file.read_tensor(t)?;
    let mut out = vec![0f32; t.numel()];
    float.decode(&bytes, &mut out);
    Ok(out)
}
