//! Planning a merge or unmerge: map every adapter tensor onto the base tensor it changes, check
//! every name, shape, dtype and divisibility rule, and lay out the output files, all before a byte
//! is written. A plan is plain data that the executor and any backend follow.

use crate::adapter::{Adapter, Variant};
use crate::error::{input, Result};
use crate::model::file::build_header;
use crate::model::{file_name, Model, TensorEntry};
use crate::ops::dtype::Float;
use crate::ops::{self, BatSums, Rounding};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Merge,
    Unmerge,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The dtype of the written float tensors (None: each keeps its own). Changed tensors are
    /// computed in their own dtype, exactly as without it, and then rounded once to this one.
    pub out_dtype: Option<Float>,
    /// Re-shard the output with Hugging Face's greedy rule at this many tensor bytes per file
    /// (None: the base's own files).
    pub max_shard_size: Option<u64>,
    /// Refuse to change one side of tied embeddings instead of untying them.
    pub keep_tied: bool,
    /// Merge a tied head's blocks into the weight it shares with the embedding and keep the tie,
    /// as PEFT's in-place merge does (verify of such a merge), instead of untying.
    pub shared_tied_head: bool,
    /// BAT merge rounds `W + Δ` once instead of PEFT's double rounding.
    pub rounding_once: bool,
    /// How BAT's GEMMs sum (as PEFT's torch on which processor).
    pub bat_sums: BatSums,
    /// PEFT's `autocast_adapter_dtype`. True (PEFT's default): blocks are held in f32 while
    /// merging, so their file values are used exactly. False: PEFT holds them in the weight's dtype,
    /// so their values are first rounded to it.
    pub autocast_adapter_dtype: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            out_dtype: None,
            max_shard_size: None,
            keep_tied: false,
            shared_tied_head: false,
            rounding_once: false,
            bat_sums: BatSums::Intel,
            autocast_adapter_dtype: true,
        }
    }
}

/// One step applied to a weight, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// The tensor is replaced outright by the adapter's tensor (modules_to_save, base_layer.weight).
    Replace { adapter: usize, src: TensorEntry },
    /// Default or mini: `W ± E[c mod r, o mod cols]` (cols = O for default, mini_r for mini).
    Periodic { adapter: usize, block: TensorEntry, r: usize, cols: usize, sign: f32, rounding: Rounding },
    /// BAT merge, or unmerge with `inverse`.
    Bat { adapter: usize, block: TensorEntry, r: usize, inverse: bool, rounding: Rounding },
}

/// One tensor of the output.
#[derive(Clone, Debug)]
pub struct TensorJob {
    pub name: String,
    /// The base shard that holds its bytes.
    pub input: usize,
    /// Where the base's bytes are in that shard (for an untied `lm_head`: the input embedding's).
    pub src: TensorEntry,
    /// Empty: copy the bytes as they are (cast to `out_dtype` when it differs).
    pub ops: Vec<Op>,
    /// The dtype written.
    pub out_dtype: safetensors::Dtype,
}

impl TensorJob {
    pub fn weight_float(&self) -> Option<Float> {
        Float::from_dtype(self.src.dtype)
    }

    /// The float dtype written, when the job casts.
    pub fn cast_to(&self) -> Option<Float> {
        if self.out_dtype == self.src.dtype {
            None
        } else {
            Float::from_dtype(self.out_dtype)
        }
    }

    pub fn out_bytes(&self) -> u64 {
        match self.cast_to() {
            Some(f) => (self.src.numel() * f.size()) as u64,
            None => self.src.len_bytes(),
        }
    }
}

/// One output file.
#[derive(Clone, Debug)]
pub struct OutShard {
    pub file_name: String,
    pub header: Vec<u8>,
    pub jobs: Vec<TensorJob>,
    pub data_bytes: u64,
}

/// An index file: its name and contents.
pub type Index = (String, serde_json::Value);

#[derive(Debug)]
pub struct Plan {
    pub direction: Direction,
    pub shards: Vec<OutShard>,
    /// The index to write, for a sharded output.
    pub index: Option<Index>,
    /// Files copied from the base folder as they are.
    pub side_files: Vec<PathBuf>,
    /// config.json to write in place of the base's (when the dtype changed or embeddings were untied).
    pub config: Option<serde_json::Value>,
    pub warnings: Vec<String>,
    /// The warning that the output unties the base's tied embeddings (also in `warnings`).
    pub untied: Option<String>,
    /// The warning that the output is a classifier, not the base's causal LM
    /// ([`Adapter::new_head_class`]; also in `warnings`).
    pub task_model: Option<String>,
    /// Tensors whose values change (by an adapter).
    pub changed: usize,
    /// Tensors the base does not have (a classifier's head, [`Adapter::new_head_class`]).
    pub added: usize,
    /// Tensors of the base left out (a classifier's output layer).
    pub dropped: Vec<String>,
    /// Tensors written with the base's bytes (or their cast).
    pub copied: usize,
    /// Tensors rounded to --dtype.
    pub cast: usize,
}

