//! `verify`: recompute a merge (or, with --reverse, an unmerge) tensor by tensor, streaming, and
//! compare it with a given model. Nothing is written.

use crate::adapter::Adapter;
use crate::backend::{Device, Opening};
use crate::cli::{RoundingArg, VerifyArgs};
use crate::error::Result;
use crate::execute::{self, RunOptions, Sink, TensorCheck};
use crate::model::Model;
use crate::ops::dtype::Float;
use crate::ops::BatSums;
use crate::plan::{self, Direction, Options};
use indicatif::{ProgressBar, ProgressDrawTarget};
use serde_json::json;

/// A verification that ran and found differences: exit 1, not 2 (the input was fine).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// `base`: --base, or the base the adapters record (found by the caller).
pub fn run(args: &VerifyArgs, base: &std::path::Path, quiet: bool) -> Result<()> {
    // merge: base --adapters--> expected merged; reverse: merged --unmerge--> expected base
    let (input_path, expected_path, direction) = if args.reverse {
        (args.merged.as_path(), base, Direction::Unmerge)
    } else {
        (base, args.merged.as_path(), Direction::Merge)
    };
    let input = Model::open(input_path)?;
    let expected = Model::open(expected_path)?;
    let adapters = args.adapters.iter().map(|p| Adapter::open_for(p, &args.prefix.adapter_prefix, &input));
    let adapters = adapters.collect::<Result<Vec<_>>>()?;
    let options = Options {
        rounding_once: args.rounding == RoundingArg::Once,
        bat_sums: args.bat_sums.sums(),
        autocast_adapter_dtype: !args.no_autocast_adapter_dtype,
        out_dtype: args.dtype.float(),
        ..Options::default()
    };
    let started = std::time::Instant::now();
    let mut run = recompute(args, &input, &expected, &adapters, direction, options, false, quiet)?;
    let mut bad = mismatches(&run.checks);
    // Differences in BAT tensors alone can be PEFT's own ways of merging: PEFT 0.18.1 rounds an
    // f16/bf16 delta before adding it, PEFT 0.20 and later round W + delta once (as
    // safe_merge=True does); and its GEMMs sum as the processor it ran on sums. So check the other
    // rounding and the other processor's sums too, and say which matched. An unmerge has no
    // rounding to choose, but its sums and its f32 inverse (where known) are the processor's too.
    let (mut other_rounding, mut other_sums) = (false, false);
    if !bad.is_empty() {
        let bat = bat_tensors(&run.plan);
        let bat_dtype = |c: &TensorCheck| bat.get(c.name.as_str()).filter(|_| c.status == "differs").map(|t| t.0);
        let dtypes: Option<Vec<Float>> = run.checks.iter().filter(|c| !is_ok(c)).map(bat_dtype).collect();
        if let Some(dtypes) = dtypes {
            // in f32 the delta needs no rounding: both roundings are the same bytes
            let half = dtypes.iter().any(|&d| d != Float::F32);
            let mut tries = vec![(half, false), (false, true), (half, true)];
            tries.retain(|&t| t != (false, false) && (direction == Direction::Merge || !t.0));
            tries.dedup();
            // the first way that matches, unless a later one matches every value exactly
            let mut found: Option<(Recomputed, (bool, bool))> = None;
            for (rounding, sums) in tries {
                let other = Options {
                    rounding_once: options.rounding_once != rounding,
                    bat_sums: sums_tried(options.bat_sums, sums),
                    ..options
                };
                // (stopping at its first difference: only the way that matches costs a whole pass)
                let again = recompute(args, &input, &expected, &adapters, direction, other, true, quiet)?;
                if mismatches(&again.checks).is_empty() {
                    let exact = again.checks.iter().all(|c| c.status == "equal" || !bat.contains_key(c.name.as_str()));
                    if exact || found.is_none() {
                        found = Some((again, (rounding, sums)));
                    }
                    if exact {
                        break;
                    }
                }
            }
            if let Some((again, ways)) = found {
                (run, bad, (other_rounding, other_sums)) = (again, vec![], ways);
            }
        }
    }
    let rounding_once = options.rounding_once != other_rounding;
    let bat_sums = sums_tried(options.bat_sums, other_sums);
    let seconds = started.elapsed().as_secs_f64();
    let Recomputed { plan, checks, warnings, timings } = run;
    let count = |s: &str| checks.iter().filter(|c| c.status == s).count();
    let bad: Vec<&TensorCheck> = bad.iter().map(|&i| &checks[i]).collect();
    let ok = bad.is_empty();
    // differences that PEFT itself makes, in BAT tensors: on another processor (its sums run in
    // another order) or in its unmerge (an f32 inverse)
    let bat = bat_tensors(&plan);
    // whether a tensor differs only as PEFT's own BAT results do: in f32 within the spec's 1e-5 of
    // its largest value; in f16/bf16 PEFT rounds the delta before adding it, so a delta summed in
    // another order can round the other way, by one unit of the delta, which can be as large as the
    // tensor: at most 1% of the values off for each BAT adapter on it (stacked ones each round
    // their own deltas; two at r = 640 were seen at 1.1%), by at most two units of the dtype at
    // that scale
    let peft_like = |c: &TensorCheck| {
        let &(d, numel, adapters) = bat.get(c.name.as_str())?;
        let bound = match d {
            Float::F32 => 1e-5,
            Float::BF16 => 2f64.powi(-7),
            Float::F16 => 2f64.powi(-10),
        };
        let few = d == Float::F32 || c.values_off as usize <= (numel / 100).max(1) * adapters;
        (c.status == "differs" && few && c.max_rel? <= bound).then_some(d)
    };
    let dtypes: Option<Vec<Float>> = bad.iter().map(|c| peft_like(c)).collect();
    // a model written with another --dtype: every float tensor in one dtype that the plan's are not
    let written: std::collections::BTreeSet<safetensors::Dtype> = bad
        .iter()
        .filter(|c| c.status == "dtype_changed")
        .filter_map(|c| expected.tensor(&c.name).map(|(_, e)| e.dtype))
        .collect();
    let recast = match (bad.iter().all(|c| c.status == "dtype_changed"), written.iter().next()) {
        (true, Some(&d)) if written.len() == 1 && Float::from_dtype(d).is_some() => Float::from_dtype(d),
        _ => None,
    };
    let rounding_note = match (other_rounding, rounding_once) {
        (false, _) => None,
        (true, true) => Some(
            "its BAT tensors are W + delta rounded once (--rounding once), as PEFT 0.20 and later write them with \
             merge_and_unload() and PEFT 0.18.1 with merge_and_unload(safe_merge=True); PEFT 0.18.1's \
             merge_and_unload() rounds the delta first (--rounding peft, the default)",
        ),
        (true, false) => Some(
            "its BAT tensors round the delta before adding it (--rounding peft, the default), as PEFT 0.18.1's \
             merge_and_unload() writes them, not W + delta rounded once (--rounding once)",
        ),
    };
    let sums_note = other_sums.then_some(match bat_sums {
        BatSums::Amd => {
            "its BAT GEMMs (and an unmerge's inverses) are computed as PEFT's torch computes them on an AMD \
             processor with AVX-512 (--bat-sums amd); bone-tool computes as on an Intel one unless told \
             (--bat-sums intel)"
        }
        BatSums::Intel => {
            "its BAT GEMMs (and an unmerge's inverses) are computed as PEFT's torch computes them on an \
             Intel processor with AVX-512 (--bat-sums intel, the default), not as on an AMD one (--bat-sums amd)"
        }
    });
    let matched = [rounding_note, sums_note].into_iter().flatten().collect::<Vec<_>>();
    let hint = match dtypes {
        _ if !matched.is_empty() => Some(format!("{} matches: {}", expected_path.display(), matched.join("; and "))),
        _ if ok => None,
        _ if recast.is_some() => recast.map(|d| {
            format!(
                "every tensor that does not match is stored as {d} in {}, where the recomputed merge keeps each \
                 tensor's own dtype: was it written with `--dtype {}`? Pass the same --dtype to verify",
                expected_path.display(),
                d.to_string().to_lowercase()
            )
        }),
        _ if args.tolerance.is_some() => None,
        None => None,
        Some(d) if d.iter().all(|&d| d == Float::F32) => Some(format!(
            "every tensor that differs is f32 BAT and within 1e-5 of its largest value: {}PEFT's own f32 \
             BAT sums depend on the processor it ran on (bone-tool reproduces an Intel processor with \
             AVX-512 and an AMD one, --bat-sums{}; an Intel one without AVX-512 sums otherwise, see the \
             README); `--tolerance 1e-5` accepts them ({} of them)",
            if args.reverse {
                "PEFT's unmerge inverts I + B in f32 (bone-tool as it does up to r = 128, or 149 with \
                 --bat-sums amd, else in f64), and "
            } else {
                ""
            },
            if args.reverse { "" } else { ", and neither matched" },
            bad.len()
        )),
        Some(_) => Some(format!(
            "every tensor that differs is BAT, with at most 1% of its values off for each BAT adapter \
             on it, by at most two units of its dtype at its largest value: so do PEFT's own f16/bf16 BAT merges made on \
             another processor (a delta summed in another order rounds the other way) and its \
             unmerges (an f32 inverse), while an adapter left out changes most values ({} of them)",
            bad.len()
        )),
    };
    if args.json {
        let report = json!({
            "ok": ok,
            "direction": if args.reverse { "unmerge" } else { "merge" },
            "rounding": if rounding_once { "once" } else { "peft" },
            "bat_sums": match bat_sums { BatSums::Intel => "intel", BatSums::Amd => "amd" },
            "checked": expected_path.display().to_string(),
            "equal": count("equal"),
            "within_1_ulp": count("within_1_ulp"),
            "within_tolerance": count("within_tolerance"),
            "differs": count("differs"),
            "missing": count("missing"),
            "extra": count("extra"),
            "dtype_changed": count("dtype_changed"),
            "shape_changed": count("shape_changed"),
            "tensors": checks,
            "seconds": seconds,
            "timings": timings,
            "warnings": warnings,
            "hint": hint,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &warnings {
            crate::report::warning(w);
        }
        for c in &checks {
            if c.status != "equal" {
                let rel = c.max_rel.map(|r| format!("  max rel {r:.1e}")).unwrap_or_default();
                let off = if c.values_off > 0 { format!("  {} values off", c.values_off) } else { String::new() };
                println!("{:<16} {:<52} max |Δ| {:.3e}  max ulp {}{rel}{off}", c.status, c.name, c.max_abs, c.max_ulp);
            }
        }
        let tolerated = match args.tolerance {
            Some(t) => format!(", {} within the tolerance {t:e}", count("within_tolerance")),
            None => String::new(),
        };
        println!(
            "{}: {} tensors equal, {} within one ulp{tolerated}, {} differ, {} missing, {} extra, {} dtype or shape changed",
            expected_path.display(),
            count("equal"),
            count("within_1_ulp"),
            count("differs"),
            count("missing"),
            count("extra"),
            count("dtype_changed") + count("shape_changed")
        );
    }
    if let (Some(h), false) = (&hint, args.json) {
        eprintln!("note: {h}");
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

/// The sums [`run`] recomputes with: those asked for, or with `other` the other processor's.
fn sums_tried(asked: BatSums, other: bool) -> BatSums {
    match (asked, other) {
        (sums, false) => sums,
        (BatSums::Intel, true) => BatSums::Amd,
        (BatSums::Amd, true) => BatSums::Intel,
    }
}

/// A recomputed merge or unmerge compared with the given model.
struct Recomputed {
    plan: plan::Plan,
    checks: Vec<TensorCheck>,
    warnings: Vec<String>,
    timings: execute::Timings,
}

/// Recompute the merge (or unmerge) of `adapters` into `input` with `options`, tensor by tensor,
/// and compare it with `expected`; --tolerance marks the differences it accepts. With
/// `until_different` (and no --tolerance, which may accept a tensor that differs), the run stops
/// after the first tensor that is neither equal nor within one ulp.
#[allow(clippy::too_many_arguments)]
fn recompute(
    args: &VerifyArgs,
    input: &Model,
    expected: &Model,
    adapters: &[Adapter],
    direction: Direction,
    options: Options,
    until_different: bool,
    quiet: bool,
) -> Result<Recomputed> {
    let expected_path = expected.path.as_path();
    let mut plan = plan::build(input, adapters, direction, options)?;
    if plan.untied.is_some() && expected.head_alias.is_some() {
        // A merged model that is still tied was merged in place, into the weight both sides share
        // (PEFT's merge_and_unload): recompute it so.
        plan = plan::build(input, adapters, direction, Options { shared_tied_head: true, ..options })?;
        plan.warnings.push(format!(
            "{}: still tied, so the adapters were merged in place into the weight {} shares with {:?} (as PEFT's \
             merge_and_unload does), which the model also reads as its input embedding; checked as such \
             (bone-tool merge unties the pair instead, leaving the input embedding as it was)",
            expected_path.display(),
            input.head().trim_end_matches(".weight"),
            input.head_alias.as_deref().unwrap_or_default()
        ));
    }
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
    let sink = if until_different && args.tolerance.is_none() {
        Sink::CompareUntilDifferent(expected)
    } else {
        Sink::Compare(expected)
    };
    let output = execute::Output { plan: &plan, adapters, sink };
    let report = execute::run_into(vec![output], input, &device, run_opts, &progress)?;
    let (late, mut checks, timings) =
        (report.warnings, report.checks.into_iter().next().unwrap_or_default(), report.timings);
    progress.finish_and_clear();
    warnings.extend(late);
    if let Some(tolerance) = args.tolerance {
        for c in checks.iter_mut().filter(|c| c.status == "differs") {
            if c.max_rel.is_some_and(|rel| rel <= tolerance) {
                c.status = "within_tolerance".into();
            }
        }
    }
    Ok(Recomputed { plan, checks, warnings, timings })
}

/// Whether a tensor passes: equal, within one ulp, or within --tolerance.
fn is_ok(c: &TensorCheck) -> bool {
    matches!(c.status.as_str(), "equal" | "within_1_ulp" | "within_tolerance")
}

/// The positions of the tensors that do not pass.
fn mismatches(checks: &[TensorCheck]) -> Vec<usize> {
    (0..checks.len()).filter(|&i| !is_ok(&checks[i])).collect()
}

/// Each BAT tensor of the plan: its dtype, its number of values, and how many BAT adapters act on it.
fn bat_tensors(plan: &plan::Plan) -> std::collections::HashMap<&str, (Float, usize, usize)> {
    plan.shards
        .iter()
        .flat_map(|s| &s.jobs)
        .filter_map(|j| {
            let n = j.ops.iter().filter(|op| matches!(op, plan::Op::Bat { .. })).count();
            Some((j.name.as_str(), (j.weight_float()?, j.src.numel(), n))).filter(|_| n > 0)
        })
        .collect()
}
