//! `convert`: Bone → MiSS (lossless), MiSS → Bone (mini expanded by tiling), Bone/MiSS → LoRA
//! (default and mini exactly; BAT by truncated SVD of its delta). Reuses the adapter reader and the
//! atomic output folder; the result is an adapter folder PEFT loads.

use crate::adapter::{Adapter, Block, PeftType, Variant};
use crate::cli::{ConvertArgs, ConvertTo};
use crate::error::{input, Result};
use crate::model::file::build_header;
use crate::model::output::{OutputDir, ShardWriter};
use crate::model::Model;
use crate::ops::dtype::Float;
use crate::ops::lowrank::{self, RankRule};
use crate::ops::{self, expand_transposed};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use safetensors::Dtype;
use serde_json::{json, Map, Value};

/// A tensor of the output adapter.
struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

pub fn run(args: &ConvertArgs, quiet: bool) -> Result<()> {
    let started = std::time::Instant::now();
    if args.out.exists() && !args.force && !args.dry_run {
        return Err(input(format!(
            "{} already exists: choose another --out, or pass --force to replace it",
            args.out.display()
        )));
    }
    if let Some(e) = args.energy {
        if !(e > 0.0 && e <= 1.0) {
            return Err(input(format!("--energy {e}: expected a fraction in (0, 1]")));
        }
    }
    if args.rank == Some(0) {
        return Err(input("--rank 0: expected a positive rank"));
    }
    let mut a = Adapter::open(args.adapter.path(), &args.prefix.adapter_prefix)?;
    super::apply::refuse_overlap(&args.out, None, &[args.adapter.path().to_path_buf()])?;
    let from = a.config.peft_type;
    match (args.to, from) {
        (ConvertTo::Miss, PeftType::Miss) => return Err(input(format!("{}: already a MiSS adapter", a.dir.display()))),
        (ConvertTo::Bone, PeftType::Bone) => return Err(input(format!("{}: already a Bone adapter", a.dir.display()))),
        _ => {}
    }
    let needs_base = args.to == ConvertTo::Lora || (args.to == ConvertTo::Bone && a.config.variant == Variant::Mini);
    let base = if needs_base { Some(find_base(args, &a, quiet)?) } else { None };
    if let Some(b) = base.as_ref() {
        a = a.for_base(b)?;
    }
    // (the keys the adapter ignores are left out: its warnings name those PEFT would not load; the
    // insides of PEFT's modules_to_save wrappers repeat the copies the output keeps)
    let mut warnings = a.warnings.clone();
    let c = &a.config;
    if args.to == ConvertTo::Lora && c.variant == Variant::Bat && args.rank.is_none() && args.energy.is_none() {
        return Err(input(
            "BAT -> LoRA is an approximation (the delta depends on the base weight): choose its rank with --rank N or --energy F",
        ));
    }

    if let Some(flag) = args.rank.map(|n| format!("--rank {n}")).or(args.energy.map(|e| format!("--energy {e}"))) {
        if args.to != ConvertTo::Lora || c.variant != Variant::Bat {
            warnings.push(if args.to == ConvertTo::Lora {
                format!(
                    "{flag} is ignored: a {} adapter converts to LoRA exactly, at its r = {} (only BAT -> LoRA, an \
                     SVD, takes a rank)",
                    c.variant.name(),
                    c.r
                )
            } else {
                let to = if args.to == ConvertTo::Miss { "MiSS" } else { "Bone" };
                format!("{flag} is ignored: it sets the rank of BAT -> LoRA, and this converts to {to}")
            });
        }
    }
    let mut tensors: Vec<OutTensor> = vec![];
    let mut layers: Vec<Value> = vec![];
    let (mut err_num, mut err_den) = (0f64, 0f64);
    let mut config: Map<String, Value> = c.raw.as_object().cloned().unwrap_or_default();
    // BAT -> LoRA: an SVD a layer (a 7b adapter: minutes), computed first, several layers at a time
    let mut low_ranks = if args.to == ConvertTo::Lora && c.variant == Variant::Bat && !args.dry_run {
        let base = base.as_ref().expect("found above");
        let rule = match (args.rank, args.energy) {
            (Some(n), _) => RankRule::Fixed(n),
            (None, Some(e)) => RankRule::Energy(e),
            (None, None) => unreachable!("checked above"),
        };
        bat_low_ranks(&a, base, rule, |b| out_float(args, Variant::Bat, b), quiet)?
    } else {
        vec![]
    }
    .into_iter();
    // blocks on modules the config does not target too: a conversion keeps what the file holds
    // values the chosen --dtype rounded (exact conversions), and its error
    let mut rounded = 0usize;
    for b in a.blocks.iter().chain(&a.untargeted) {
        let out_float = out_float(args, c.variant, b);
        match args.to {
            ConvertTo::Miss | ConvertTo::Bone => {
                let key = if args.to == ConvertTo::Miss {
                    b.key.replacen(".bone_block", ".miss_block", 1)
                } else {
                    b.key.replacen(".miss_block", ".bone_block", 1)
                };
                let mini_to_bone = args.to == ConvertTo::Bone && c.variant == Variant::Mini;
                if args.dry_run {
                    let shape = if mini_to_bone {
                        vec![c.r, layer_geometry(&a, b, base.as_ref())?.0]
                    } else {
                        b.entry.shape.clone()
                    };
                    tensors.push(OutTensor { name: key, dtype: out_float.dtype(), shape, data: vec![] });
                    continue;
                }
                let (shape, values) = if mini_to_bone {
                    let g = layer_geometry(&a, b, base.as_ref())?;
                    let et = expand_transposed(&a.file.read_f32(&b.entry)?, c.r, c.mini_r, g.0);
                    // back from [O, r] to the default block [r, O]
                    let (o, r) = (g.0, c.r);
                    let block: Vec<f32> = (0..r * o).map(|n| et[(n % o) * r + n / o]).collect();
                    (vec![r, o], block)
                } else {
                    (b.entry.shape.clone(), a.file.read_f32(&b.entry)?)
                };
                let data = if Float::from_dtype(b.entry.dtype) == Some(out_float) && shape == b.entry.shape {
                    a.file.read_tensor(&b.entry)?
                } else {
                    let r = narrow(out_float, values, |_| 1.0).map_err(|e| input(format!("{}: {e}", b.key)))?;
                    (rounded, err_num, err_den) = (rounded + r.changed, err_num + r.num, err_den + r.den);
                    encode(out_float, &r.values)
                };
                tensors.push(OutTensor { name: key, dtype: out_float.dtype(), shape, data });
            }
            ConvertTo::Lora => {
                let (o, i) = layer_geometry(&a, b, base.as_ref())?;
                let prefix = &b.key[..b.key.len() - c.peft_type.block_suffix().len()];
                if args.dry_run {
                    // The rank of a BAT layer under --energy is known only once its SVD is computed.
                    let k = if c.variant == Variant::Bat { args.rank } else { Some(c.r) };
                    let dims = |shape: Vec<usize>| if k.is_some() { shape } else { vec![] };
                    let (k0, dt) = (k.unwrap_or(0), out_float.dtype());
                    tensors.push(OutTensor {
                        name: format!("{prefix}.lora_A.weight"),
                        dtype: dt,
                        shape: dims(vec![k0, i]),
                        data: vec![],
                    });
                    tensors.push(OutTensor {
                        name: format!("{prefix}.lora_B.weight"),
                        dtype: dt,
                        shape: dims(vec![o, k0]),
                        data: vec![],
                    });
                    layers.push(json!({"module": b.module, "rank": k, "shape": [o, i]}));
                    continue;
                }
                let (k, a_mat, b_mat, rel) = match c.variant {
                    Variant::Default | Variant::Mini => {
                        let cols = if c.variant == Variant::Mini { c.mini_r } else { o };
                        let r = c.r;
                        // lora_B [O, r] = Eᵀ (tiled for mini); lora_A [r, I] sums the inputs of each residue
                        let lora_b = expand_transposed(&a.file.read_f32(&b.entry)?, r, cols, o);
                        let mut lora_a = vec![0f32; r * i];
                        for col in 0..i {
                            lora_a[(col % r) * i + col] = 1.0;
                        }
                        // A is exact; B·A repeats column j of B in the n_j inputs of residue j
                        let n = |j: usize| (i / r + usize::from(j < i % r)) as f64;
                        let nr =
                            narrow(out_float, lora_b, |x| n(x % r)).map_err(|e| input(format!("{}: {e}", b.key)))?;
                        (rounded, err_num, err_den) = (rounded + nr.changed, err_num + nr.num, err_den + nr.den);
                        let rel = if nr.den == 0.0 { 0.0 } else { (nr.num / nr.den).sqrt() };
                        (r, lora_a, nr.values, rel)
                    }
                    Variant::Bat => {
                        let lr = low_ranks.next().expect("one for each block");
                        err_num += lr.rel_error.powi(2) * lr.norm2;
                        err_den += lr.norm2;
                        (lr.k, lr.a, lr.b, lr.rel_error)
                    }
                };
                tensors.push(OutTensor {
                    name: format!("{prefix}.lora_A.weight"),
                    dtype: out_float.dtype(),
                    shape: vec![k, i],
                    data: encode(out_float, &a_mat),
                });
                tensors.push(OutTensor {
                    name: format!("{prefix}.lora_B.weight"),
                    dtype: out_float.dtype(),
                    shape: vec![o, k],
                    data: encode(out_float, &b_mat),
                });
                layers.push(json!({"module": b.module, "rank": k, "rel_error": rel}));
            }
        }
    }
    // modules_to_save and other replacements travel unchanged, under the same keys.
    for rep in &a.replacements {
        tensors.push(OutTensor {
            name: rep.key.clone(),
            dtype: rep.entry.dtype,
            shape: rep.entry.shape.clone(),
            data: if args.dry_run { vec![] } else { a.file.read_tensor(&rep.entry)? },
        });
    }

    match args.to {
        ConvertTo::Miss => {
            config.insert("peft_type".into(), json!("MISS"));
            config.entry("mini_r").or_insert(json!(1));
            config.entry("miss_dropout").or_insert(json!(0.0));
        }
        ConvertTo::Bone => {
            if let Some(p) = config.get("miss_dropout").and_then(Value::as_f64).filter(|p| *p > 0.0) {
                warnings.push(format!("dropped miss_dropout {p}: Bone has no dropout (it only mattered for training)"));
            }
            config.insert("peft_type".into(), json!("BONE"));
            config.remove("mini_r");
            config.remove("miss_dropout");
            if c.variant == Variant::Mini {
                config.insert("init_weights".into(), json!(true));
            }
        }
        ConvertTo::Lora => config = lora_config(&a, &layers, args),
    }

    tensors.sort_by(|x, y| x.name.cmp(&y.name));
    if args.dry_run {
        let exact = !(args.to == ConvertTo::Lora && c.variant == Variant::Bat);
        let own = |b: &Block| Float::from_dtype(b.entry.dtype).expect("checked when opened");
        let narrows = |b: &&Block| {
            let out = out_float(args, c.variant, b);
            own(b) != out && out != Float::F32
        };
        if let Some(b) = a.blocks.iter().chain(&a.untargeted).find(|b| exact && narrows(b)) {
            warnings.push(format!(
                "--dtype {} is narrower than the blocks' {} (e.g. {}): it will round them, and the converted \
                 adapter will not be exact",
                dtype_flag(args),
                own(b),
                b.key
            ));
        }
        for warn in &warnings {
            crate::report::warning(warn);
        }
        return dry_run(args, &a, &config, &tensors, &layers);
    }
    let dir = OutputDir::create(&args.out, args.force, 0)?;
    let layout: Vec<_> = tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
    let header = build_header(&layout)?;
    let data_bytes: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let mut w = ShardWriter::create(&dir.path().join(crate::adapter::WEIGHTS_NAME), &header, data_bytes)?;
    for t in &tensors {
        w.write(&t.data)?;
    }
    let (file, _) = w.finish()?;
    file.sync_all().context("cannot sync the adapter file")?;
    // closed before its folder is renamed into place: Windows refuses to rename a folder that holds
    // an open file
    drop(file);
    // Sorted, as PEFT's save_pretrained writes it.
    let mut config = config;
    config.sort_keys();
    let cfg_text = serde_json::to_string_pretty(&Value::Object(config))?;
    std::fs::write(dir.path().join(crate::adapter::CONFIG_NAME), cfg_text)
        .context("cannot write adapter_config.json")?;
    crate::execute::check_interrupt()?;
    dir.commit(true)?;

    let to = match args.to {
        ConvertTo::Miss => "MISS",
        ConvertTo::Bone => "BONE",
        ConvertTo::Lora => "LORA",
    };
    let total = if err_den > 0.0 { (err_num / err_den).sqrt() } else { 0.0 };
    if rounded > 0 {
        warnings.push(format!(
            "--dtype {} rounded {rounded} of the adapter's block values: the converted adapter is not exact (relative \
             error {total:.3e}, Frobenius, over all layers)",
            dtype_flag(args)
        ));
    }
    for warn in &warnings {
        crate::report::warning(warn);
    }
    if args.json {
        let summary = json!({
            "adapter": a.dir.display().to_string(),
            "out": args.out.display().to_string(),
            "from": from.name(),
            "to": to,
            "variant": c.variant.name(),
            "exact": !(args.to == ConvertTo::Lora && c.variant == Variant::Bat) && rounded == 0,
            "rounded_values": rounded,
            "layers": layers,
            "total_rel_error": total,
            "tensors": tensors.len(),
            "files": [crate::adapter::CONFIG_NAME, crate::adapter::WEIGHTS_NAME],
            "bytes_written": data_bytes + header.len() as u64,
            "seconds": started.elapsed().as_secs_f64(),
            "warnings": warnings,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !quiet {
        if args.to == ConvertTo::Lora && c.variant == Variant::Bat {
            for l in &layers {
                eprintln!(
                    "{:<48} rank {:>4}  relative error {:.3e}",
                    l["module"].as_str().unwrap_or(""),
                    l["rank"],
                    l["rel_error"].as_f64().unwrap_or(0.0)
                );
            }
            eprintln!("total relative error (Frobenius, all layers) {total:.3e}");
        }
        eprintln!(
            "converted {} {} adapter → {to} at {} ({} tensors, {:.1}s)",
            from.name(),
            c.variant.name(),
            args.out.display(),
            tensors.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `convert --dry-run`: the tensors and config that would be written; nothing is computed beyond
/// shapes (a BAT layer's rank under --energy is shown as chosen at run time).
fn dry_run(
    args: &ConvertArgs,
    a: &Adapter,
    config: &Map<String, Value>,
    tensors: &[OutTensor],
    layers: &[Value],
) -> Result<()> {
    let size = |t: &OutTensor| {
        (!t.shape.is_empty()).then(|| (t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8) as u64)
    };
    let known: u64 = tensors.iter().filter_map(size).sum();
    let unknown = tensors.iter().filter(|t| t.shape.is_empty()).count();
    let bat_lora = args.to == ConvertTo::Lora && a.config.variant == Variant::Bat;
    let plan = json!({
        "adapter": a.dir.display().to_string(),
        "out": args.out.display().to_string(),
        "out_exists": args.out.exists(),
        "would_replace": args.out.exists() && args.force,
        "from": a.config.peft_type.name(),
        "to": format!("{:?}", args.to).to_uppercase(),
        "variant": a.config.variant.name(),
        "exact": !bat_lora,
        "peft_type": config.get("peft_type"),
        "tensors": tensors.iter().map(|t| json!({
            "name": t.name, "dtype": format!("{:?}", t.dtype),
            "shape": if t.shape.is_empty() { Value::Null } else { json!(t.shape) }, "bytes": size(t),
        })).collect::<Vec<_>>(),
        "layers": layers,
        "bytes": known,
        "tensors_of_unknown_size": unknown,
        "files": [crate::adapter::CONFIG_NAME, crate::adapter::WEIGHTS_NAME],
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    for t in &plan["tensors"].as_array().cloned().unwrap_or_default() {
        let shape = if t["shape"].is_null() {
            "[rank chosen by --energy at run time]".to_string()
        } else {
            t["shape"].to_string()
        };
        println!("write  {:<64} {} {shape}", t["name"].as_str().unwrap_or(""), t["dtype"].as_str().unwrap_or(""));
    }
    let exists = match (args.out.exists(), args.force) {
        (true, true) => " (replacing the existing folder)",
        (true, false) => " (exists: --force needed)",
        _ => "",
    };
    println!(
        "plan: {} {} adapter -> {} ({}), {} tensors, {}{} to {}{exists}; nothing written (--dry-run)",
        plan["from"].as_str().unwrap_or(""),
        plan["variant"].as_str().unwrap_or(""),
        plan["to"].as_str().unwrap_or(""),
        if bat_lora { "truncated SVD per layer" } else { "exact" },
        tensors.len(),
        indicatif::HumanBytes(known),
        if unknown > 0 { format!(" + {unknown} tensors sized by their rank") } else { String::new() },
        args.out.display()
    );
    Ok(())
}

/// The base model: --base, else base_model_name_or_path when it names a local folder or a model
/// in the local Hugging Face cache.
fn find_base(args: &ConvertArgs, a: &Adapter, quiet: bool) -> Result<Model> {
    if let Some(b) = &args.base {
        return Model::open(b);
    }
    if let Some(p) = &a.config.base_model_name_or_path {
        if let Some(path) = crate::hub::recorded_base(p, quiet)? {
            return Model::open(&path);
        }
    }
    let why = match (args.to, a.config.variant) {
        (ConvertTo::Lora, Variant::Bat) => "BAT's delta depends on the base weights",
        (ConvertTo::Lora, _) => "LoRA's A matrix is [r, in_features], and the adapter does not record in_features",
        _ => "expanding a mini block needs each layer's out_features",
    };
    Err(input(format!(
        "{}: {why}: pass --base MODEL (base_model_name_or_path {:?} is neither a local folder nor in the local \
         Hugging Face cache)",
        a.dir.display(),
        a.config.base_model_name_or_path.as_deref().unwrap_or("")
    )))
}

/// Memory that BAT -> LoRA may give to the layers it works on at once: about 16 bytes a weight
/// value each (the weight and its delta in f32, the delta again in f64 for the SVD).
const SVD_MEMORY: u64 = 2 << 30;

/// BAT -> LoRA: the truncated SVD of every block's delta, in the order of the blocks (targeted,
/// then untargeted). The SVDs of tall-skinny products keep
/// about one core busy, so several layers run at a time: as many as there are worker threads,
/// within [`SVD_MEMORY`]. A bar of layers on a terminal; Ctrl-C stops at the next layer.
fn bat_low_ranks(
    a: &Adapter,
    base: &Model,
    rule: RankRule,
    store: impl Fn(&Block) -> Float + Sync,
    quiet: bool,
) -> Result<Vec<lowrank::LowRank>> {
    let blocks: Vec<&Block> = a.blocks.iter().chain(&a.untargeted).collect();
    let shapes = blocks.iter().map(|b| layer_geometry(a, b, Some(base))).collect::<Result<Vec<_>>>()?;
    let largest = shapes.iter().map(|(o, i)| (o * i) as u64).max().unwrap_or(1).max(1);
    let at_once = ((SVD_MEMORY / (16 * largest)) as usize).clamp(1, rayon::current_num_threads().max(1));
    let progress = if quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::with_draw_target(Some(blocks.len() as u64), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} layers (SVD), eta {eta} {wide_msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb
    };
    let one = |n: usize| -> Result<lowrank::LowRank> {
        crate::execute::check_interrupt()?;
        let (b, (o, i)) = (blocks[n], shapes[n]);
        progress.set_message(b.module.clone());
        let (si, w_entry) = base.tensor(&b.target()).expect("checked by layer_geometry");
        let w = base.shards[si].read_f32(w_entry)?;
        let delta = ops::bat_delta(&w, o, i, &a.file.read_f32(&b.entry)?, a.config.r);
        drop(w);
        let lr = lowrank::truncate(&delta, o, i, rule, store(b))
            .map_err(|e| input(format!("layer {}: [{o}, {i}]: {e}", b.module)))?;
        progress.inc(1);
        Ok(lr)
    };
    // workers take the next layer as they finish one; results in the blocks' order
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Done = Vec<(usize, lowrank::LowRank)>;
    let results: Vec<std::result::Result<Done, (usize, anyhow::Error)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..at_once)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = vec![];
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n >= blocks.len() {
                            return Ok(done);
                        }
                        match one(n) {
                            Ok(x) => done.push((n, x)),
                            Err(e) => {
                                // the others stop at their next layer
                                next.store(blocks.len(), std::sync::atomic::Ordering::Relaxed);
                                return Err((n, e));
                            }
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().map(|h| h.join().expect("an SVD worker panicked")).collect()
    });
    progress.finish_and_clear();
    let mut all = vec![];
    let mut failed: Option<(usize, anyhow::Error)> = None;
    for r in results {
        match r {
            Ok(done) => all.extend(done),
            // the first layer's error, whichever worker saw it
            Err((n, e)) if failed.as_ref().is_none_or(|(m, _)| n < *m) => failed = Some((n, e)),
            Err(_) => {}
        }
    }
    if let Some((_, e)) = failed {
        return Err(e);
    }
    all.sort_by_key(|(n, _)| *n);
    Ok(all.into_iter().map(|(_, x)| x).collect())
}

/// `(O, I)` of a block's base tensor, checked against the variant's rules.
fn layer_geometry(a: &Adapter, b: &Block, base: Option<&Model>) -> Result<(usize, usize)> {
    let base = base.expect("callers find the base first");
    let g = a.check_layer(b, base).map_err(|p| input(format!("{}: {p}", a.dir.display())))?;
    Ok((g.o, g.i))
}

/// The dtype a block's tensors are written in: --dtype's; without it the block's own, but f32 for
/// the factors of BAT -> LoRA (new values, as PEFT's convert_to_lora stores them from a loaded
/// adapter, whose blocks it upcasts).
fn out_float(args: &ConvertArgs, variant: Variant, b: &Block) -> Float {
    let own = || Float::from_dtype(b.entry.dtype).expect("checked when opened");
    match args.dtype {
        Some(d) => d.float().unwrap_or_else(own),
        None if args.to == ConvertTo::Lora && variant == Variant::Bat => Float::F32,
        None => own(),
    }
}

/// `--dtype`'s value as the user spelled it.
fn dtype_flag(args: &ConvertArgs) -> String {
    args.dtype.map(|d| format!("{d:?}").to_lowercase()).unwrap_or_default()
}

/// Values rounded to the dtype they are written in, with what that cost.
struct Narrowed {
    values: Vec<f32>,
    /// how many values rounding changed
    changed: usize,
    /// `Σ w·(x − x̃)²` and `Σ w·x²`, each value weighted by how often it counts (`weight(index)`)
    num: f64,
    den: f64,
}

/// `values` rounded to `f`; an error where a finite value overflows it (f16's range).
fn narrow(f: Float, mut values: Vec<f32>, weight: impl Fn(usize) -> f64) -> std::result::Result<Narrowed, String> {
    let before = values.clone();
    f.round(&mut values);
    let (mut changed, mut num, mut den) = (0, 0f64, 0f64);
    for (n, (x, y)) in before.iter().zip(&values).enumerate() {
        if x.is_finite() && !y.is_finite() {
            return Err(format!(
                "value {x} at element {n} does not fit in {f} (largest finite {}): choose another --dtype",
                f.max_finite()
            ));
        }
        if !x.is_finite() {
            continue;
        }
        let w = weight(n);
        den += w * (*x as f64).powi(2);
        if x.to_bits() != y.to_bits() {
            changed += 1;
            num += w * (*x as f64 - *y as f64).powi(2);
        }
    }
    Ok(Narrowed { values, changed, num, den })
}

fn encode(f: Float, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * f.size()];
    f.encode(v, &mut out);
    out
}

/// A LoraConfig with scale 1 (lora_alpha = r), carrying the source's targeting fields.
fn lora_config(a: &Adapter, layers: &[Value], args: &ConvertArgs) -> Map<String, Value> {
    let c = &a.config;
    let raw = c.raw.as_object().cloned().unwrap_or_default();
    let ranks: Vec<u64> = layers.iter().filter_map(|l| l["rank"].as_u64()).collect();
    let uniform = ranks.first().copied().filter(|r0| ranks.iter().all(|r| r == r0));
    let mut rank_pattern = Map::new();
    let (r, alpha) = match (uniform, args.energy) {
        (Some(r), None) => (r, r),
        _ => {
            for l in layers {
                rank_pattern.insert(l["module"].as_str().unwrap_or("").to_string(), l["rank"].clone());
            }
            (1, 1)
        }
    };
    let mut cfg = Map::new();
    for key in [
        "base_model_name_or_path",
        "task_type",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "revision",
    ] {
        cfg.insert(key.into(), raw.get(key).cloned().unwrap_or(Value::Null));
    }
    cfg.insert("peft_type".into(), json!("LORA"));
    cfg.insert("r".into(), json!(r));
    cfg.insert("lora_alpha".into(), json!(alpha));
    cfg.insert("rank_pattern".into(), Value::Object(rank_pattern.clone()));
    cfg.insert("alpha_pattern".into(), Value::Object(rank_pattern));
    cfg.insert("lora_dropout".into(), json!(0.0));
    cfg.insert("bias".into(), json!("none"));
    cfg.insert("fan_in_fan_out".into(), json!(false));
    cfg.insert("use_rslora".into(), json!(false));
    cfg.insert("use_dora".into(), json!(false));
    cfg.insert("init_lora_weights".into(), json!(true));
    cfg.insert("inference_mode".into(), json!(true));
    if let Some(v) = raw.get("peft_version") {
        cfg.insert("peft_version".into(), v.clone());
    }
    cfg
}