impl Plan {
    /// What the plan asks of a device: GEMMs when some tensor's chain has a BAT op (its
    /// self-check then runs BAT), and the dtypes of the weights it computes.
    pub fn needs(&self) -> crate::backend::Needs {
        let jobs = || self.shards.iter().flat_map(|s| &s.jobs);
        let gemm = jobs().any(|j| j.ops.iter().any(|op| matches!(op, Op::Bat { .. })));
        let mut needs = crate::backend::Needs { gemm, dtypes: vec![] };
        for f in jobs().filter(|j| !j.ops.is_empty()).filter_map(|j| j.weight_float()) {
            needs.include_dtype(f);
        }
        needs
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.len() as u64 + s.data_bytes).sum()
    }
}

/// Build the plan for `adapters` applied to (or removed from) `base`, in the order given.
pub fn build(base: &Model, adapters: &[Adapter], direction: Direction, opts: Options) -> Result<Plan> {
    let mut warnings: Vec<String> = adapters.iter().flat_map(|a| a.warnings.iter().cloned()).collect();
    // The same folder twice stacks it twice (as PEFT would, loaded under two names); more often a typo.
    let canonical: Vec<PathBuf> =
        adapters.iter().map(|a| std::fs::canonicalize(&a.dir).unwrap_or_else(|_| a.dir.clone())).collect();
    for (i, a) in adapters.iter().enumerate() {
        if canonical[..i].contains(&canonical[i]) {
            warnings.push(format!(
                "{}: this adapter is given more than once, so its blocks are applied once per mention",
                a.dir.display()
            ));
        }
    }
    let mut ops_by_tensor: std::collections::HashMap<String, Vec<Op>> = Default::default();
    // The tensors some op changes the values of: not a saved base layer, not a zero block.
    let mut changes: std::collections::HashSet<String> = Default::default();
    let mut problems: Vec<String> = vec![];
    // Unmerging: the tensors a later adapter's saved base layer restored, and that adapter.
    let mut restored_by: std::collections::HashMap<String, usize> = Default::default();
    let mut warned_restored: std::collections::HashSet<String> = Default::default();
    // A classifier trained on a causal LM's backbone ([`Adapter::new_head_class`]): the class the
    // output becomes and the adapter that says so, and the head's tensors, which the base lacks.
    let mut task_model: Option<(String, usize)> = None;
    let mut new_heads: Vec<(String, TensorEntry)> = vec![];
    // A vocabulary resized before training ([`Adapter::resized_vocab`]): the rows and the adapter
    // that says so, and the copies of the embedding and output layer with those rows.
    let mut vocab: Option<(usize, usize)> = None;
    let mut resized: std::collections::HashMap<String, (usize, TensorEntry)> = Default::default();

    // Adapters are merged in the order given and unmerged last-in first-out.
    let order: Vec<usize> = match direction {
        Direction::Merge => (0..adapters.len()).collect(),
        Direction::Unmerge => (0..adapters.len()).rev().collect(),
    };
    for &ai in &order {
        let a = &adapters[ai];
        let at = a.dir.display();
        let missing = a.modules_without_blocks(base);
        // (once for an adapter given twice)
        warnings.extend(a.missing_blocks_warning(&missing).filter(|w| !warnings.contains(w)));
        // Replacements first: they replace the whole tensor, then blocks act on the result.
        // Unmerging, a saved base layer is the exact original: it replaces, and the block is not undone.
        let mut restored = std::collections::HashSet::new();
        for rep in &a.replacements {
            let merging = direction == Direction::Merge;
            let checked = a.check_replacement(rep, base);
            if let (Err(_), Some(rows)) = (&checked, a.resized_vocab(rep, base).filter(|_| merging)) {
                if let Some((earlier, by)) = vocab.filter(|(r, _)| *r != rows) {
                    problems.push(format!(
                        "{at}: {:?} has {rows} rows, but {} resized the vocabulary to {earlier}",
                        rep.key,
                        adapters[by].dir.display()
                    ));
                    continue;
                }
                vocab.get_or_insert((rows, ai));
                resized.insert(rep.target.clone(), (ai, rep.entry.clone()));
            } else if let Err(p) = checked {
                let class = if merging { a.new_head_class(rep, base) } else { None };
                let Some(class) = class else {
                    problems.push(format!("{at}: {p}"));
                    continue;
                };
                if let Some((earlier, by)) = task_model.as_ref().filter(|(c, _)| *c != class) {
                    problems.push(format!(
                        "{at}: {:?} makes the model a {class}, but {} made it a {earlier}",
                        rep.key,
                        adapters[*by].dir.display()
                    ));
                    continue;
                }
                if Float::from_dtype(rep.entry.dtype).is_none() {
                    problems.push(format!(
                        "{at}: {:?} has dtype {:?}, expected F32, BF16 or F16",
                        rep.key, rep.entry.dtype
                    ));
                    continue;
                }
                task_model.get_or_insert((class, ai));
                match new_heads.iter_mut().find(|(n, _)| *n == rep.target) {
                    Some((_, entry)) => *entry = rep.entry.clone(),
                    None => new_heads.push((rep.target.clone(), rep.entry.clone())),
                }
            }
            let replace = Op::Replace { adapter: ai, src: rep.entry.clone() };
            if !rep.base_layer {
                changes.insert(rep.target.clone());
            }
            match direction {
                Direction::Merge => ops_by_tensor.entry(rep.target.clone()).or_default().push(replace),
                Direction::Unmerge if rep.base_layer => {
                    restored.insert(rep.target.clone());
                    ops_by_tensor.entry(rep.target.clone()).or_default().push(replace);
                }
                Direction::Unmerge => warnings.push(format!(
                    "{at}: {:?} was replaced by the adapter ({:?}); unmerge cannot restore the original, so the merged tensor is kept",
                    rep.target, rep.key
                )),
            }
        }
        // A module the config targets but the file has no block for gets PEFT's initial block,
        // zeros, which change nothing but -0 (W + 0 is +0); where that block would not fit the
        // layer (BAT or mini sizes that do not divide), PEFT cannot build the layer and refuses
        // the whole adapter: bone-tool leaves the module alone and says so.
        let zeros = a.zero_blocks(base, &missing);
        let mut unbuilt: Vec<String> = vec![];
        // f16/bf16 BAT blocks of an adapter saved by PEFT 0.20 or later, which merges them rounding
        // W + delta once where PEFT 0.18.1 (the default here) rounds the delta first
        let mut newer_rounding = false;
        for (b, zero) in a.blocks.iter().map(|b| (b, false)).chain(zeros.iter().map(|b| (b, true))) {
            if restored.contains(&b.target()) {
                continue;
            }
            let g = match a.check_layer(b, base) {
                Ok(g) => g,
                Err(p) if zero => {
                    unbuilt.push(p);
                    continue;
                }
                Err(p) => {
                    problems.push(format!("{at}: {p}"));
                    continue;
                }
            };
            newer_rounding |= peft_rounds_once(a, direction, opts, g.weight, zero);
            let adapter_float = if opts.autocast_adapter_dtype { Float::F32 } else { g.weight };
            let rounding =
                Rounding { weight: g.weight, adapter: adapter_float, once: opts.rounding_once, sums: opts.bat_sums };
            let c = &a.config;
            let op = match c.variant {
                Variant::Default | Variant::Mini => Op::Periodic {
                    adapter: ai,
                    block: b.entry.clone(),
                    r: c.r,
                    cols: if c.variant == Variant::Mini { c.mini_r } else { g.o },
                    sign: if direction == Direction::Merge { 1.0 } else { -1.0 },
                    rounding,
                },
                Variant::Bat => {
                    if direction == Direction::Unmerge {
                        check_invertible(a, b)?;
                    }
                    Op::Bat {
                        adapter: ai,
                        block: b.entry.clone(),
                        r: c.r,
                        inverse: direction == Direction::Unmerge,
                        rounding,
                    }
                }
            };
            if !zero {
                changes.insert(b.target());
                if let Some(&later) = restored_by.get(&b.target()) {
                    if warned_restored.insert(b.target()) {
                        warnings.push(format!(
                            "{at}: its block on {:?} is taken out of the base layer that {} saved (restored first, \
                             as the later adapter): right when that adapter was trained on a model with this one \
                             merged; if both were trained on the same base, that saved layer alone is the base",
                            b.target(),
                            adapters[later].dir.display()
                        ));
                    }
                }
            }
            ops_by_tensor.entry(b.target()).or_default().push(op);
        }
        for t in restored {
            restored_by.entry(t).or_insert(ai);
        }
        if newer_rounding {
            warnings.push(newer_rounding_note(a));
        }
        if let Some(first) = unbuilt.first() {
            let w = format!(
                "{at}: PEFT cannot build its layer on {} of the modules without a block ({first}), and refuses to \
                 load this adapter; bone-tool leaves {} as {}",
                unbuilt.len(),
                if unbuilt.len() == 1 { "it" } else { "them" },
                if unbuilt.len() == 1 { "it is" } else { "they are" },
            );
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
    }
    let keep_tie = match vocab {
        Some((rows, by)) => {
            let task = task_model.is_some();
            let (keep, warning) =
                settle_vocab(base, adapters, rows, by, task, &mut resized, &mut ops_by_tensor, &mut problems)?;
            warnings.push(warning);
            keep
        }
        None => false,
    };
    let labels = new_heads.iter().find(|(n, _)| n.ends_with(".weight")).and_then(|(_, e)| e.shape.first().copied());
    let (dropped, task_warning) = match &task_model {
        Some((class, by)) => {
            let (dropped, warning) =
                settle_task(base, &adapters[*by], class, &new_heads, labels, &ops_by_tensor, &mut problems);
            (dropped, Some(warning))
        }
        None => (vec![], None),
    };
    warnings.extend(task_warning.clone());
    // PEFT changes a tied output layer through the one weight it shares with the embedding. An
    // adapter that changes the head's values unties the pair when merged ([`untie`]); ops that
    // only give the head its saved base layer back or add PEFT's zero blocks go to the embedding,
    // as in PEFT, and the model stays tied. Unmerging, a model that is still tied had the adapter
    // merged into that shared weight (PEFT's in-place merge; bone-tool's merge unties), so it
    // comes out of it: both sides get the base back, and the model stays tied.
    if let Some(embed) = base.head_alias.as_ref().filter(|_| task_model.is_none()) {
        let shared = opts.shared_tied_head || direction == Direction::Unmerge || !changes.contains(base.head());
        if shared && !ops_by_tensor.contains_key(embed) {
            if let Some(ops) = ops_by_tensor.remove(base.head()) {
                ops_by_tensor.insert(embed.clone(), ops);
            }
        }
    }
    if let Some(first) = problems.first() {
        let more =
            if problems.len() > 1 { format!(" (and {} more problems)", problems.len() - 1) } else { String::new() };
        return Err(input(format!("{first}{more}")));
    }
    let untied = match task_model {
        None if !keep_tie => untie(base, &ops_by_tensor, &changes, opts.keep_tied)?,
        _ => None,
    };
    if let Some(w) = &untied {
        warnings.push(w.clone());
    }
    if let Some(out) = opts.out_dtype {
        warn_precision(adapters, out, &mut warnings);
    }

    // Every output tensor in the base's order; an untied lm_head right after the embedding it was.
    let mut jobs: Vec<TensorJob> = vec![];
    let out_dtype = |d: safetensors::Dtype| match (opts.out_dtype, Float::from_dtype(d)) {
        (Some(out), Some(_)) => out.dtype(),
        _ => d,
    };
    let head_job = untied.is_some().then_some(base.head_alias.as_ref()).flatten();
    for (si, shard) in base.shards.iter().enumerate() {
        for t in shard.tensors.iter().filter(|t| !dropped.contains(&t.name)) {
            let ops = ops_by_tensor.remove(&t.name).unwrap_or_default();
            // a resized vocabulary: the adapter's shape, in the base's dtype (its bytes come from the
            // replacement)
            let src = match resized.get(&t.name) {
                Some((_, entry)) => replaced_as(&t.name, entry, t.dtype),
                None => t.clone(),
            };
            jobs.push(TensorJob { name: t.name.clone(), input: si, src, ops, out_dtype: out_dtype(t.dtype) });
            if head_job == Some(&t.name) {
                let ops = ops_by_tensor.remove(base.head()).unwrap_or_default();
                jobs.push(TensorJob {
                    name: base.head_name(),
                    input: si,
                    src: t.clone(),
                    ops,
                    out_dtype: out_dtype(t.dtype),
                });
            }
        }
    }
    // a new classifier head last, in the base's float dtype, as transformers saves it
    let head_dtype = base_float_dtype(base);
    for (name, entry) in new_heads.iter() {
        let dtype = head_dtype.unwrap_or(entry.dtype);
        let src = replaced_as(name, entry, dtype);
        jobs.push(TensorJob {
            name: name.clone(),
            input: base.shards.len() - 1,
            ops: ops_by_tensor.remove(name).unwrap_or_default(),
            out_dtype: out_dtype(dtype),
            src,
        });
    }
    debug_assert!(ops_by_tensor.is_empty(), "every target was checked to exist");
    let added = new_heads.len();
    let changed = jobs.iter().filter(|j| !j.ops.is_empty()).count() - added;
    let cast = jobs.iter().filter(|j| j.out_dtype != j.src.dtype).count();
    let copied = jobs.len() - changed - added;

    let (shards, index) = layout(base, jobs, opts.max_shard_size)?;
    let task = task_model.as_ref().map(|(class, _)| (class.as_str(), labels));
    let config = new_config(base, opts.out_dtype, untied.is_some(), task, vocab.map(|(rows, _)| rows));
    let side_files = match &base.folder {
        Some(folder) => side_files(folder, base, &shards, config.is_some(), task.is_some(), &mut warnings)?,
        None => vec![],
    };
    Ok(Plan {
        direction,
        shards,
        index,
        side_files,
        config,
        warnings,
        untied,
        task_model: task_warning,
        changed,
        added,
        dropped,
        copied,
        cast,
    })
}

/// The output files: the base's own (each tensor where it was), or, with a maximum size,
/// Hugging Face's greedy split (`split_torch_state_dict_into_shards`): tensors in order fill a file
/// until the next would overflow it; a tensor larger than the maximum gets a file of its own.
fn layout(base: &Model, jobs: Vec<TensorJob>, max_shard_size: Option<u64>) -> Result<(Vec<OutShard>, Option<Index>)> {
    let mut groups: Vec<(String, Vec<TensorJob>)> = vec![];
    let index_name = match max_shard_size {
        None => {
            for job in jobs {
                let name = file_name(&base.shards[job.input].path);
                match groups.last_mut() {
                    Some((n, g)) if *n == name => g.push(job),
                    _ => groups.push((name, vec![job])),
                }
            }
            base.index.as_ref().map(|_| base.index_name.clone().unwrap_or_else(|| crate::model::INDEX_NAME.into()))
        }
        Some(max) => {
            let mut lists: Vec<Vec<TensorJob>> = vec![];
            let (mut current, mut size) = (vec![], 0u64);
            for job in jobs {
                let n = job.out_bytes();
                if n > max {
                    lists.push(vec![job]);
                    continue;
                }
                if size + n > max && !current.is_empty() {
                    lists.push(std::mem::take(&mut current));
                    size = 0;
                }
                size += n;
                current.push(job);
            }
            if !current.is_empty() || lists.is_empty() {
                lists.push(current);
            }
            let prefix = shard_prefix(base);
            let total = lists.len();
            for (k, list) in lists.into_iter().enumerate() {
                let name = if total == 1 {
                    format!("{prefix}.safetensors")
                } else {
                    format!("{prefix}-{:05}-of-{total:05}.safetensors", k + 1)
                };
                groups.push((name, list));
            }
            (total > 1).then(|| format!("{prefix}.safetensors.index.json"))
        }
    };
    let mut shards = Vec::with_capacity(groups.len());
    for (file_name, jobs) in groups {
        let layout: Vec<_> = jobs.iter().map(|j| (j.name.clone(), j.out_dtype, j.src.shape.clone())).collect();
        let header = build_header(&layout)?;
        let data_bytes = jobs.iter().map(TensorJob::out_bytes).sum();
        shards.push(OutShard { file_name, header, jobs, data_bytes });
    }
    let index = index_name.map(|name| {
        let mut out = match &base.index {
            Some(idx) if max_shard_size.is_none() => idx.clone(),
            _ => serde_json::json!({"metadata": {}}),
        };
        let total: u64 = shards.iter().map(|s| s.data_bytes).sum();
        let mut entries: Vec<(&str, &str)> =
            shards.iter().flat_map(|s| s.jobs.iter().map(move |j| (j.name.as_str(), s.file_name.as_str()))).collect();
        entries.sort();
        let weight_map: serde_json::Map<String, serde_json::Value> =
            entries.into_iter().map(|(t, f)| (t.to_string(), serde_json::Value::String(f.to_string()))).collect();
        let obj = out.as_object_mut().expect("index was checked to be an object");
        let meta = obj.entry("metadata").or_insert_with(|| serde_json::json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert("total_size".into(), total.into());
            // (transformers 4.56+ writes it; a task model's head changes it)
            if m.contains_key("total_parameters") {
                let params: usize = shards.iter().flat_map(|s| &s.jobs).map(|j| j.src.numel()).sum();
                m.insert("total_parameters".into(), params.into());
            }
        }
        obj.insert("weight_map".into(), serde_json::Value::Object(weight_map));
        (name, out)
    });
    Ok((shards, index))
}

/// `model` for model.safetensors(.index.json) and model-00001-of-00002.safetensors.
fn shard_prefix(base: &Model) -> String {
    if let Some(name) = &base.index_name {
        if let Some(p) = name.strip_suffix(".safetensors.index.json").filter(|p| !p.is_empty()) {
            return p.to_string();
        }
    }
    let first = file_name(&base.shards[0].path);
    let stem = first.strip_suffix(".safetensors").unwrap_or(&first);
    match stem.rsplit_once("-of-").and_then(|(head, _)| head.rsplit_once('-')) {
        Some((p, _)) if base.shards.len() > 1 || base.index.is_some() => p.to_string(),
        _ => stem.to_string(),
    }
}

/// config.json for the output, when it must differ from the base's: `torch_dtype` / `dtype` set to
/// --dtype (in nested configs too), `tie_word_embeddings` false once untied, a task model's
/// `architectures` and labels (`task`: its class and number of labels), a resized vocabulary's
/// `vocab_size` (`vocab`: its rows).
fn new_config(
    base: &Model,
    out: Option<Float>,
    untied: bool,
    task: Option<(&str, Option<usize>)>,
    vocab: Option<usize>,
) -> Option<serde_json::Value> {
    let mut config = base.config.clone()?;
    let mut changed = false;
    if let Some(rows) = vocab {
        // (a vision-language model keeps it in text_config)
        let obj = config.as_object_mut()?;
        if !obj.contains_key("vocab_size") && obj.get("text_config").is_some_and(|t| t.is_object()) {
            obj["text_config"]["vocab_size"] = rows.into();
        } else {
            obj.insert("vocab_size".into(), rows.into());
        }
        changed = true;
    }
    if let Some((class, labels)) = task {
        // as transformers saves a task model: its class, and labels LABEL_0… unless the base's
        // has as many (two, the default, it leaves out)
        let obj = config.as_object_mut()?;
        obj.insert("architectures".into(), serde_json::json!([class]));
        if let Some(n) = labels {
            let have = obj.get("id2label").and_then(|m| m.as_object()).map(|m| m.len());
            if have != Some(n) {
                obj.remove("id2label");
                obj.remove("label2id");
                if n != 2 {
                    let id2label: serde_json::Map<String, serde_json::Value> =
                        (0..n).map(|k| (k.to_string(), format!("LABEL_{k}").into())).collect();
                    let label2id: serde_json::Map<String, serde_json::Value> =
                        (0..n).map(|k| (format!("LABEL_{k}"), k.into())).collect();
                    obj.insert("id2label".into(), id2label.into());
                    obj.insert("label2id".into(), label2id.into());
                }
            }
        }
        changed = true;
    }
    if let Some(out) = out {
        let name = match out {
            Float::F32 => "float32",
            Float::F16 => "float16",
            Float::BF16 => "bfloat16",
        };
        fn set(v: &mut serde_json::Value, name: &str, changed: &mut bool) {
            if let Some(obj) = v.as_object_mut() {
                for (k, val) in obj.iter_mut() {
                    if (k == "torch_dtype" || k == "dtype") && val.is_string() {
                        if val.as_str() != Some(name) {
                            *val = name.into();
                            *changed = true;
                        }
                    } else if val.is_object() {
                        set(val, name, changed);
                    }
                }
            }
        }
        set(&mut config, name, &mut changed);
        let obj = config.as_object_mut()?;
        if !obj.contains_key("torch_dtype") && !obj.contains_key("dtype") {
            obj.insert("torch_dtype".into(), name.into());
            changed = true;
        }
    }
    if untied {
        config.as_object_mut()?.insert("tie_word_embeddings".into(), false.into());
        // a vision-language model is tied by its text_config's flag (transformers' get_text_config)
        if let Some(text) = config.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            text.insert("tie_word_embeddings".into(), false.into());
        }
        changed = true;
    }
    changed.then_some(config)
}

