//! `merge` and `unmerge`: the same pipeline (open, plan, execute, commit) with a different op chain.

use crate::adapter::Adapter;
use crate::backend::Device;
use crate::cli::{ApplyOptions, RoundingArg};
use crate::error::{input, Result};
use crate::execute;
use crate::model::output::OutputDir;
use crate::model::Model;
use crate::plan::{self, Direction, Options};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub fn run(
    direction: Direction,
    model: &Path,
    adapter_paths: &[PathBuf],
    out: &Path,
    opts: &ApplyOptions,
    quiet: bool,
) -> Result<()> {
    let started = Instant::now();
    if out.exists() && !opts.force && !opts.dry_run {
        // Say so before any work; OutputDir::create checks again.
        return Err(input(format!(
            "{} already exists: choose another --out, or pass --force to replace it",
            out.display()
        )));
    }
    let base = Model::open(model)?;
    let adapters =
        adapter_paths.iter().map(|p| Adapter::open(p, &opts.prefix.adapter_prefix)).collect::<Result<Vec<_>>>()?;
    refuse_overlap(out, model, adapter_paths)?;
    let options = Options {
        rounding_once: opts.rounding == RoundingArg::Once,
        autocast_adapter_dtype: !opts.no_autocast_adapter_dtype,
    };
    let plan = plan::build(&base, &adapters, direction, options)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    if opts.dry_run {
        let summary = plan_summary(&plan, &adapters, out, opts.force);
        if opts.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            print!("{}", render_plan(&summary));
        }
        return Ok(());
    }

    let (device, note) = Device::select(opts.device)?;
    if let Some(note) = note {
        eprintln!("warning: {note}");
    }

    let side: u64 = plan.side_files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let dir = OutputDir::create(out, opts.force, plan.total_bytes() + side)?;
    let total = plan.total_bytes();
    let progress = progress_bar(total, quiet);
    let run_opts = execute::RunOptions { fsync: !opts.no_fsync, allow_non_finite: opts.allow_non_finite };
    let late_warnings = execute::run(&plan, &base, &adapters, &device, dir.path(), run_opts, &progress)?;
    progress.finish_and_clear();
    for w in &late_warnings {
        eprintln!("warning: {w}");
    }
    dir.commit(!opts.no_fsync)?;

    if opts.json {
        let files: Vec<_> = plan.shards.iter().map(|s| s.file_name.clone()).collect();
        let summary = serde_json::json!({
            "command": if direction == Direction::Merge { "merge" } else { "unmerge" },
            "model": model.display().to_string(),
            "adapters": adapter_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "out": out.display().to_string(),
            "device": device.name(),
            "tensors_changed": plan.changed,
            "tensors_copied": plan.copied,
            "files": files,
            "bytes_written": total,
            "seconds": started.elapsed().as_secs_f64(),
            "warnings": plan.warnings.iter().chain(&late_warnings).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !quiet {
        let verb = if direction == Direction::Merge { "merged" } else { "unmerged" };
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{verb} {} adapter{} → {} on {}: {} tensors changed, {} copied, {} in {:.1}s",
            adapters.len(),
            if adapters.len() == 1 { "" } else { "s" },
            out.display(),
            device.name(),
            plan.changed,
            plan.copied,
            HumanBytes(total),
            secs
        );
    }
    Ok(())
}

/// The plan as data: what `--dry-run` shows.
fn plan_summary(plan: &plan::Plan, adapters: &[Adapter], out: &Path, force: bool) -> serde_json::Value {
    use crate::plan::Op;
    let describe = |op: &Op| -> String {
        let name = |a: &usize| adapters[*a].dir.display().to_string();
        match op {
            Op::Replace { adapter, src } => format!("replaced by {:?} of {}", src.name, name(adapter)),
            Op::Periodic { adapter, r, cols, sign, block, .. } => format!(
                "{} block {:?} (r {r}, repeating every {cols} rows) of {}",
                if *sign > 0.0 { "add" } else { "subtract" },
                block.shape,
                name(adapter)
            ),
            Op::Bat { adapter, r, inverse, .. } => {
                format!("{} (r {r}) of {}", if *inverse { "BAT unmerge" } else { "BAT merge" }, name(adapter))
            }
        }
    };
    let changed: Vec<_> = plan
        .shards
        .iter()
        .flat_map(|s| s.jobs.iter().map(move |j| (s, j)))
        .filter(|(_, j)| !j.ops.is_empty())
        .map(|(s, j)| {
            serde_json::json!({
                "tensor": j.name, "file": s.file_name, "dtype": format!("{:?}", j.src.dtype), "shape": j.src.shape,
                "ops": j.ops.iter().map(describe).collect::<Vec<_>>(),
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
        "tensors_changed": plan.changed,
        "tensors_copied": plan.copied,
        "bytes": plan.total_bytes(),
        // pieces in flight (reader, compute, writer and the channels between) of at most 16 MB each
        "estimated_peak_memory_bytes": 128u64 << 20,
        "changed": changed,
        "warnings": plan.warnings,
    })
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
        "plan: {} tensors changed, {} copied as bytes, {} to {}{exists}; memory about {}; nothing written (--dry-run)\n",
        p["tensors_changed"],
        p["tensors_copied"],
        HumanBytes(p["bytes"].as_u64().unwrap_or(0)),
        p["out"].as_str().unwrap_or(""),
        HumanBytes(p["estimated_peak_memory_bytes"].as_u64().unwrap_or(0))
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
pub(crate) fn refuse_overlap(out: &Path, model: &Path, adapters: &[PathBuf]) -> Result<()> {
    let out_abs = absolute(out);
    let mut inputs = vec![if model.is_file() {
        model.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        model.to_path_buf()
    }];
    inputs.extend(adapters.iter().cloned());
    for i in inputs {
        let i_abs = absolute(&i);
        if out_abs.starts_with(&i_abs) || i_abs.starts_with(&out_abs) {
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
