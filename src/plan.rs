//! Planning a merge or unmerge: map every adapter tensor onto the base tensor it changes, check
//! every name, shape, dtype and divisibility rule, and lay out the output files, all before a byte
//! is written. A plan is plain data that the executor and any backend follow.

use crate::adapter::{Adapter, Variant};
use crate::error::{input, Result};
use crate::model::file::build_header;
use crate::model::{file_name, Model, TensorEntry};
use crate::ops::dtype::Float;
use crate::ops::{self, Rounding};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Merge,
    Unmerge,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// BAT merge rounds `W + Δ` once instead of PEFT's double rounding.
    pub rounding_once: bool,
    /// PEFT's `autocast_adapter_dtype`. True (PEFT's default): blocks are held in f32 while
    /// merging, so their file values are used exactly. False: PEFT holds them in the weight's dtype,
    /// so their values are first rounded to it.
    pub autocast_adapter_dtype: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { rounding_once: false, autocast_adapter_dtype: true }
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
    /// Where the base's bytes are (in the input shard of the output shard).
    pub src: TensorEntry,
    /// Empty: copy the bytes as they are.
    pub ops: Vec<Op>,
}

impl TensorJob {
    pub fn weight_float(&self) -> Option<Float> {
        Float::from_dtype(self.src.dtype)
    }
}

/// One output file.
#[derive(Clone, Debug)]
pub struct OutShard {
    pub file_name: String,
    /// The input shard its tensors come from.
    pub input: usize,
    pub header: Vec<u8>,
    pub jobs: Vec<TensorJob>,
    pub data_bytes: u64,
}

#[derive(Debug)]
pub struct Plan {
    pub direction: Direction,
    pub shards: Vec<OutShard>,
    /// The index to write, for a sharded output.
    pub index: Option<(String, serde_json::Value)>,
    /// Files copied from the base folder as they are.
    pub side_files: Vec<PathBuf>,
    pub warnings: Vec<String>,
    pub changed: usize,
    pub copied: usize,
}

impl Plan {
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.len() as u64 + s.data_bytes).sum()
    }
}