/// A vocabulary resized to `rows` before training ([`Adapter::resized_vocab`], said first by
/// `adapters[by]`): every stored tensor of vocabulary rows must come from the adapters' copies in
/// `resized` (the rows resize_token_embeddings adds are random). A tied pair stays tied, as PEFT
/// saves it: the embedding takes its copy, and the head's copy (which PEFT saves too, the same
/// weight) must be the same bytes; nothing else may change either side; the head's copy and ops
/// go. A classifier (`task`) has no output layer: only the embedding counts. Returns whether the
/// pair stays tied, and the warning to give.
#[allow(clippy::too_many_arguments)]
fn settle_vocab(
    base: &Model,
    adapters: &[Adapter],
    rows: usize,
    by: usize,
    task: bool,
    resized: &mut std::collections::HashMap<String, (usize, TensorEntry)>,
    ops_by_tensor: &mut std::collections::HashMap<String, Vec<Op>>,
    problems: &mut Vec<String>,
) -> Result<(bool, String)> {
    let at = adapters[by].dir.display();
    let stored: Vec<String> =
        base.vocab_tensors().into_iter().filter(|n| !task || Some(n.as_str()) == base.embed_name()).collect();
    let old = stored.first().and_then(|n| base.tensor(n)).map_or(0, |(_, t)| t.shape[0]);
    let mut keep_tie = false;
    if let (Some(embed), Some(_), false) = (stored.first(), &base.head_alias, task) {
        keep_tie = true;
        let head = base.head();
        if let (Some((ea, e)), Some((ha, h))) = (resized.get(embed), resized.get(head)) {
            if !same_values(&adapters[*ea].file, e, &adapters[*ha].file, h)? {
                problems.push(format!(
                    "{at}: its copies of {embed:?} and {head:?} differ, but the base ties them: PEFT's merge of a \
                     tied model resized to {rows} rows keeps one weight; save the base resized with transformers \
                     (model.resize_token_embeddings({rows})) and merge into that"
                ));
            }
        }
        for name in [embed.as_str(), head] {
            if ops_by_tensor.get(name).is_some_and(|ops| ops.iter().any(|op| !matches!(op, Op::Replace { .. }))) {
                problems.push(format!(
                    "{at}: the adapters change {name:?}, one side of the tied pair it resizes to {rows} rows: \
                     bone-tool does not resize and untie a pair at once"
                ));
            }
        }
        ops_by_tensor.remove(head);
        resized.remove(head);
    }
    for name in stored.iter().filter(|n| !resized.contains_key(*n)) {
        let copies: Vec<String> = resized.keys().map(|k| format!("{k:?}")).collect();
        problems.push(format!(
            "{at}: it resizes the vocabulary to {rows} rows (its copies of {}) but has no copy of {name:?}, whose new \
             rows resize_token_embeddings({rows}) fills at random in PEFT's merge: save the base resized with \
             transformers and merge into that",
            copies.join(", "),
        ));
    }
    let warning = format!(
        "{at}: its copies of {} have {rows} rows where the base has {old} (tokens added: PEFT loads it onto the base \
         after resize_token_embeddings({rows})): the output takes them{}, and config.json's vocab_size {rows}",
        stored.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(" and "),
        if keep_tie { ", still tied to the output layer" } else { "" },
    );
    Ok((keep_tie, warning))
}

