//! `merge` and `unmerge`: the same pipeline (open, plan, execute, commit) with a different op chain.

use crate::adapter::Adapter;
use crate::backend::{Needs, Opening};
use crate::cli::{ApplyOptions, RoundingArg};
use crate::error::{input, Result};
use crate::execute;
use crate::model::output::OutputDir;
use crate::model::Model;
use crate::plan::{self, Direction, Options};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One output: the adapters merged (or unmerged) into it, and where it goes.
#[derive(Clone, Debug)]
pub struct Job {
    pub adapters: Vec<PathBuf>,
    pub out: PathBuf,
}

/// `--each A B … --out-pattern DIR/{name}`: one job per adapter, named after its folder.
pub fn each(adapters: &[PathBuf], pattern: &str) -> Result<Vec<Job>> {
    if !pattern.contains("{name}") {
        return Err(input(format!(
            "--out-pattern {pattern:?} has no {{name}}: every adapter would be written to the same folder \
             (e.g. --out-pattern merged/{{name}})"
        )));
    }
    let mut jobs: Vec<Job> = vec![];
    for a in adapters {
        // an adapter given by its weights or config file is named after its folder
        let name = std::path::absolute(crate::model::dir_of(a))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| input(format!("{}: cannot name an output after this adapter path", a.display())))?;
        let out = PathBuf::from(pattern.replace("{name}", &name));
        if let Some(other) = jobs.iter().find(|j| j.out == out) {
            return Err(input(format!(
                "--each: {} and {} would both be written to {} (adapter folders with the same name)",
                other.adapters[0].display(),
                a.display(),
                out.display()
            )));
        }
        jobs.push(Job { adapters: vec![a.clone()], out });
    }
    Ok(jobs)
}

pub fn run(direction: Direction, model: &Path, jobs: &[Job], opts: &ApplyOptions, quiet: bool) -> Result<()> {
    let started = Instant::now();
    for job in jobs {
        if job.out.exists() && !opts.force && !opts.dry_run {
            // Say so before any work; OutputDir::create checks again.
            return Err(input(format!(
                "{} already exists: choose another --out, or pass --force to replace it",
                job.out.display()
            )));
        }
    }
    let mut opening = None;
    let result = run_opening(direction, model, jobs, opts, quiet, started, &mut opening);
    if let Some(o) = &opening {
        let _ = o.finish(); // a thread still opening a GPU as the process exits could crash it
    }
    result
}