/// Weight files of other formats are not copied: they would still hold the unmerged weights.
const STALE_WEIGHTS: &[&str] = &[".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".safetensors"];

/// Build the plan for `adapters` applied to (or removed from) `base`, in the order given.
pub fn build(base: &Model, adapters: &[Adapter], direction: Direction, opts: Options) -> Result<Plan> {
    let mut warnings: Vec<String> = adapters.iter().flat_map(|a| a.warnings.iter().cloned()).collect();
    let mut ops_by_tensor: std::collections::HashMap<String, Vec<Op>> = Default::default();
    let mut problems: Vec<String> = vec![];

    // Adapters are merged in the order given and unmerged last-in first-out.
    let order: Vec<usize> = match direction {
        Direction::Merge => (0..adapters.len()).collect(),
        Direction::Unmerge => (0..adapters.len()).rev().collect(),
    };
    for &ai in &order {
        let a = &adapters[ai];
        let at = a.dir.display();
        // Replacements first: they replace the whole tensor, then blocks act on the result.
        for rep in &a.replacements {
            if let Err(p) = a.check_replacement(rep, base) {
                problems.push(format!("{at}: {p}"));
                continue;
            }
            match direction {
                Direction::Merge => {
                    ops_by_tensor.entry(rep.target.clone()).or_default().push(Op::Replace { adapter: ai, src: rep.entry.clone() })
                }
                Direction::Unmerge => warnings.push(format!(
                    "{at}: {:?} was replaced by the adapter ({:?}); unmerge cannot restore the original, so the merged tensor is kept",
                    rep.target, rep.key
                )),
            }
        }
        for b in &a.blocks {
            let g = match a.check_layer(b, base) {
                Ok(g) => g,
                Err(p) => {
                    problems.push(format!("{at}: {p}"));
                    continue;
                }
            };
            let adapter_float = if opts.autocast_adapter_dtype { Float::F32 } else { g.weight };
            let rounding = Rounding { weight: g.weight, adapter: adapter_float, once: opts.rounding_once };
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
            ops_by_tensor.entry(b.target()).or_default().push(op);
        }
    }
    if let Some(first) = problems.first() {
        let more =
            if problems.len() > 1 { format!(" (and {} more problems)", problems.len() - 1) } else { String::new() };
        return Err(input(format!("{first}{more}")));
    }
    if direction == Direction::Merge {
        check_tied_embeddings(base, &ops_by_tensor)?;
    }

    let mut changed = 0;
    let mut copied = 0;
    let mut shards = Vec::with_capacity(base.shards.len());
    for (si, shard) in base.shards.iter().enumerate() {
        let jobs: Vec<TensorJob> = shard
            .tensors
            .iter()
            .map(|t| {
                let ops = ops_by_tensor.remove(&t.name).unwrap_or_default();
                if ops.is_empty() {
                    copied += 1
                } else {
                    changed += 1
                }
                TensorJob { name: t.name.clone(), src: t.clone(), ops }
            })
            .collect();
        let layout: Vec<_> = jobs.iter().map(|j| (j.name.clone(), j.src.dtype, j.src.shape.clone())).collect();
        let header = build_header(&layout)?;
        let data_bytes = jobs.iter().map(|j| j.src.len_bytes()).sum();
        // The base's own file names: model.safetensors, its shards, or a lone file's name.
        shards.push(OutShard { file_name: file_name(&shard.path), input: si, header, jobs, data_bytes });
    }
    debug_assert!(ops_by_tensor.is_empty(), "every target was checked to exist");

    let index = base.index.as_ref().map(|idx| {
        let mut out = idx.clone();
        let total: u64 = shards.iter().map(|s| s.data_bytes).sum();
        let mut weight_map = serde_json::Map::new();
        for s in &shards {
            for j in &s.jobs {
                weight_map.insert(j.name.clone(), serde_json::Value::String(s.file_name.clone()));
            }
        }
        let obj = out.as_object_mut().expect("index was checked to be an object");
        let meta = obj.entry("metadata").or_insert_with(|| serde_json::json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert("total_size".into(), total.into());
        }
        obj.insert("weight_map".into(), serde_json::Value::Object(weight_map));
        (base.index_name.clone().unwrap_or_else(|| crate::model::INDEX_NAME.to_string()), out)
    });

    let side_files = match &base.folder {
        Some(folder) => side_files(folder, base, &shards, &mut warnings)?,
        None => vec![],
    };
    Ok(Plan { direction, shards, index, side_files, warnings, changed, copied })
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

/// Merging into one side of a tied `lm_head` / `embed_tokens` pair would silently change (or lose)
/// the other side when the model is loaded: refuse.
fn check_tied_embeddings(base: &Model, ops: &std::collections::HashMap<String, Vec<Op>>) -> Result<()> {
    let touched: Vec<&String> =
        ops.keys().filter(|n| n.as_str() == "lm_head.weight" || n.ends_with("embed_tokens.weight")).collect();
    if touched.is_empty() {
        return Ok(());
    }
    let has_head = base.has("lm_head.weight");
    if base.ties_embeddings() == Some(true) || !has_head {
        return Err(input(format!(
            "the base ties lm_head to embed_tokens (config.json tie_word_embeddings{}) and the adapter changes {:?}: \
             merging one side of a tied pair would change the other when the model is loaded; untie the base first \
             (save it with tie_word_embeddings false and both tensors)",
            if has_head { " is true" } else { ", no lm_head.weight stored" },
            touched[0]
        )));
    }
    Ok(())
}

fn side_files(
    folder: &std::path::Path,
    base: &Model,
    shards: &[OutShard],
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
        if name.contains(".tmp-") {
            continue;
        }
        let ft = e.file_type().map_err(|err| input(format!("{}: {err}", path.display())))?;
        if ft.is_dir() {
            warnings
                .push(format!("not copied: folder {} (only the files of the model folder are copied)", path.display()));
            continue;
        }
        if STALE_WEIGHTS.iter().any(|ext| name.ends_with(ext)) || name.ends_with(".bin.index.json") {
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