/// A merge that makes the task model `class` (the classifier head `new_heads` from `adapter`,
/// [`Adapter::new_head_class`]): it has no output layer, so the base's is left out, and nothing may
/// change it. Returns the tensors left out and the warning to give.
fn settle_task(
    base: &Model,
    adapter: &Adapter,
    class: &str,
    new_heads: &[(String, TensorEntry)],
    labels: Option<usize>,
    ops_by_tensor: &std::collections::HashMap<String, Vec<Op>>,
    problems: &mut Vec<String>,
) -> (Vec<String>, String) {
    let at = adapter.dir.display();
    let mut dropped = vec![];
    for name in base.head_tensors() {
        if ops_by_tensor.contains_key(&name) && !new_heads.iter().any(|(n, _)| *n == name) {
            problems.push(format!(
                "the adapters change {name:?}, but the merge is a {class} ({at} holds its classifier head), which has \
                 no output layer"
            ));
        }
        if base.stores(&name) {
            dropped.push(name);
        }
    }
    let warning = format!(
        "{at}: a {} adapter with a classifier head ({}) that the base does not have: the output is a {class}, as \
         PEFT's merge of it saves it: the adapter's head{}, {}config.json's architectures and labels set",
        adapter.config.task_type.as_deref().unwrap_or_default(),
        new_heads.iter().map(|(n, _)| format!("{n:?}")).collect::<Vec<_>>().join(", "),
        labels.map(|n| format!(" ({n} labels)")).unwrap_or_default(),
        if dropped.is_empty() { String::new() } else { format!("no {:?}, ", dropped.join(", ")) },
    );
    (dropped, warning)
}