fn run_opening(
    direction: Direction,
    model: &Path,
    jobs: &[Job],
    opts: &ApplyOptions,
    quiet: bool,
    started: Instant,
    opening: &mut Option<std::sync::Arc<Opening>>,
) -> Result<()> {
    let base = Model::open(model)?;
    let mut all_adapters = vec![];
    let every_adapter: Vec<PathBuf> = jobs.iter().flat_map(|j| j.adapters.iter().cloned()).collect();
    for job in jobs {
        refuse_overlap(&job.out, Some(model), &every_adapter)?;
        for other in jobs.iter().filter(|o| o.out != job.out) {
            let (a, b) = (absolute(&job.out), absolute(&other.out));
            if a.starts_with(&b) || b.starts_with(&a) {
                return Err(input(format!("outputs {} and {} overlap", job.out.display(), other.out.display())));
            }
        }
        let adapters = job.adapters.iter().map(|p| Adapter::open_for(p, &opts.prefix.adapter_prefix, &base));
        let adapters = adapters.collect::<Result<Vec<_>>>()?;
        all_adapters.push(adapters);
    }
    let options = Options {
        rounding_once: opts.rounding == RoundingArg::Once,
        bat_sums: opts.bat_sums.sums(),
        autocast_adapter_dtype: !opts.no_autocast_adapter_dtype,
        out_dtype: opts.dtype.float(),
        max_shard_size: opts.max_shard_size,
        keep_tied: opts.keep_tied,
        shared_tied_head: false,
    };
    let plans = all_adapters.iter().map(|a| plan::build(&base, a, direction, options)).collect::<Result<Vec<_>>>()?;
    for w in plans.iter().flat_map(|p| &p.warnings) {
        crate::report::warning(w);
    }
    if !opts.dry_run {
        // The device opens beside what follows: the output folders, and the pipeline's first pieces.
        let mut needs = Needs::default();
        for p in &plans {
            needs.include(p.needs());
        }
        *opening = Some(Opening::start(opts.device, needs));
    }
    let several = jobs.len() > 1;
    if opts.dry_run {
        let summaries: Vec<_> = plans
            .iter()
            .zip(&all_adapters)
            .zip(jobs)
            .map(|((p, a), j)| plan_summary(p, &base, a, &j.out, opts.force))
            .collect();
        if opts.json {
            let value = if several { serde_json::json!({ "outputs": summaries }) } else { summaries[0].clone() };
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            for s in &summaries {
                print!("{}", render_plan(s));
            }
        }
        return Ok(());
    }

    let opening: &Opening = opening.as_deref().expect("opened unless a dry run");
    if let Some(Err(e)) = opening.get() {
        return Err(e); // known at once: no GPU driver for --device cuda
    }

    // Outputs usually share a disk: each is checked against the space all of them need.
    let need: u64 = plans
        .iter()
        .map(|p| p.total_bytes() + p.side_files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum::<u64>())
        .sum();
    let dirs = jobs.iter().map(|j| OutputDir::create(&j.out, opts.force, need)).collect::<Result<Vec<_>>>()?;
    let total: u64 = plans.iter().map(|p| p.total_bytes()).sum();
    let progress = progress_bar(total, quiet || opts.json);
    let run_opts = execute::RunOptions {
        fsync: !opts.no_fsync,
        allow_non_finite: opts.allow_non_finite,
        cpu_while_opening: !opts.all_on_gpu,
        // An experiment for the GPU machine: are the adds faster on its CPU than through the GPU's
        // copies? (scripts/gpu-check.sh times both)
        adds_on_cpu: !opts.all_on_gpu && std::env::var("BONE_TOOL_ADDS_ON").is_ok_and(|v| v == "cpu"),
        // BONE_TOOL_KEEP_DEVICE=1 keeps the GPU to the end, to time what releasing it early saves
        release_early: std::env::var_os("BONE_TOOL_KEEP_DEVICE").is_none(),
    };
    let targets: Vec<_> = plans
        .iter()
        .zip(&all_adapters)
        .zip(&dirs)
        .map(|((plan, adapters), dir)| execute::Target { plan, adapters, dir: dir.path() })
        .collect();
    let report = execute::run(&targets, &base, opening, run_opts, &progress)?;
    let device_name = opening.wait()?.name();
    let late_warnings: Vec<String> = opening.note().map(str::to_string).into_iter().chain(report.warnings).collect();
    progress.finish_and_clear();
    for w in &late_warnings {
        crate::report::warning(w);
    }
    for dir in dirs {
        dir.commit(!opts.no_fsync)?;
    }
    let seconds = started.elapsed().as_secs_f64();

    let verb = if direction == Direction::Merge { "merged" } else { "unmerged" };
    if opts.json {
        let outputs: Vec<_> = plans
            .iter()
            .zip(jobs)
            .map(|(plan, job)| {
                serde_json::json!({
                    "adapters": job.adapters.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                    "out": job.out.display().to_string(),
                    "tensors_changed": plan.changed,
                    "tensors_copied": plan.copied,
                    "tensors_added": plan.added,
                    "tensors_dropped": plan.dropped.len(),
                    "tensors_cast": plan.cast,
                    "files": plan.shards.iter().map(|s| s.file_name.clone()).collect::<Vec<_>>(),
                    "bytes_written": plan.total_bytes(),
                    "warnings": &plan.warnings,
                })
            })
            .collect();
        let mut summary = serde_json::json!({
            "command": if direction == Direction::Merge { "merge" } else { "unmerge" },
            "model": model.display().to_string(),
            "device": device_name,
            "seconds": seconds,
            "timings": report.timings,
            "bytes_read": base.data_bytes(),
            "bytes_written": total,
            "warnings": plans.iter().flat_map(|p| &p.warnings).chain(&late_warnings).collect::<Vec<_>>(),
        });
        let obj = summary.as_object_mut().expect("built as an object");
        if several {
            obj.insert("outputs".into(), serde_json::Value::Array(outputs));
        } else if let Some(serde_json::Value::Object(one)) = outputs.into_iter().next() {
            // One output: its fields at the top level.
            for (k, v) in one {
                if k != "warnings" {
                    obj.insert(k, v);
                }
            }
        }
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !quiet {
        let dtype = opts.dtype.float().map(|f| f.name()).unwrap_or("");
        for (plan, job) in plans.iter().zip(jobs) {
            let n = job.adapters.len();
            let mut cast = if plan.cast > 0 { format!(", {} cast to {dtype}", plan.cast) } else { String::new() };
            for (n, what) in [(plan.added, "added"), (plan.dropped.len(), "dropped")] {
                if n > 0 {
                    cast.push_str(&format!(", {n} {what}"));
                }
            }
            let device = if several { String::new() } else { format!(" on {device_name}") };
            let time = if several { String::new() } else { format!(" in {seconds:.1}s") };
            eprintln!(
                "{verb} {n} adapter{} → {}{device}: {} changed, {} copied{cast}, {}{time}",
                if n == 1 { "" } else { "s" },
                job.out.display(),
                tensors(plan.changed),
                plan.copied,
                HumanBytes(plan.total_bytes()),
            );
        }
        if several {
            eprintln!(
                "{} models written on {} in {seconds:.1}s, the base read once ({} read, {} written)",
                jobs.len(),
                device_name,
                HumanBytes(base.data_bytes()),
                HumanBytes(total)
            );
        }
    }
    if opts.timings {
        print_timings(&report.timings, seconds);
    }
    Ok(())
}

/// `--timings`: each stage's busy time next to the wall time, on stderr.
pub(crate) fn print_timings(t: &execute::Timings, total: f64) {
    let mut rows = vec![
        ("read", t.read, "adapter blocks, BAT inverses, cutting tensors into pieces, faulting their pages in"),
        ("compute", t.compute, "op chains and casts"),
    ];
    if let (Some(h2d), Some(k), Some(d2h)) = (t.h2d, t.kernels, t.d2h) {
        rows.push(("  h2d", h2d, "of compute: host to GPU copies"));
        rows.push(("  kernels", k, "of compute: GPU kernels and GEMMs"));
        rows.push(("  d2h", d2h, "of compute: GPU to host copies"));
    }
    if let Some(staging) = t.staging {
        rows.push(("  staging", staging, "of compute: host copies into and out of page-locked buffers"));
    }
    if let Some(wait) = t.gpu_wait {
        rows.push(("  gpu wait", wait, "of compute: waiting for the GPU's results"));
    }
    rows.push(("write", t.write, "writing results, copying untouched tensors"));
    rows.push(("fsync", t.fsync, "flushing finished files (background)"));
    eprintln!("timings (busy seconds per stage; stages overlap):");
    for (name, secs, what) in rows {
        let share = if t.wall > 0.0 { 100.0 * secs / t.wall } else { 0.0 };
        eprintln!("  {name:<9} {secs:>8.3}s  {share:>5.0}% of the pipeline  {what}");
    }
    let w = &t.waits;
    eprintln!(
        "  waits     read for compute {:.3}s, compute for read {:.3}s, compute for write {:.3}s, write for compute \
         {:.3}s",
        w.read_for_compute, w.compute_for_read, w.compute_for_write, w.write_for_compute
    );
    eprintln!("  pipeline  {:>8.3}s, whole command {total:.3}s", t.wall);
    if let Some(p) = &t.process {
        eprintln!(
            "  process   user {:.3}s, system {:.3}s, {} minor and {} major page faults, {} voluntary and {} \
             involuntary context switches",
            p.user, p.system, p.minor_faults, p.major_faults, p.voluntary_switches, p.involuntary_switches
        );
    }
    if let Some(start) = &t.device_start {
        let sum: f64 = start.values().filter_map(|v| v.as_f64()).sum();
        let steps: Vec<String> =
            start.iter().map(|(what, v)| format!("{what} {:.3}s", v.as_f64().unwrap_or(0.0))).collect();
        eprintln!("  device start {sum:.3}s, beside the pipeline: {}", steps.join(", "));
        if let (Some(waited), Some(cpu)) = (t.device_waited, t.cpu_while_opening) {
            eprintln!(
                "  the pipeline waited {waited:.3}s for the GPU; the CPU computed {:.0}% of the changed bytes",
                100.0 * cpu
            );
        }
    }
}

/// The plan as data: what `--dry-run` shows.
fn plan_summary(plan: &plan::Plan, base: &Model, adapters: &[Adapter], out: &Path, force: bool) -> serde_json::Value {
    use crate::plan::Op;
    // a module the config targets without a block in the file gets PEFT's initial block
    let zeros = |b: &crate::model::TensorEntry| if b.is_zeros() { format!(" {}", b.name) } else { String::new() };
    let describe = |op: &Op| -> String {
        let name = |a: &usize| adapters[*a].dir.display().to_string();
        match op {
            Op::Replace { adapter, src } => format!("replaced by {:?} of {}", src.name, name(adapter)),
            Op::Periodic { adapter, r, cols, sign, block, .. } => format!(
                "{} block {:?}{} (r {r}, repeating every {cols} rows) of {}",
                if *sign > 0.0 { "add" } else { "subtract" },
                block.shape,
                zeros(block),
                name(adapter)
            ),
            Op::Bat { adapter, r, inverse, block, .. } => format!(
                "{}{} (r {r}) of {}",
                if *inverse { "BAT unmerge" } else { "BAT merge" },
                zeros(block),
                name(adapter)
            ),
        }
    };
    let changed: Vec<_> = plan
        .shards
        .iter()
        .flat_map(|s| s.jobs.iter().map(move |j| (s, j)))
        .filter(|(_, j)| !j.ops.is_empty())
        .map(|(s, j)| {
            let mut ops: Vec<String> = j.ops.iter().map(describe).collect();
            if j.src.name != j.name {
                ops.insert(0, format!("start from {:?} (untied)", j.src.name));
            }
            if let Some(to) = j.cast_to() {
                ops.push(format!("round to {to}"));
            }
            serde_json::json!({
                "tensor": j.name, "file": s.file_name, "dtype": format!("{:?}", j.src.dtype), "shape": j.src.shape,
                "ops": ops,
            })
        })
        .collect();
    let files: Vec<_> = plan
        .shards
        .iter()
        .map(|s| serde_json::json!({"file": s.file_name, "tensors": s.jobs.len(), "bytes": s.header.len() as u64 + s.data_bytes}))
        .collect();
    serde_json::json!({
        "out": out.display().to_string(),
        "out_exists": out.exists(),
        "would_replace": out.exists() && force,
        "files": files,
        "index": plan.index.as_ref().map(|(n, _)| n.clone()),
        "side_files": plan.side_files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "config_json": plan.config.as_ref().map(|new| {
            // the keys it changes, adds or drops (torch_dtype, tie_word_embeddings, a task model's
            // architectures and labels)
            let empty = serde_json::Map::new();
            let old = base.config.as_ref().and_then(|c| c.as_object()).unwrap_or(&empty);
            let new = new.as_object().unwrap_or(&empty);
            let keys: std::collections::BTreeSet<&String> =
                old.keys().chain(new.keys()).filter(|k| old.get(*k) != new.get(*k)).collect();
            format!("rewritten ({})", keys.into_iter().map(String::as_str).collect::<Vec<_>>().join(", "))
        }),
        "dropped": plan.dropped,
        "tensors_changed": plan.changed,
        "tensors_copied": plan.copied,
        "tensors_added": plan.added,
        "tensors_dropped": plan.dropped.len(),
        "tensors_cast": plan.cast,
        "bytes": plan.total_bytes(),
        "bytes_read": base.data_bytes(),
        "estimated_seconds": estimate_seconds(plan),
        // pieces in flight (reader, compute, writer and the channels between) of at most 16 MB each
        "estimated_peak_memory_bytes": 128u64 << 20,
        "changed": changed,
        "copied": plan.shards.iter().flat_map(|s| &s.jobs).filter(|j| j.ops.is_empty()).map(|j| &j.name).collect::<Vec<_>>(),
        "warnings": plan.warnings,
    })
}

/// A rough time on the CPU, from rates measured with bench/run.sh on the 2-core reference machine
/// (warm cache): writing at 2.9 GB/s (as `cp -r`), changed and cast tensors at 1.1 GB/s per core,
/// BAT's block products at 60 GFLOP/s per core. Cold disks and other machines differ.
fn estimate_seconds(plan: &plan::Plan) -> f64 {
    use crate::plan::Op;
    let cores = rayon::current_num_threads().max(1) as f64;
    let (mut worked, mut flops) = (0f64, 0f64);
    for j in plan.shards.iter().flat_map(|s| &s.jobs) {
        if !j.ops.is_empty() || j.cast_to().is_some() {
            worked += j.src.len_bytes() as f64;
        }
        for op in &j.ops {
            if let Op::Bat { r, inverse, .. } = op {
                let f = 2.0 * j.src.numel() as f64 * *r as f64;
                flops += if *inverse { 2.0 * f } else { f };
            }
        }
    }
    plan.total_bytes() as f64 / 2.9e9 + worked / (1.1e9 * cores) + flops / (60e9 * cores)
}

fn render_plan(p: &serde_json::Value) -> String {
    let mut s = String::new();
    for c in p["changed"].as_array().into_iter().flatten() {
        let ops: Vec<&str> = c["ops"].as_array().into_iter().flatten().filter_map(|o| o.as_str()).collect();
        s.push_str(&format!(
            "change {:<48} {} {}: {}\n",
            c["tensor"].as_str().unwrap_or(""),
            c["dtype"].as_str().unwrap_or(""),
            c["shape"],
            ops.join("; then ")
        ));
    }
    for f in p["files"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "write  {:<48} {} tensors, {}\n",
            f["file"].as_str().unwrap_or(""),
            f["tensors"],
            HumanBytes(f["bytes"].as_u64().unwrap_or(0))
        ));
    }
    if let Some(i) = p["index"].as_str() {
        s.push_str(&format!("write  {i}\n"));
    }
    for d in p["dropped"].as_array().into_iter().flatten() {
        s.push_str(&format!("drop   {} (the merged model has no such layer)\n", d.as_str().unwrap_or("")));
    }
    if let Some(c) = p["config_json"].as_str() {
        s.push_str(&format!("write  config.json, {c}\n"));
    }
    for f in p["side_files"].as_array().into_iter().flatten() {
        s.push_str(&format!("copy   {}\n", f.as_str().unwrap_or("")));
    }
    let exists = if p["out_exists"] == true {
        if p["would_replace"] == true {
            " (replacing the existing folder)"
        } else {
            " (exists: --force needed)"
        }
    } else {
        ""
    };
    s.push_str(&format!(
        "plan: {} changed, {} copied{}, {} to {}{exists}; memory about {}, time about {:.0}s; nothing \
         written (--dry-run)\n",
        tensors(p["tensors_changed"].as_u64().unwrap_or(0) as usize),
        p["tensors_copied"],
        ["tensors_cast", "tensors_added", "tensors_dropped"]
            .into_iter()
            .zip([" cast to another dtype", " added", " dropped"])
            .filter_map(|(k, what)| p[k].as_u64().filter(|&n| n > 0).map(|n| format!(", {n}{what}")))
            .collect::<String>(),
        HumanBytes(p["bytes"].as_u64().unwrap_or(0)),
        p["out"].as_str().unwrap_or(""),
        HumanBytes(p["estimated_peak_memory_bytes"].as_u64().unwrap_or(0)),
        p["estimated_seconds"].as_f64().unwrap_or(0.0).max(1.0)
    ));
    s
}

fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb
}

/// `--out` must not be an input folder, inside one, or hold one: `--force` would destroy inputs.
/// A model given as a lone weights file is that file alone (no side files are read beside it):
/// `--out` must not be it or hold it, but may be beside it. An index file stands for its folder,
/// an adapter's weights file for the adapter folder.
pub(crate) fn refuse_overlap(out: &Path, model: Option<&Path>, adapters: &[PathBuf]) -> Result<()> {
    let out_abs = absolute(out);
    let lone_file = |p: &Path| p.is_file() && !crate::model::file_name(p).ends_with(".index.json");
    let mut inputs: Vec<(PathBuf, bool)> = vec![];
    if let Some(m) = model {
        inputs.push(if lone_file(m) { (m.to_path_buf(), false) } else { (crate::model::dir_of(m), true) });
    }
    inputs.extend(adapters.iter().map(|a| (crate::model::dir_of(a), true)));
    for (i, is_folder) in inputs {
        let i_abs = absolute(&i);
        if i_abs.starts_with(&out_abs) || (is_folder && out_abs.starts_with(&i_abs)) {
            return Err(input(format!(
                "--out {} overlaps the input {}: write the output to a folder of its own",
                out.display(),
                i.display()
            )));
        }
    }
    Ok(())
}

/// The path with symlinks resolved as far as it exists (the rest appended as given).
fn absolute(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = abs.clone();
    let mut rest = vec![];
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for n in rest.into_iter().rev() {
        out.push(n);
    }
    out
}

/// `1 tensor`, `14 tensors`.
fn tensors(n: usize) -> String {
    format!("{n} tensor{}", if n == 1 { "" } else { "s" })
}
