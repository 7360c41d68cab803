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
    if out.exists() && !opts.force {
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

    if !quiet {
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
