//! `inspect adapter`: what an adapter holds, and whether it fits a base model.

use crate::adapter::{Adapter, Block, Variant};
use crate::cli::InspectAdapterArgs;
use crate::error::{input, Result};
use crate::model::Model;
use serde_json::{json, Value};
use std::collections::BTreeSet;

pub fn adapter(args: &InspectAdapterArgs) -> Result<()> {
    let mut a = Adapter::open(args.adapter.path(), &args.prefix.adapter_prefix)?;
    let base = args.base.as_ref().map(|p| Model::open(p)).transpose()?;
    if let Some(b) = &base {
        a = a.for_base(b)?;
    }
    let report = report(&a, base.as_ref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if report["compatible"] == Value::Bool(false) {
        let n = report["problems"].as_array().map_or(0, Vec::len);
        return Err(input(format!(
            "{} cannot be merged into {}: {n} problem{} (listed above)",
            args.adapter.path().display(),
            args.base.as_ref().map(|b| b.display().to_string()).unwrap_or_default(),
            if n == 1 { "" } else { "s" }
        )));
    }
    Ok(())
}

/// The report as one JSON object (what `--json` prints).
pub fn report(a: &Adapter, base: Option<&Model>) -> Value {
    let c = &a.config;
    let mut problems: Vec<String> = vec![];
    let describe = |b: &Block, targeted: bool| {
        json!({
            "module": b.module,
            "key": b.key,
            "base_tensor": b.target(),
            "block_shape": b.entry.shape,
            "dtype": format!("{:?}", b.entry.dtype),
            "targeted": targeted,
        })
    };
    let layers: Vec<Value> = a
        .blocks
        .iter()
        .map(|b| {
            let mut l = describe(b, true);
            if let Some(base) = base {
                if let Some((_, w)) = base.tensor(&b.target()) {
                    l["base_shape"] = json!(w.shape);
                    l["base_dtype"] = json!(format!("{:?}", w.dtype));
                }
                match a.check_layer(b, base) {
                    Ok(_) => l["ok"] = json!(true),
                    Err(p) => {
                        l["ok"] = json!(false);
                        l["problem"] = json!(p);
                        problems.push(format!("{}: {p}", b.module));
                    }
                }
            }
            l
        })
        // PEFT does not load these: merge and unmerge leave them out, so they are not checked
        .chain(a.untargeted.iter().map(|b| describe(b, false)))
        .collect();
    let replacements: Vec<Value> = a
        .replacements
        .iter()
        .map(|r| {
            let mut v = json!({"key": r.key, "target": r.target, "shape": r.entry.shape, "dtype": format!("{:?}", r.entry.dtype)});
            if let Some(base) = base {
                if let Err(p) = a.check_replacement(r, base) {
                    match (a.resized_vocab(r, base), a.new_head_class(r, base)) {
                        // a vocabulary resized before training (merge checks the rest)
                        (Some(rows), _) => v["resizes_to"] = json!(rows),
                        // the classifier head of a task model made from the causal LM
                        (None, Some(class)) => v["new_in"] = json!(class),
                        (None, None) => {
                            v["problem"] = json!(p);
                            problems.push(p);
                        }
                    }
                }
            }
            v
        })
        .collect();
    let dtypes: BTreeSet<String> = a.blocks.iter().map(|b| format!("{:?}", b.entry.dtype)).collect();
    // targeted modules of the base without a block (known only with --base)
    let missing = base.map(|b| a.modules_without_blocks(b));
    let mut warnings = a.warnings.clone();
    warnings.extend(missing.as_deref().and_then(|m| a.missing_blocks_warning(m)));
    // what merge does to a tied base, in merge's words
    let plan = match base {
        Some(b) if problems.is_empty() => {
            crate::plan::build(b, std::slice::from_ref(a), crate::plan::Direction::Merge, Default::default()).ok()
        }
        _ => None,
    };
    let untied = plan.as_ref().map(|p| p.untied.clone());
    warnings.extend(untied.clone().flatten());
    warnings.extend(plan.as_ref().and_then(|p| p.task_model.clone()));
    if a.saved_rounding_bat_once() {
        warnings.push(crate::plan::newer_rounding_note(a));
    }
    json!({
        "adapter": a.dir.display().to_string(),
        "peft_type": c.peft_type.name(),
        "variant": c.variant.name(),
        "init_weights": c.init_weights,
        "r": c.r,
        "mini_r": if c.variant == Variant::Mini { json!(c.mini_r) } else { Value::Null },
        "num_layers": a.blocks.len(),
        "num_untargeted": a.untargeted.len(),
        "num_parameters": a.num_parameters(),
        "block_dtype": dtypes.into_iter().collect::<Vec<_>>().join(","),
        "target_modules": c.target_modules,
        "layers_to_transform": c.layers_to_transform,
        "exclude_modules": c.raw.get("exclude_modules").cloned().unwrap_or(Value::Null),
        "modules_to_save": a.replacements.iter().map(|r| r.target.clone()).collect::<Vec<_>>(),
        "replacements": replacements,
        "ignored_keys": a.ignored.iter().map(|i| json!({"key": i.key, "reason": i.reason})).collect::<Vec<_>>(),
        "peft_version": c.peft_version,
        "base_model_name_or_path": c.base_model_name_or_path,
        // where merge without --base finds it: a folder here or a snapshot in the local cache
        "base_model_found": c.base_model_name_or_path.as_deref().and_then(|n| {
            Some(crate::hub::recorded_base(n, true).ok()??.display().to_string())
        }),
        "task_type": c.task_type,
        "bias": c.bias,
        "layers": layers,
        "warnings": warnings,
        "base": base.map(|b| b.path.display().to_string()),
        "modules_without_blocks": missing,
        // merging into this base unties its tied embeddings (null: no base, or it does not fit)
        "unties_embeddings": untied.map(|w| w.is_some()),
        "base_renames": base.map(|_| {
            a.renames().iter().map(|(m, s)| json!({"module_prefix": m, "stored_prefix": s})).collect::<Vec<_>>()
        }),
        "compatible": if base.is_some() { json!(problems.is_empty()) } else { Value::Null },
        "problems": problems,
    })
}

/// The report as text for people.
pub fn render(r: &Value) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<13} {v}\n"));
    let str_or = |v: &Value, d: &str| v.as_str().map(str::to_string).unwrap_or_else(|| d.to_string());
    line("adapter", str_or(&r["adapter"], ""));
    let version = r["peft_version"].as_str().map(|v| format!(" (saved by PEFT {v})")).unwrap_or_default();
    line("peft type", format!("{}{version}", str_or(&r["peft_type"], "")));
    let mini = r["mini_r"].as_u64().map(|m| format!(", mini_r {m}")).unwrap_or_default();
    line("variant", format!("{} (init_weights {}), r {}{mini}", str_or(&r["variant"], ""), r["init_weights"], r["r"]));
    // what it was trained as, where that is not the language model itself
    let task = match r["task_type"].as_str() {
        Some("SEQ_CLS") => Some("sequence classification"),
        Some("TOKEN_CLS") => Some("token classification"),
        Some("QUESTION_ANS") => Some("question answering"),
        Some("FEATURE_EXTRACTION") => Some("feature extraction"),
        _ => None,
    };
    if let (Some(t), Some(what)) = (r["task_type"].as_str(), task) {
        line("task", format!("{t} ({what})"));
    }
    let layers = r["layers"].as_array().cloned().unwrap_or_default();
    let kinds: BTreeSet<String> = layers
        .iter()
        .filter(|l| l["targeted"] != false)
        .filter_map(|l| l["module"].as_str())
        .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    let untargeted = r["num_untargeted"].as_u64().unwrap_or(0);
    let not_loaded = if untargeted > 0 {
        format!("; {untargeted} more blocks on modules the config does not target, which PEFT does not load (marked -)")
    } else {
        String::new()
    };
    line(
        "layers",
        format!("{} adapted ({}){not_loaded}", r["num_layers"], kinds.into_iter().collect::<Vec<_>>().join(", ")),
    );
    line(
        "parameters",
        format!("{} in blocks ({})", group(r["num_parameters"].as_u64().unwrap_or(0)), str_or(&r["block_dtype"], "-")),
    );
    // PEFT saves target_modules as a set, in arbitrary order: sort it for reading.
    let mut targets = r["target_modules"].clone();
    if let Some(a) = targets.as_array_mut() {
        a.sort_by_key(|v| v.to_string());
    }
    let resolved = if crate::adapter::config::is_all_linear(&targets) {
        " (as PEFT resolves it: every linear layer but the output layer)"
    } else {
        ""
    };
    line("targets", format!("{}{resolved}", compact(&targets)));
    if !r["layers_to_transform"].is_null() {
        line("layer subset", compact(&r["layers_to_transform"]));
    }
    let excluded = &r["exclude_modules"];
    if !(excluded.is_null() || excluded.as_array().is_some_and(Vec::is_empty) || excluded == "") {
        line("excludes", compact(excluded));
    }
    let all = r["replacements"].as_array().cloned().unwrap_or_default();
    let (added, replaced): (Vec<&Value>, Vec<&Value>) = all.iter().partition(|v| v["new_in"].is_string());
    let targets_of = |list: &[&Value]| list.iter().filter_map(|v| v["target"].as_str()).collect::<Vec<_>>().join(", ");
    if !replaced.is_empty() {
        let rows = replaced.iter().find_map(|v| v["resizes_to"].as_u64());
        let resized = rows.map(|n| format!(" (the vocabulary resized to {n} rows)")).unwrap_or_default();
        line("replaces", format!("{}{resized}", targets_of(&replaced)));
    }
    if let Some(class) = added.first().and_then(|v| v["new_in"].as_str()) {
        line("adds", format!("{} (the merge is a {class})", targets_of(&added)));
    }
    let made_for = str_or(&r["base_model_name_or_path"], "(not recorded)");
    let found = match r["base_model_found"].as_str() {
        Some(p) if p == made_for => " (a folder here: merge finds it without --base)".to_string(),
        Some(p) => format!(" (in the local Hugging Face cache, {p}: merge finds it without --base)"),
        None if r["base_model_name_or_path"].is_string() => {
            " (not here, nor in the local Hugging Face cache: merge needs --base)".to_string()
        }
        None => String::new(),
    };
    line("made for", format!("{made_for}{found}"));
    if let Some(b) = r["base"].as_str() {
        let verdict = if r["compatible"] == Value::Bool(true) {
            "fits: every layer can be merged".to_string()
        } else {
            format!("DOES NOT FIT: {} problems", r["problems"].as_array().map_or(0, Vec::len))
        };
        line("checked on", format!("{b}: {verdict}"));
        let renames: Vec<String> = r["base_renames"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{}… as {}…", str_or(&x["module_prefix"], ""), str_or(&x["stored_prefix"], "")))
            .collect();
        if !renames.is_empty() {
            line("base names", format!("the base stores {} (transformers' saved layout)", renames.join(", ")));
        }
    }
    s.push('\n');
    let with_base = !r["base"].is_null();
    let width = layers.iter().filter_map(|l| l["module"].as_str()).map(str::len).max().unwrap_or(0).max(44);
    s.push_str(&format!(
        "{:<width$} {:<12} {:<6}{}\n",
        "module",
        "block",
        "dtype",
        if with_base { " base" } else { "" }
    ));
    for l in &layers {
        let shape = compact(&l["block_shape"]);
        let base_col = if l["targeted"] == false {
            "  - not targeted: PEFT does not load it".to_string()
        } else if with_base {
            let bs = if l["base_shape"].is_null() {
                "missing".to_string()
            } else {
                format!("{} {}", compact(&l["base_shape"]), str_or(&l["base_dtype"], ""))
            };
            let status = l["problem"].as_str().map(|p| format!("  ✗ {p}")).unwrap_or_else(|| "  ok".to_string());
            format!(" {bs}{status}")
        } else {
            String::new()
        };
        s.push_str(&format!(
            "{:<width$} {:<12} {:<6}{base_col}\n",
            str_or(&l["module"], ""),
            shape,
            str_or(&l["dtype"], "")
        ));
    }
    for w in r["warnings"].as_array().into_iter().flatten() {
        s.push_str(&format!("warning: {}\n", str_or(w, "")));
    }
    for p in r["problems"].as_array().into_iter().flatten() {
        s.push_str(&format!("problem: {}\n", str_or(p, "")));
    }
    s
}

fn compact(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::Array(a) => {
            format!(
                "[{}]",
                a.iter()
                    .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
