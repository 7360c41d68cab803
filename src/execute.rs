//! Executing a plan on the CPU, as a three-stage pipeline so that disk and math overlap:
//! a reader thread reads each changed tensor's bytes, this thread runs its op chain in place
//! (in parallel over row strips), and a writer thread writes the shards in order: header first,
//! then each tensor; untouched tensors go from input to output inside the kernel
//! (`copy_file_range`) without passing through memory. Each finished shard is fsynced in the
//! background while the next one is written. At most a few tensors are in memory at once.
//! On many cores a single output's shards are written a few at a time, each by a writer of its
//! own, the reader interleaving their tensors (`parallel_writers`).

use crate::adapter::Adapter;
use crate::backend::{cpu_only, has_gemm, same_bytes_on_every_device, Device, Opening, Ticket};
use crate::error::{input, Interrupted, Result};
use crate::model::output::ShardWriter;
use crate::model::{Model, SafetensorsFile, TensorBytes, TensorEntry};
use crate::ops::dtype::Float;
use crate::ops::{self, expand_transposed, Prepared};
use crate::plan::{Op, OutShard, Plan, TensorJob};
use anyhow::Context;
use indicatif::ProgressBar;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ask a running execution to stop at the next tensor or chunk (the Ctrl-C handler calls this).
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Err(Interrupted) once Ctrl-C or SIGTERM came: long loops outside an execution call it too.
pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Where the computed tensors go.
#[derive(Clone, Copy)]
pub enum Sink<'a> {
    /// Written as the plan's files into this folder.
    Folder(&'a Path),
    /// Compared, piece by piece, with the same tensors of this model (nothing is written).
    Compare(&'a Model),
    /// As `Compare`, but the run stops after the first tensor that is neither equal nor within one
    /// ulp, whose check is then the last: whether a way of merging matches at all costs only up to
    /// its first difference.
    CompareUntilDifferent(&'a Model),
}

/// How one tensor compares with the model it is checked against.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorCheck {
    pub name: String,
    /// "equal", "within_1_ulp", "differs", "missing" (not in the other model), "extra" (only in
    /// the other model), "dtype_changed" or "shape_changed"; `verify --tolerance` adds
    /// "within_tolerance".
    pub status: String,
    pub max_abs: f64,
    pub max_ulp: u64,
    /// How many values differ at all (float tensors).
    pub values_off: u64,
    /// For the tensors the adapters change: the largest |value| of the other model's tensor, and
    /// `max_abs` relative to it (0 where the tensor is all zeros or equal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel: Option<f64>,
}

impl TensorCheck {
    fn new(name: &str, status: &str) -> TensorCheck {
        TensorCheck {
            name: name.to_string(),
            status: status.into(),
            max_abs: 0.0,
            max_ulp: 0,
            values_off: 0,
            scale: None,
            max_rel: None,
        }
    }
}

/// How a plan is carried out.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// fsync every shard before returning.
    pub fsync: bool,
    /// While a GPU is opening, compute on the CPU the chains whose bytes are the same on both.
    pub cpu_while_opening: bool,
    /// Compute the default/mini adds on the CPU even once a GPU is open (the GPU does BAT only).
    pub adds_on_cpu: bool,
    /// Free a GPU as soon as its last piece is back, so that the driver's teardown runs beside
    /// the writer's tail and fsyncs rather than at the process's exit.
    pub release_early: bool,
    /// Write values that became inf or NaN instead of stopping.
    pub allow_non_finite: bool,
}

/// Where the time of a run went: each stage's busy time in seconds (stages overlap, so they add up
/// to more than the wall time; the largest is the bottleneck).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Reader: loading adapter blocks (and inverting BAT blocks), mapping and cutting tensors.
    pub read: f64,
    /// Compute: the op chains and casts (the reader faults the base's mapped pages in beforehand).
    pub compute: f64,
    /// Writers: writing computed bytes and copying untouched tensors file to file.
    pub write: f64,
    /// fsync of each finished file (in the background).
    pub fsync: f64,
    /// On a GPU, the part of `compute` spent copying to the device, in kernels, and copying back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2d: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d2h: Option<f64>,
    /// On a GPU, the host's copies into and out of page-locked buffers (part of `compute`, not of
    /// the three above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging: Option<f64>,
    /// On a GPU, the part of `compute` spent waiting for a piece's results (the copy back done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_wait: Option<f64>,
    /// On a GPU, each step of starting it (before the pipeline), in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_start: Option<serde_json::Map<String, serde_json::Value>>,
    /// On a GPU, the seconds the pipeline waited for it to open (it opens beside the pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_waited: Option<f64>,
    /// On a GPU, the share of computed bytes the CPU computed: while the GPU was opening (and all
    /// the adds with `RunOptions::adds_on_cpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_while_opening: Option<f64>,
    /// Time each stage spent blocked on its neighbour: the stage that others wait for is the
    /// bottleneck.
    pub waits: Waits,
    /// The whole pipeline, start to end.
    pub wall: f64,
    /// The process's own CPU time and faults so far (from its start), to tell contention apart:
    /// system time and minor faults grow where mapping and unmapping pieces compete with a GPU
    /// driver mapping memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessUsage>,
}

pub use crate::sys::ProcessUsage;

/// Seconds a stage spent blocked: the reader handing a piece on, the compute stage waiting for the
/// next piece or handing one on, the writers waiting for the next piece.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Waits {
    pub read_for_compute: f64,
    pub compute_for_read: f64,
    pub compute_for_write: f64,
    pub write_for_compute: f64,
}

/// What a run reports.
pub struct Report {
    pub warnings: Vec<String>,
    /// For each output, the comparison of a [`Sink::Compare`] (empty for a folder).
    pub checks: Vec<Vec<TensorCheck>>,
    pub timings: Timings,
}

