//! `verify`: recompute a merge (or, with --reverse, an unmerge) tensor by tensor, streaming, and
//! compare it with a given model. Nothing is written.

use crate::adapter::Adapter;
use crate::backend::{Device, Opening};
use crate::cli::{RoundingArg, VerifyArgs};
use crate::error::Result;
use crate::execute::{self, RunOptions, Sink};
use crate::model::Model;
use crate::plan::{self, Direction, Options};
use indicatif::{ProgressBar, ProgressDrawTarget};
use serde_json::json;

/// A verification that ran and found differences: exit 1, not 2 (the input was fine).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

pub fn run(args: &VerifyArgs, quiet: bool) -> Result<()> {
    // merge: base --adapters--> expected merged; reverse: merged --unmerge--> expected base
    let (input_path, expected_path, direction) = if args.reverse {
        (&args.merged, &args.base, Direction::Unmerge)
    } else {
        (&args.base, &args.merged, Direction::Merge)
    };
    let input = Model::open(input_path)?;
    let expected = Model::open(expected_path)?;
    let adapters =
        args.adapters.iter().map(|p| Adapter::open(p, &args.prefix.adapter_prefix)).collect::<Result<Vec<_>>>()?;
    let options = Options {
        rounding_once: args.rounding == RoundingArg::Once,
        autocast_adapter_dtype: !args.no_autocast_adapter_dtype,
        ..Options::default()
    };
    let plan = plan::build(&input, &adapters, direction, options)?;
    let (device, note) = Device::select_for(args.device, &plan.needs())?;
    let device = Opening::ready(device);
    let mut warnings = plan.warnings.clone();
    warnings.extend(note);
    let progress = if quiet || args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(input.data_bytes()), ProgressDrawTarget::stderr())
    };
    let run_opts = RunOptions {
        fsync: false,
        allow_non_finite: true,
        cpu_while_opening: false,
        adds_on_cpu: false,
        release_early: false,
    };
    let started = std::time::Instant::now();
    let output = execute::Output { plan: &plan, adapters: &adapters, sink: Sink::Compare(&expected) };
    let report = execute::run_into(vec![output], &input, &device, run_opts, &progress)?;
    let (late, checks, timings) =
        (report.warnings, report.checks.into_iter().next().unwrap_or_default(), report.timings);
    let seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    warnings.extend(late);

    let count = |s: &str| checks.iter().filter(|c| c.status == s).count();
    let bad: Vec<_> = checks.iter().filter(|c| c.status != "equal" && c.status != "within_1_ulp").collect();
    let ok = bad.is_empty();
    if args.json {
        let report = json!({
            "ok": ok,
            "direction": if args.reverse { "unmerge" } else { "merge" },
            "checked": expected_path.display().to_string(),
            "equal": count("equal"),
            "within_1_ulp": count("within_1_ulp"),
            "differs": count("differs"),
            "missing": count("missing"),
            "extra": count("extra"),
            "dtype_changed": count("dtype_changed"),
            "shape_changed": count("shape_changed"),
            "tensors": checks,
            "seconds": seconds,
            "timings": timings,
            "warnings": warnings,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &warnings {
            crate::report::warning(w);
        }
        for c in &checks {
            if c.status != "equal" {
                println!("{:<14} {:<52} max |Δ| {:.3e}  max ulp {}", c.status, c.name, c.max_abs, c.max_ulp);
            }
        }
        println!(
            "{}: {} tensors equal, {} within one ulp, {} differ, {} missing, {} extra, {} dtype or shape changed",
            expected_path.display(),
            count("equal"),
            count("within_1_ulp"),
            count("differs"),
            count("missing"),
            count("extra"),
            count("dtype_changed") + count("shape_changed")
        );
    }
    if ok {
        Ok(())
    } else {
        Err(anyhow::Error::new(Mismatch(format!(
            "{} does not match the recomputed {}: {} of {} tensors differ or do not correspond",
            expected_path.display(),
            if args.reverse { "unmerge" } else { "merge" },
            bad.len(),
            checks.len()
        ))))
    }
}