/// Whether two tensors (of adapter files) hold the same values: the same dtype, shape and bytes,
/// compared a slice at a time.
fn same_values(
    fa: &crate::model::SafetensorsFile,
    a: &TensorEntry,
    fb: &crate::model::SafetensorsFile,
    b: &TensorEntry,
) -> Result<bool> {
    if (a.dtype, &a.shape) != (b.dtype, &b.shape) {
        return Ok(false);
    }
    const SLICE: u64 = 64 << 20;
    let mut off = 0;
    while off < a.len_bytes() {
        let n = (a.len_bytes() - off).min(SLICE) as usize;
        if fa.map_range(a.start + off, n)?.bytes() != fb.map_range(b.start + off, n)?.bytes() {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// The entry of an output tensor `name` whose bytes all come from the replacement `entry` (a
/// resized vocabulary's copy, a new classifier head): its shape, in `dtype`. In no file: the
/// reader takes the replacement's bytes, cast to `dtype` where it is stored otherwise.
fn replaced_as(name: &str, entry: &TensorEntry, dtype: safetensors::Dtype) -> TensorEntry {
    let end = (entry.numel() * dtype.bitsize() / 8) as u64;
    TensorEntry { name: name.to_string(), dtype, shape: entry.shape.clone(), start: 0, end }
}

/// The dtype of the base's weights: its input embedding's, else its first float tensor's.
fn base_float_dtype(base: &Model) -> Option<safetensors::Dtype> {
    let embed = base.embed_name().and_then(|e| base.tensor(e)).map(|(_, t)| t.dtype);
    let first =
        || base.shards.iter().flat_map(|s| &s.tensors).map(|t| t.dtype).find(|d| Float::from_dtype(*d).is_some());
    embed.filter(|d| Float::from_dtype(*d).is_some()).or_else(first)
}

/// Bits of significand: what "more precise" means between float dtypes.
fn precision(f: Float) -> u32 {
    match f {
        Float::F32 => 24,
        Float::F16 => 11,
        Float::BF16 => 8,
    }
}

fn warn_precision(adapters: &[Adapter], out: Float, warnings: &mut Vec<String>) {
    for a in adapters {
        let finer =
            a.blocks.iter().filter_map(|b| Float::from_dtype(b.entry.dtype)).find(|f| precision(*f) > precision(out));
        if let Some(f) = finer {
            warnings.push(format!(
                "{}: the adapter's blocks are {} and the output is {}: the merged values are rounded to {} once",
                a.dir.display(),
                f.name(),
                out.name(),
                out.name()
            ));
        }
    }
}

/// Every `I + B_i` of a BAT block must be invertible (checked here, before anything is written;
/// the condition numbers come with the inverses during the run).
fn check_invertible(a: &Adapter, b: &crate::adapter::Block) -> Result<()> {
    let vals = a.file.read_f32(&b.entry)?;
    match ops::bat_singular(&vals, a.config.r) {
        Some(s) => Err(input(format!(
            "{}: layer {}: block {} (output rows {}..{}): I + B is singular, so this adapter cannot be unmerged",
            a.dir.display(),
            b.module,
            s.block,
            s.block * a.config.r,
            (s.block + 1) * a.config.r,
        ))),
        None => Ok(()),
    }
}

/// When the base ties `lm_head` to the input embedding and the adapters change either side (the
/// values: `changes`; ops left on the head, which has none of its own), the output unties them:
/// both tensors are written (the unchanged side with the base's values) and config.json says
/// `tie_word_embeddings: false`. Returns the warning to give, or, with `keep_tied`, refuses.
fn untie(
    base: &Model,
    ops: &std::collections::HashMap<String, Vec<Op>>,
    changes: &std::collections::HashSet<String>,
    keep_tied: bool,
) -> Result<Option<String>> {
    if !base.ties() {
        return Ok(None);
    }
    let Some(embed) = base.embed_name() else {
        return Ok(None);
    };
    let head = base.head();
    let touched: Vec<&str> =
        [head, embed].into_iter().filter(|n| ops.contains_key(*n) && (*n == head || changes.contains(*n))).collect();
    let Some(first) = touched.first() else {
        return Ok(None);
    };
    let why = match base.ties_embeddings() {
        Some(true) => "config.json has tie_word_embeddings true".to_string(),
        _ => format!("the base stores no {head}"),
    };
    let module = head.strip_suffix(".weight").unwrap_or(head);
    if base.is_bare_backbone() {
        return Err(input(format!(
            "{}: the base ties {module} to {embed:?} ({why}) and the adapter changes {first:?}, which would untie them, \
             but the base is a bare backbone (saved without an outer module such as \"model.\"), beside whose tensors \
             transformers refuses an output layer; merge into the model saved with its head (…ForCausalLM), or leave \
             {module} out of the adapter's targets",
            base.path.display()
        )));
    }
    if keep_tied {
        return Err(input(format!(
            "the base ties {module} to {embed:?} ({why}) and the adapter changes {first:?}: with --keep-tied this is \
             refused, since changing one side of a tied pair changes the other when the model is loaded; leave out \
             --keep-tied to write both tensors untied"
        )));
    }
    let stored_head = base.head_name();
    let other = if *first == head { embed } else { stored_head.as_str() };
    Ok(Some(format!(
        "the base ties {module} to {embed:?} ({why}) and the adapter changes {first:?}: the output unties them \
         (both tensors written, {other:?} with the base's values; config.json tie_word_embeddings false)"
    )))
}

fn side_files(
    folder: &std::path::Path,
    base: &Model,
    shards: &[OutShard],
    new_config: bool,
    task_model: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let used: Vec<String> = base.shards.iter().map(|s| file_name(&s.path)).collect();
    let mut entries: Vec<_> = std::fs::read_dir(folder)
        .map_err(|e| input(format!("cannot list {}: {e}", folder.display())))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if used.contains(&name) || Some(&name) == base.index_name.as_ref() || shards.iter().any(|s| s.file_name == name)
        {
            continue;
        }
        if name.contains(".tmp-") || (new_config && name == "config.json") {
            continue;
        }
        // a classifier generates nothing: transformers saves it without one
        if task_model && name == "generation_config.json" {
            continue;
        }
        let ft = e.file_type().map_err(|err| input(format!("{}: {err}", path.display())))?;
        if ft.is_dir() {
            warnings
                .push(format!("not copied: folder {} (only the files of the model folder are copied)", path.display()));
            continue;
        }
        // weight files of other formats (the ones `--base` refuses), other safetensors files and
        // pickles' indexes would still hold the unmerged weights
        let stale = crate::model::other_format(&name).is_some()
            || name.to_ascii_lowercase().ends_with(".safetensors")
            || name.ends_with(".bin.index.json");
        if stale {
            warnings.push(format!(
                "not copied: {} (weights in another format would still hold the unmerged values)",
                path.display()
            ));
            continue;
        }
        out.push(path);
    }
    Ok(out)
}

/// Whether PEFT merges this BAT block otherwise than `opts` asks: one of an f16/bf16 weight, of an
/// adapter saved by PEFT 0.20 or later ([`Adapter::saved_rounding_bat_once`]), merged with PEFT
/// 0.18.1's rounding (the delta rounded first). Without autocast_adapter_dtype PEFT holds the
/// blocks in the weight's dtype and rounds the delta to it, so 0.20 rounds twice as well.
fn peft_rounds_once(a: &Adapter, direction: Direction, opts: Options, weight: Float, zero: bool) -> bool {
    a.saved_rounding_bat_once()
        && direction == Direction::Merge
        && !opts.rounding_once
        && opts.autocast_adapter_dtype
        && weight != Float::F32
        && !zero
}

/// What to pass for the bytes of the PEFT that saved `a`, where it rounds BAT once.
pub fn newer_rounding_note(a: &Adapter) -> String {
    format!(
        "{}: saved by PEFT {}, whose merge_and_unload() rounds BAT's W + delta once in f16/bf16 weights; bone-tool \
         merge rounds the delta first, as PEFT 0.18.1 does, unless --rounding once: pass it for the newer PEFT's bytes",
        a.dir.display(),
        a.config.peft_version.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Needs;
    use std::path::Path;

    fn plan_of(base: &str, adapters: &[&str], direction: Direction) -> Plan {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let base = Model::open(&root.join("bases").join(base)).unwrap();
        let adapters: Vec<Adapter> = adapters
            .iter()
            .map(|a| Adapter::open(&root.join("cases").join(a), crate::adapter::DEFAULT_PREFIX).unwrap())
            .collect();
        build(&base, &adapters, direction, Options::default()).unwrap()
    }

    #[test]
    fn a_plan_says_whether_it_needs_gemms_and_in_which_dtypes_it_computes() {
        let default = plan_of("llama-f32", &["bone-default-f32/adapter"], Direction::Merge);
        assert_eq!(default.needs(), Needs { gemm: false, dtypes: vec![Float::F32] });
        let bat = plan_of("llama-bf16", &["bone-bat-bf16/adapter"], Direction::Unmerge);
        assert_eq!(bat.needs(), Needs { gemm: true, dtypes: vec![Float::BF16] });
        let mini = plan_of("llama-bf16", &["miss-mini-bf16/adapter"], Direction::Merge);
        assert_eq!(mini.needs(), Needs { gemm: false, dtypes: vec![Float::BF16] });
        let stacked = plan_of(
            "llama-bf16",
            &["miss-stacked-bat-bf16/adapter-1", "miss-stacked-bat-bf16/adapter-2"],
            Direction::Merge,
        );
        assert!(stacked.needs().gemm);
    }
}