/// A BAT block whose `I + B` has a larger condition number earns a warning on unmerge.
const BADLY_CONDITIONED: f64 = 1e3;

/// Bytes per piece of work: tensors flow through the pipeline in pieces of about this size, so
/// memory stays the same whatever the size of the model or of its largest tensor.
/// (`BONE_TOOL_PIECE_BYTES` overrides it: the tests use tiny pieces to cut small tensors too.)
pub(crate) fn piece_bytes() -> usize {
    static PIECE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PIECE.get_or_init(|| crate::env_setting("BONE_TOOL_PIECE_BYTES").filter(|&n| n > 0).unwrap_or(16 << 20))
}

/// Rows per piece of a tensor whose rows take `row_bytes` and are cut in multiples of `unit`:
/// as many as fit in `piece` bytes, at least one unit.
pub(crate) fn rows_per_piece(piece: usize, row_bytes: usize, unit: usize) -> usize {
    ((piece / row_bytes.max(1)) / unit).max(1) * unit
}

/// One piece of the output, in output order.
enum Piece<'a> {
    /// Bytes that pass through unchanged, copied file to file.
    Copy { file: &'a SafetensorsFile, start: u64, len: u64, last: bool },
    /// Rows `row0..` of a computed tensor: the bytes its chain starts from, and the chain (empty
    /// when the tensor is only cast to another dtype).
    Rows { job: &'a TensorJob, chain: Arc<Vec<Prepared>>, row0: usize, src: TensorBytes, last: bool },
    /// Computed bytes (the first `len` of `data`), for the writer.
    Bytes { data: Vec<u8>, len: usize, last: bool },
}

/// One output of a run: its plan, the adapters its ops refer to, and where its bytes go.
pub struct Output<'a> {
    pub plan: &'a Plan,
    pub adapters: &'a [Adapter],
    pub sink: Sink<'a>,
}

/// A model folder to write.
pub struct Target<'a> {
    pub plan: &'a Plan,
    pub adapters: &'a [Adapter],
    pub dir: &'a Path,
}

/// Write every file of each target's plan into its folder, reading the base once for all of them.
/// Returns warnings found on the way (badly conditioned BAT blocks).
/// With `fsync`, every shard is flushed to disk before this returns.
pub fn run(
    targets: &[Target],
    base: &Model,
    device: &Opening,
    opts: RunOptions,
    progress: &ProgressBar,
) -> Result<Report> {
    let outputs =
        targets.iter().map(|t| Output { plan: t.plan, adapters: t.adapters, sink: Sink::Folder(t.dir) }).collect();
    let report = run_into(outputs, base, device, opts, progress)?;
    for t in targets {
        let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
            let path = t.dir.join(name);
            let text = serde_json::to_string_pretty(value)? + "\n";
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
        };
        if let Some((name, index)) = &t.plan.index {
            write_json(name, index)?;
        }
        if let Some(config) = &t.plan.config {
            write_json("config.json", config)?;
        }
        for f in &t.plan.side_files {
            let to = t.dir.join(f.file_name().expect("listed from a folder"));
            std::fs::copy(f, &to).with_context(|| format!("cannot copy {} to {}", f.display(), to.display()))?;
        }
    }
    Ok(report)
}

/// Run the pipeline into the outputs' sinks.
///
/// One reader walks the base once, in order; for each tensor it hands every output the pieces it
/// needs (the same mapped bytes for all), so N outputs cost one read of the base.
pub fn run_into(
    outputs: Vec<Output>,
    base: &Model,
    device: &Opening,
    opts: RunOptions,
    progress: &ProgressBar,
) -> Result<Report> {
    let started = Instant::now();
    let fsync = opts.fsync;
    let plans: Vec<&Plan> = outputs.iter().map(|o| o.plan).collect();
    let adapters: Vec<&[Adapter]> = outputs.iter().map(|o| o.adapters).collect();
    let busy = Busy::default();
    let busy = &busy;
    let tensors_written = AtomicU64::new(0);
    let tensors_written = &tensors_written;
    std::thread::scope(|scope| -> Result<Report> {
        let (to_compute, from_reader) = sync_channel::<Result<(usize, Piece)>>(1);
        // Written buffers come back to the compute stage: no fresh pages to fault in per piece.
        let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
        let plans = &plans;
        let adapters = &adapters;

        let parallel = parallel_writers(&outputs);
        let reader = scope.spawn(move || {
            let mut warnings = vec![];
            let mut since = Instant::now();
            let mut send = |k, p| {
                busy.add(&busy.read, since.elapsed());
                let t = Instant::now();
                let sent = to_compute.send(Ok((k, p))).is_ok();
                busy.add(&busy.read_waits, t.elapsed());
                since = Instant::now();
                sent
            };
            let sent = read_all(plans, base, adapters, parallel, &mut warnings, &mut send);
            busy.add(&busy.read, since.elapsed());
            if let Err(e) = sent {
                let _ = to_compute.send(Err(e));
            }
            warnings
        });

        // Each output's writers, in the order the compute stage addresses them: one per output, or
        // for a single folder `parallel` of them, writer j writing shards j, j + parallel, ...
        let mut to_writers = vec![];
        let mut writers = vec![];
        for (k, output) in outputs.into_iter().enumerate() {
            let plan = output.plan;
            for j in 0..parallel {
                let (to_writer, from_compute) = sync_channel::<Piece>(1);
                to_writers.push(to_writer);
                let recycle = recycle.clone();
                let shards: Vec<&OutShard> = plan.shards.iter().skip(j).step_by(parallel).collect();
                let announce = k == 0;
                writers.push((
                    k,
                    scope.spawn(move || match output.sink {
                        Sink::Folder(dir) => {
                            let to = Writing { plan, shards, dir, fsync, progress, announce, tensors_written };
                            write_all(to, from_compute, recycle, busy, scope).map(|_| vec![])
                        }
                        Sink::Compare(expected) => compare_all(plan, expected, from_compute, recycle, progress, false),
                        Sink::CompareUntilDifferent(expected) => {
                            compare_all(plan, expected, from_compute, recycle, progress, true)
                        }
                    }),
                ));
            }
        }
        drop(recycle);

        // The device, once it is open; until then the CPU computes the chains whose bytes are the
        // same on both, and a chain that is not waits for it.
        let cpu = Device::Cpu;
        let mut opened = Opened::default();
        let (mut cpu_bytes, mut computed_bytes) = (0u64, 0u64);
        // Pieces in flight on the device, oldest first: a GPU works on the next piece while the
        // previous one is copied back (one at a time on the CPU, which computes as it starts).
        let mut flight: std::collections::VecDeque<Flight> = Default::default();
        let mut spares: Vec<Vec<u8>> = vec![];
        let check = !opts.allow_non_finite;
        let send = |k: usize, piece| {
            let t = Instant::now();
            let sent = to_writers[k].send(piece).is_ok();
            busy.add(&busy.compute_waits_write, t.elapsed());
            sent
        };
        let computed = (|| -> Result<()> {
            let from_reader = from_reader; // dropped on return: a reader blocked on it stops
            loop {
                let t = Instant::now();
                let Ok(item) = from_reader.recv() else { break };
                busy.add(&busy.compute_waits_read, t.elapsed());
                let (k, piece) = item?;
                match piece {
                    Piece::Rows { job, chain, row0, src, last } => {
                        let i = row_view(&job.src).1;
                        let dev = match opened.get(device, false)? {
                            _ if cpu_only(&chain, i) => &cpu,
                            Some(_) if opts.adds_on_cpu && !has_gemm(&chain) => &cpu,
                            Some(d) => d,
                            None if opts.cpu_while_opening && same_bytes_on_every_device(&chain, i) => &cpu,
                            None => opened.get(device, true)?.expect("waited for"),
                        };
                        if !chain.is_empty() {
                            let n = src.bytes().len() as u64;
                            computed_bytes += n;
                            if std::ptr::eq(dev, &cpu) {
                                cpu_bytes += n;
                            }
                        }
                        let out = recycled.try_recv().unwrap_or_default();
                        let stage = spares.pop().unwrap_or_default();
                        let t = Instant::now();
                        let started = Flight::start(dev, k, job, chain, row0, src, last, out, stage, check);
                        busy.add(&busy.compute, t.elapsed());
                        flight.push_back(started?);
                        // the oldest lands while the newest runs (on the CPU: at once)
                        let depth = dev.lanes().max(1);
                        if !land(&mut flight, depth - 1, dev, check, busy, &mut spares, &send)? {
                            return Ok(()); // a writer failed: its error is the one to report
                        }
                    }
                    other => {
                        // anything else waits for the pieces in flight: every writer gets its pieces in order
                        let dev = opened.device.unwrap_or(&cpu);
                        if !land(&mut flight, 0, dev, check, busy, &mut spares, &send)? || !send(k, other) {
                            return Ok(());
                        }
                    }
                }
            }
            land(&mut flight, 0, opened.device.unwrap_or(&cpu), check, busy, &mut spares, &send).map(|_| ())
        })();
        drop(to_writers);
        if computed.is_ok() && opts.release_early {
            if let Some(d) = opened.device {
                d.release();
            }
        }
        let mut written: Vec<Result<Vec<TensorCheck>>> = vec![];
        for (k, w) in writers {
            let result =
                w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the writer thread panicked")));
            if k == written.len() {
                written.push(result);
            } else if let (Ok(_), Err(_)) = (&written[k], &result) {
                written[k] = result; // one result per output: its first error, else its checks
            }
        }
        let warnings = reader.join().unwrap_or_default();
        computed?;
        let checks = written.into_iter().collect::<Result<Vec<_>>>()?;
        let secs = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        // A device still opening is waited for (`--device cuda` must be usable): its start shows.
        let device = device.wait()?;
        let gpu = device.gpu_phases().map(|now| {
            let before: [f64; 5] = opened.gpu_before.unwrap_or(now);
            [0, 1, 2, 3, 4].map(|k| now[k] - before[k])
        });
        if opts.release_early {
            device.release(); // one that opened only after the last piece
        }
        let start = device.startup();
        let on_gpu = gpu.is_some();
        let timings = Timings {
            h2d: gpu.map(|g| g[0]),
            kernels: gpu.map(|g| g[1]),
            d2h: gpu.map(|g| g[2]),
            staging: gpu.map(|g| g[3]),
            gpu_wait: gpu.map(|g| g[4]),
            device_start: (!start.is_empty())
                .then(|| start.into_iter().map(|(what, secs)| (what.to_string(), serde_json::json!(secs))).collect()),
            read: secs(&busy.read),
            waits: Waits {
                read_for_compute: secs(&busy.read_waits),
                compute_for_read: secs(&busy.compute_waits_read),
                compute_for_write: secs(&busy.compute_waits_write),
                write_for_compute: secs(&busy.write_waits),
            },
            compute: secs(&busy.compute),
            write: secs(&busy.write),
            fsync: secs(&busy.fsync),
            device_waited: on_gpu.then_some(opened.waited),
            cpu_while_opening: on_gpu.then(|| {
                if computed_bytes > 0 {
                    cpu_bytes as f64 / computed_bytes as f64
                } else {
                    0.0
                }
            }),
            wall: started.elapsed().as_secs_f64(),
            process: ProcessUsage::now(),
        };
        Ok(Report { warnings, checks, timings })
    })
}

/// The device as the compute stage sees it: None until it is open.
#[derive(Default)]
struct Opened<'d> {
    device: Option<&'d Device>,
    /// Its counters when it opened (they run from its start, the self-check included).
    gpu_before: Option<[f64; 5]>,
    /// Seconds the compute stage waited for it.
    waited: f64,
}

impl<'d> Opened<'d> {
    /// The device if open; with `wait`, wait for it.
    fn get(&mut self, opening: &'d Opening, wait: bool) -> Result<Option<&'d Device>> {
        if self.device.is_none() {
            let t = Instant::now();
            let got = if wait { Some(opening.wait()) } else { opening.get() };
            if let Some(d) = got {
                let d = d?;
                self.waited += t.elapsed().as_secs_f64();
                self.gpu_before = d.gpu_phases();
                self.device = Some(d);
            }
        }
        Ok(self.device)
    }
}

/// Busy time per stage, in nanoseconds, added to by every thread of that stage.
#[derive(Default)]
struct Busy {
    read: AtomicU64,
    read_waits: AtomicU64,
    compute_waits_read: AtomicU64,
    compute_waits_write: AtomicU64,
    write_waits: AtomicU64,
    compute: AtomicU64,
    write: AtomicU64,
    fsync: AtomicU64,
}

impl Busy {
    fn add(&self, stage: &AtomicU64, d: std::time::Duration) {
        stage.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The reader: the outputs' jobs in step (every plan lists the base's tensors in the base's order,
/// some with an untied `lm_head` after the embedding), each tensor cut into pieces for every output
/// that writes it. Returns Ok(false) when a later stage stopped.
fn read_all<'a>(
    plans: &[&'a Plan],
    base: &'a Model,
    adapters: &[&'a [Adapter]],
    parallel: usize,
    warnings: &mut Vec<String>,
    send: &mut dyn FnMut(usize, Piece<'a>) -> bool,
) -> Result<bool> {
    let reads = Reads::new();
    if parallel > 1 {
        // one output, whose shards are written `parallel` at a time: its tensors interleaved, each
        // addressed to the writer of its shard
        for (shard, job) in interleaved(plans[0], parallel) {
            check_interrupt()?;
            let source = source(shard % parallel, job, &base.shards[job.input], adapters[0], warnings)?;
            if !tensor_pieces(&[source], &reads, send)? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    let flat: Vec<Vec<&'a TensorJob>> =
        plans.iter().map(|p| p.shards.iter().flat_map(|s| s.jobs.iter()).collect()).collect();
    let mut at = vec![0usize; flat.len()];
    let head = base.head_name();
    loop {
        check_interrupt()?;
        let next: Vec<Option<&TensorJob>> = flat.iter().zip(&at).map(|(f, &i)| f.get(i).copied()).collect();
        let names: Vec<&str> = next.iter().flatten().map(|j| j.name.as_str()).collect();
        let Some(&first) = names.first() else {
            return Ok(true);
        };
        // An output layer that only some outputs untie (written under the checkpoint's name for it)
        // comes first; otherwise every output is at the same tensor.
        let name = if names.contains(&head.as_str()) { head.as_str() } else { first };
        let mut sources = vec![];
        // (outputs whose tensor of that name has another shape, a vocabulary one resized, take it
        // on a later turn: the pieces of one turn are the same bytes of each output)
        let lead = next.iter().flatten().find(|j| j.name == name).map(|j| (&j.src.shape, j.src.dtype));
        for (k, job) in next.iter().enumerate() {
            if let Some(job) = job.filter(|j| j.name == name && Some((&j.src.shape, j.src.dtype)) == lead) {
                sources.push(source(k, job, &base.shards[job.input], adapters[k], warnings)?);
                at[k] += 1;
            }
        }
        if !tensor_pieces(&sources, &reads, send)? {
            return Ok(false);
        }
    }
}

/// How the reader gets the bytes a piece computes from: mapped (the default: no copy, the reader
/// faults the pages in), or with `BONE_TOOL_READ=pread` read into buffers that come back when the
/// piece is done, in 1 MB reads side by side (a copy, but no mapping made or removed per piece: an
/// experiment for a GPU machine, where the driver starting beside the pipeline slowed the CPU's
/// adds 2-4x).
struct Reads {
    pread: bool,
    pool: (std::sync::mpsc::Sender<Vec<u8>>, Receiver<Vec<u8>>),
}

impl Reads {
    fn new() -> Reads {
        Reads { pread: std::env::var("BONE_TOOL_READ").is_ok_and(|v| v == "pread"), pool: std::sync::mpsc::channel() }
    }

    fn get(&self, file: &SafetensorsFile, start: u64, len: usize) -> Result<TensorBytes> {
        if !self.pread {
            return file.map_range(start, len);
        }
        let buf = self.pool.1.try_recv().unwrap_or_default();
        file.read_range(start, len, buf, self.pool.0.clone())
    }
}

/// How many shards of the output are written at once, each by a writer thread of its own: one
/// thread's writes into the page cache run at about `cp`'s speed, and on many cores a merge waits
/// for its writer (on the H200 machine's 16 cores the compute stage of a 1b merge was busy 0.19 s
/// of 0.77; `perf` on a 1b default merge here: 53% of the CPU time in the kernel copying written
/// bytes into the page cache, 24% in the math; three `cp` of the 1b model's shards side by side
/// took 0.4 s on the 2-core machine, one after the other 0.6-2 s). One writer per 4 cores, at most
/// 4 and one per shard: on 2 cores, where the math is the bottleneck, extra writers only waited for
/// it (1b merge, 3 writers against one: 0.9-1.2 s against 0.87-0.98 s, and with fsync medians of
/// 2.05 s against 1.63 s).
/// Only for a single output written to a folder (several outputs, or a comparison, keep one writer
/// each). `BONE_TOOL_WRITERS=N` sets it.
fn parallel_writers(outputs: &[Output]) -> usize {
    let [Output { plan, sink: Sink::Folder(_), .. }] = outputs else { return 1 };
    let asked = crate::env_setting::<usize>("BONE_TOOL_WRITERS").filter(|&n| n > 0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    asked.unwrap_or((cores / 4).clamp(1, 4)).min(plan.shards.len()).max(1)
}

/// An output's tensors in the order the reader takes them when its shards are written `parallel`
/// at a time: shards in groups of `parallel`, and within a group the next tensor of the shard with
/// the fewest bytes so far, so that the group's writers are kept about equally busy. Each shard's
/// tensors keep their order.
fn interleaved(plan: &Plan, parallel: usize) -> Vec<(usize, &TensorJob)> {
    let mut order = vec![];
    let shards: Vec<usize> = (0..plan.shards.len()).collect();
    for group in shards.chunks(parallel) {
        let (mut next, mut bytes) = (vec![0usize; group.len()], vec![0u64; group.len()]);
        while let Some(g) =
            (0..group.len()).filter(|&g| next[g] < plan.shards[group[g]].jobs.len()).min_by_key(|&g| bytes[g])
        {
            let job = &plan.shards[group[g]].jobs[next[g]];
            next[g] += 1;
            bytes[g] += job.src.len_bytes();
            order.push((group[g], job));
        }
    }
    order
}

/// Where one output's tensor comes from and what is done to it.
struct Source<'a> {
    output: usize,
    job: &'a TensorJob,
    file: &'a SafetensorsFile,
    entry: &'a TensorEntry,
    /// A replacement of another float dtype than the base tensor's: its dtype, each piece's rows
    /// read in it and cast to the base tensor's (a piece at a time: a replaced embedding can be
    /// gigabytes).
    convert_from: Option<Float>,
    /// None: the bytes pass as they are.
    chain: Option<Arc<Vec<Prepared>>>,
}

/// A job starts from the base tensor's bytes, or from its last replacement's (cast to the base
/// tensor's dtype), and runs the ops after that replacement; with none and no cast, it is a copy.
fn source<'a>(
    output: usize,
    job: &'a TensorJob,
    base: &'a SafetensorsFile,
    adapters: &'a [Adapter],
    warnings: &mut Vec<String>,
) -> Result<Source<'a>> {
    let last_replace = job.ops.iter().rposition(|op| matches!(op, Op::Replace { .. }));
    let chain_ops = &job.ops[last_replace.map_or(0, |k| k + 1)..];
    let mut convert_from = None;
    let (file, entry) = match last_replace.map(|k| &job.ops[k]) {
        Some(Op::Replace { adapter, src }) if src.dtype != job.src.dtype => {
            let (Some(from), Some(_)) = (Float::from_dtype(src.dtype), Float::from_dtype(job.src.dtype)) else {
                return Err(input(format!("cannot cast {:?} from {:?} to {:?}", src.name, src.dtype, job.src.dtype)));
            };
            convert_from = Some(from);
            (&adapters[*adapter].file, src)
        }
        Some(Op::Replace { adapter, src }) => (&adapters[*adapter].file, src),
        _ => (base, &job.src),
    };
    if chain_ops.is_empty() && convert_from.is_none() && job.cast_to().is_none() {
        return Ok(Source { output, job, file, entry, convert_from, chain: None });
    }
    if !chain_ops.is_empty() {
        job.weight_float().ok_or_else(|| {
            input(format!("tensor {:?} has dtype {:?}: only float tensors can be changed", job.name, job.src.dtype))
        })?;
        if job.src.shape.len() != 2 {
            return Err(input(format!("tensor {:?} has shape {:?}, expected [out, in]", job.name, job.src.shape)));
        }
    }
    let o = job.src.shape.first().copied().unwrap_or(1);
    let mut chain =
        chain_ops.iter().map(|op| prepare(op, &job.name, o, adapters, warnings)).collect::<Result<Vec<_>>>()?;
    ops::mark_transposed(&mut chain);
    Ok(Source { output, job, file, entry, convert_from, chain: Some(Arc::new(chain)) })
}

/// The rows and columns a tensor is cut by: `[shape[0], the rest]` (a scalar is one row).
fn row_view(t: &TensorEntry) -> (usize, usize) {
    let rows = t.shape.first().copied().unwrap_or(1);
    (rows, t.numel().checked_div(rows).unwrap_or(0))
}

/// Cut one tensor into pieces for every output that writes it, the same rows for all of them in
/// turn, so that the base's bytes are read once while every output uses them.
fn tensor_pieces<'a>(
    sources: &[Source<'a>],
    reads: &Reads,
    send: &mut dyn FnMut(usize, Piece<'a>) -> bool,
) -> Result<bool> {
    let job = sources[0].job;
    let total = job.src.len_bytes();
    if sources.iter().all(|s| s.chain.is_none()) || total == 0 {
        // Bytes as they are (same length for every output: a replacement has the base's dtype and shape).
        let chunk = piece_bytes() as u64 * 4;
        let mut off = 0;
        loop {
            let n = (total - off).min(chunk);
            let last = off + n == total;
            for s in sources {
                if !send(s.output, Piece::Copy { file: s.file, start: s.entry.start + off, len: n, last }) {
                    return Ok(false);
                }
            }
            off += n;
            if last {
                return Ok(true);
            }
        }
    }
    let (rows, cols) = row_view(&job.src);
    let row_bytes = cols * job.src.dtype.bitsize() / 8;
    let unit = sources.iter().filter_map(|s| s.chain.as_deref()).map(|c| ops::row_unit(c)).fold(1, ops::lcm);
    let rows_per_piece = rows_per_piece(piece_bytes(), row_bytes, unit);
    let mut row0 = 0;
    loop {
        let n = rows_per_piece.min(rows - row0);
        let (off, len) = (row0 * row_bytes, n * row_bytes);
        let last = row0 + n == rows;
        for s in sources {
            let piece = match &s.chain {
                None => Piece::Copy { file: s.file, start: s.entry.start + off as u64, len: len as u64, last },
                Some(chain) => {
                    let src = match (s.convert_from, Float::from_dtype(job.src.dtype)) {
                        (Some(from), Some(to)) => {
                            // the same rows of the replacement, in its own dtype, cast
                            let (at, bytes) = (row0 * cols * from.size(), n * cols * from.size());
                            let raw = reads.get(s.file, s.entry.start + at as u64, bytes)?;
                            let mut data = vec![0u8; len];
                            // (an overflow to inf is PEFT's too: its layer casts the copy as it loads it)
                            from.cast(to, raw.bytes(), &mut data);
                            TensorBytes::Shared { data: Arc::new(data), off: 0, len }
                        }
                        _ => reads.get(s.file, s.entry.start + off as u64, len)?,
                    };
                    Piece::Rows { job: s.job, chain: Arc::clone(chain), row0, src, last }
                }
            };
            if !send(s.output, piece) {
                return Ok(false);
            }
        }
        row0 += n;
        if last {
            return Ok(true);
        }
    }
}

/// The compare stage: each tensor's pieces against the expected model's bytes at the same place.
/// With `until_different`, it returns after the first tensor that is neither equal nor within one
/// ulp (dropping `pieces`, which stops the stages before it).
fn compare_all<'scope>(
    plan: &'scope Plan,
    expected: &'scope Model,
    pieces: Receiver<Piece<'scope>>,
    recycle: Sender<Vec<u8>>,
    progress: &'scope ProgressBar,
    until_different: bool,
) -> Result<Vec<TensorCheck>> {
    let mut checks = vec![];
    let mut theirs = vec![];
    let mut ours_copy = vec![];
    for job in plan.shards.iter().flat_map(|s| s.jobs.iter()) {
        let mut check = TensorCheck::new(&job.name, "equal");
        // the scale of a changed float tensor, for max_rel
        let mut scale = (!job.ops.is_empty()).then_some(0f32).filter(|_| Float::from_dtype(job.out_dtype).is_some());
        let other = expected.tensor(&job.name);
        match other {
            None => check.status = "missing".into(),
            // (what is written: with --dtype, the cast)
            Some((_, e)) if e.dtype != job.out_dtype => check.status = "dtype_changed".into(),
            Some((_, e)) if e.shape != job.src.shape => check.status = "shape_changed".into(),
            _ => {}
        }
        let mut offset = 0u64;
        loop {
            let Ok(piece) = pieces.recv() else {
                return Ok(checks); // an earlier stage stopped and reports why
            };
            check_interrupt()?;
            let (ours, last): (&[u8], bool) = match &piece {
                Piece::Bytes { data, len, last } => (&data[..*len], *last),
                Piece::Copy { file, start, len, last } => {
                    ours_copy.resize(*len as usize, 0);
                    file.read_at(*start, &mut ours_copy)?;
                    (&ours_copy[..], *last)
                }
                Piece::Rows { .. } => unreachable!("the compute stage turns rows into bytes"),
            };
            if check.status == "equal" || check.status == "within_1_ulp" || check.status == "differs" {
                let (si, e) = other.expect("status says it exists");
                theirs.resize(ours.len(), 0);
                expected.shards[si].read_at(e.start + offset, &mut theirs)?;
                compare_bytes(job, ours, &theirs, &mut check, scale.as_mut());
            }
            offset += ours.len() as u64;
            progress.inc(ours.len() as u64);
            if let Piece::Bytes { data, .. } = piece {
                let _ = recycle.send(data);
            }
            if last {
                break;
            }
        }
        if let Some(s) = scale.filter(|_| matches!(check.status.as_str(), "equal" | "within_1_ulp" | "differs")) {
            check.scale = Some(s as f64);
            check.max_rel = Some(if s > 0.0 { check.max_abs / s as f64 } else { 0.0 });
        }
        let different = !matches!(check.status.as_str(), "equal" | "within_1_ulp");
        checks.push(check);
        if until_different && different {
            return Ok(checks);
        }
    }
    let ours: std::collections::HashSet<&str> =
        plan.shards.iter().flat_map(|s| s.jobs.iter()).map(|j| j.name.as_str()).collect();
    let mut extra: Vec<&str> = expected.tensor_names().filter(|n| !ours.contains(n)).collect();
    extra.sort();
    for name in extra {
        checks.push(TensorCheck::new(name, "extra"));
    }
    Ok(checks)
}

/// Fold one piece's comparison into the tensor's; `scale`: the largest |value| of theirs so far, to
/// be updated (changed float tensors).
fn compare_bytes(job: &TensorJob, ours: &[u8], theirs: &[u8], check: &mut TensorCheck, scale: Option<&mut f32>) {
    let Some(d) = Float::from_dtype(job.out_dtype) else {
        if ours != theirs {
            check.status = "differs".into();
        }
        return;
    };
    if let Some(scale) = scale {
        *scale = scale.max(d.max_abs(theirs));
    }
    if ours == theirs {
        return;
    }
    let n = d.size();
    let (mut a, mut b) = (vec![0f32; ours.len() / n], vec![0f32; ours.len() / n]);
    d.decode(ours, &mut a);
    d.decode(theirs, &mut b);
    for (x, y) in a.iter().zip(&b) {
        if x.to_bits() == y.to_bits() {
            continue;
        }
        let ulp = d.ulps(*x, *y);
        check.max_ulp = check.max_ulp.max(ulp);
        check.values_off += 1;
        let diff = match (x.is_nan(), y.is_nan()) {
            // NaNs of other bits: the same value (ulps)
            (true, true) => 0.0,
            // a NaN against a number is no small difference
            (true, false) | (false, true) => f64::INFINITY,
            (false, false) => ((*x as f64) - (*y as f64)).abs(),
        };
        check.max_abs = check.max_abs.max(diff);
    }
    check.status = if check.max_ulp <= 1 { "within_1_ulp" } else { "differs" }.into();
}

/// What one writer writes: `shards` of `plan` (all of them, or every `parallel`-th), into `dir`.
struct Writing<'scope> {
    plan: &'scope Plan,
    shards: Vec<&'scope OutShard>,
    dir: &'scope Path,
    fsync: bool,
    progress: &'scope ProgressBar,
    /// Show the tensor count in the progress bar (the first output's writers).
    announce: bool,
    /// Tensors written so far by all of the output's writers.
    tensors_written: &'scope AtomicU64,
}

/// How often a writer that fsyncs starts its file's writeback ([`ShardWriter::flush_behind`]), with
/// `BONE_TOOL_FLUSH_BEHIND=SIZE` (e.g. `32MB`); by default never, leaving it to the kernel and the
/// fsync of each finished shard. An experiment for many cores, where the disk could write while the
/// pipeline runs rather than after the last shard: on 2 cores here it changed nothing beyond the
/// noise (1b default merges, fsynced, 12 interleaved pairs: medians 1.49 s with 32 MB against
/// 1.44 s without; 3b, 7 pairs: 4.47 s against 4.53 s; an earlier run of 10 pairs had 1.37 s
/// against 1.88 s). `scripts/gpu-check.sh` times it on the GPU machine (variant `fb`).
fn flush_behind() -> Option<u64> {
    static EVERY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("BONE_TOOL_FLUSH_BEHIND").ok().and_then(|v| crate::cli::parse_size(&v).ok()).filter(|&n| n > 0)
    })
}

/// The writer stage: its shards in order, each tensor's pieces as they arrive; fsyncs run in the
/// background while the next shard is written.
fn write_all<'scope>(
    to: Writing<'scope>,
    pieces: Receiver<Piece<'scope>>,
    recycle: Sender<Vec<u8>>,
    busy: &'scope Busy,
    scope: &'scope std::thread::Scope<'scope, '_>,
) -> Result<()> {
    let Writing { plan, shards, dir, fsync, progress, announce, tensors_written } = to;
    let total: usize = plan.shards.iter().map(|s| s.jobs.len()).sum();
    let mut syncs = vec![];
    for shard in shards {
        let mut w = ShardWriter::create(&dir.join(&shard.file_name), &shard.header, shard.data_bytes)?;
        if let (true, Some(every)) = (fsync, flush_behind()) {
            w.flush_behind(every);
        }
        progress.inc(shard.header.len() as u64);
        for _ in &shard.jobs {
            loop {
                let t = Instant::now();
                let Ok(piece) = pieces.recv() else {
                    return Ok(()); // an earlier stage stopped and reports why
                };
                busy.add(&busy.write_waits, t.elapsed());
                check_interrupt()?;
                let t = Instant::now();
                let last = match piece {
                    Piece::Bytes { data, len, last } => {
                        w.write(&data[..len])?;
                        progress.inc(len as u64);
                        let _ = recycle.send(data);
                        last
                    }
                    Piece::Copy { file, start, len, last } => {
                        w.copy_from(file.file(), start, len)?;
                        progress.inc(len);
                        last
                    }
                    Piece::Rows { .. } => unreachable!("the compute stage turns rows into bytes"),
                };
                busy.add(&busy.write, t.elapsed());
                if last {
                    break;
                }
            }
            let done = tensors_written.fetch_add(1, Ordering::Relaxed) + 1;
            if announce {
                progress.set_message(format!("tensor {done}/{total}"));
            }
        }
        let (file, path) = w.finish()?;
        if fsync {
            syncs.push(scope.spawn(move || {
                let t = Instant::now();
                let synced = file.sync_all().with_context(|| format!("cannot sync {}", path.display()));
                busy.add(&busy.fsync, t.elapsed());
                synced
            }));
        }
    }
    for s in syncs {
        s.join().unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: an fsync thread panicked")))?;
    }
    Ok(())
}

/// Finish the oldest pieces in flight until at most `keep` remain, sending each to its writer;
/// false when a writer has stopped.
#[allow(clippy::too_many_arguments)]
fn land<'a>(
    flight: &mut std::collections::VecDeque<Flight<'a>>,
    keep: usize,
    device: &Device,
    check: bool,
    busy: &Busy,
    spares: &mut Vec<Vec<u8>>,
    send: &dyn Fn(usize, Piece<'a>) -> bool,
) -> Result<bool> {
    while flight.len() > keep {
        let f = flight.pop_front().expect("longer than keep");
        let t = Instant::now();
        let done = f.finish(device, check);
        busy.add(&busy.compute, t.elapsed());
        let (k, piece, spare) = done?;
        spares.extend(spare);
        if !send(k, piece) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One computed piece: its chain started on the device, its cast and checks still to come.
struct Flight<'a> {
    output: usize,
    job: &'a TensorJob,
    row0: usize,
    src: TensorBytes,
    last: bool,
    /// The bytes for the writer.
    out: Vec<u8>,
    /// The chain's result when it is cast afterwards.
    stage: Vec<u8>,
    /// None: no chain (a cast only).
    ticket: Option<Ticket>,
}

impl<'a> Flight<'a> {
    /// Start the chain on rows `row0..` of `src` (into `out`, or into `stage` when a cast follows).
    #[allow(clippy::too_many_arguments)]
    fn start(
        device: &Device,
        output: usize,
        job: &'a TensorJob,
        chain: Arc<Vec<Prepared>>,
        row0: usize,
        src: TensorBytes,
        last: bool,
        mut out: Vec<u8>,
        mut stage: Vec<u8>,
        check_finite: bool,
    ) -> Result<Flight<'a>> {
        let d = job.weight_float().expect("only float tensors are computed");
        let (_, i) = row_view(&job.src);
        let bytes = src.bytes();
        let n = bytes.len();
        let rows = n / (i * d.size()).max(1);
        let ticket = if chain.is_empty() {
            None
        } else {
            let dst = if job.cast_to().is_some() { &mut stage } else { &mut out };
            // A recycled buffer keeps its length: only growth is zero-filled, the rest is overwritten.
            if dst.len() < n {
                dst.resize(n, 0);
            }
            Some(device.start(bytes, &mut dst[..n], d, rows, i, row0, &chain, check_finite)?)
        };
        Ok(Flight { output, job, row0, src, last, out, stage, ticket })
    }

    /// Wait for the chain, check it, cast: the piece for the writer, and the stage buffer to reuse.
    fn finish(mut self, device: &Device, check_finite: bool) -> Result<(usize, Piece<'a>, Option<Vec<u8>>)> {
        let job = self.job;
        let d = job.weight_float().expect("only float tensors are computed");
        let (_, i) = row_view(&job.src);
        let src = self.src.bytes();
        let n = src.len();
        let row0 = self.row0;
        let cast = job.cast_to();
        let chained = self.ticket.is_some();
        if let Some(ticket) = self.ticket.take() {
            let dst = if cast.is_some() { &mut self.stage[..n] } else { &mut self.out[..n] };
            if let Some(k) = device.finish(ticket, src, dst, d, check_finite)? {
                return Err(input(format!(
                    "{:?}: the result at row {}, column {} is not finite (inf or NaN) where the input was: the \
                     adapter is broken or overflows {d}; pass --allow-non-finite to write it anyway",
                    job.name,
                    row0 + k / i,
                    k % i
                )));
            }
        }
        let Some(to) = cast else {
            if !chained {
                // nothing to compute (a replacement the reader cast to the weight's dtype): its bytes
                self.out.clear();
                self.out.extend_from_slice(src);
            }
            return Ok((self.output, Piece::Bytes { data: self.out, len: n, last: self.last }, Some(self.stage)));
        };
        let values: &[u8] = if chained { &self.stage[..n] } else { src };
        let m = n / d.size() * to.size();
        if self.out.len() < m {
            self.out.resize(m, 0);
        }
        if let Some(k) = d.cast(to, values, &mut self.out[..m]) {
            if check_finite {
                let at = if job.src.shape.len() == 2 {
                    format!("row {}, column {}", row0 + k / i.max(1), k % i.max(1))
                } else {
                    format!("element {}", row0 * i + k)
                };
                return Err(input(format!(
                    "{:?}: the value at {at} does not fit in {to} (it would become inf): choose another --dtype, or \
                     pass --allow-non-finite to write inf",
                    job.name
                )));
            }
        }
        Ok((self.output, Piece::Bytes { data: self.out, len: m, last: self.last }, Some(self.stage)))
    }
}

/// Load an op's blocks (and invert them for BAT unmerge).
fn prepare(op: &Op, tensor: &str, o: usize, adapters: &[Adapter], warnings: &mut Vec<String>) -> Result<Prepared> {
    Ok(match op {
        Op::Replace { .. } => unreachable!("the chain starts after the last replacement"),
        Op::Periodic { adapter, block, r, cols, sign, rounding } => {
            let mut blk = adapters[*adapter].file.read_f32(block)?;
            rounding.load_block(&mut blk);
            Prepared::Periodic { et: expand_transposed(&blk, *r, *cols, o), r: *r, sign: *sign, rounding: *rounding }
        }
        Op::Bat { adapter, block, r, inverse, rounding } => {
            let a = &adapters[*adapter];
            let mut b = a.file.read_f32(block)?;
            rounding.load_block(&mut b);
            if *inverse {
                let inv = ops::bat_inverses_as_torch(&b, *r, rounding.sums).map_err(|s| {
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
                Prepared::BatUnmerge { b, inv: inv.inv, r: *r, rounding: *rounding, transposed: false }
            } else {
                Prepared::BatMerge { b, r: *r, rounding: *rounding }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Device, Opening};
    use crate::plan::{self, Direction, Options};

    #[test]
    fn a_compare_until_different_stops_after_the_first_tensor_that_differs() {
        // bone-bat-f32's merge compared with its own base: every tensor the adapter changes differs.
        // Compare checks them all (and lists nothing extra); CompareUntilDifferent ends its checks
        // at the first of them, in the plan's order, and stops the stages before it.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let base = Model::open(&root.join("bases/llama-f32")).unwrap();
        let adapter = Adapter::open(&root.join("cases/bone-bat-f32/adapter"), crate::adapter::DEFAULT_PREFIX).unwrap();
        let adapters = [adapter];
        let plan = plan::build(&base, &adapters, Direction::Merge, Options::default()).unwrap();
        let opts = RunOptions {
            fsync: false,
            cpu_while_opening: false,
            adds_on_cpu: false,
            release_early: false,
            allow_non_finite: true,
        };
        let checks = |sink| {
            let output = Output { plan: &plan, adapters: &adapters, sink };
            let device = Opening::ready(Device::Cpu);
            run_into(vec![output], &base, &device, opts, &ProgressBar::hidden()).unwrap().checks.remove(0)
        };
        let all = checks(Sink::Compare(&base));
        let order: Vec<&str> = plan.shards.iter().flat_map(|s| &s.jobs).map(|j| j.name.as_str()).collect();
        assert_eq!(all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), order);
        let first = all.iter().position(|c| c.status == "differs").expect("the merge changes tensors");
        assert!(first + 1 < all.len() && all[first + 1..].iter().any(|c| c.status == "differs"));
        let until = checks(Sink::CompareUntilDifferent(&base));
        assert_eq!(until.len(), first + 1);
        assert!(until
            .iter()
            .zip(&all)
            .all(|(a, b)| (a.name.as_str(), a.status.as_str()) == (b.name.as_str(), b.status.as_str())));
    }
}
