//! Reading Hugging Face model folders: one `model.safetensors`, or an index plus its shards.
//! This module knows nothing of adapters.

pub mod file;
pub mod output;

use crate::error::{input, Result};
use anyhow::Context;
pub use file::{SafetensorsFile, TensorBytes, TensorEntry};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";
/// The output embedding that transformers ties to the input embedding (most models' name; see
/// [`Model::head`]).
pub const HEAD: &str = "lm_head.weight";
/// GPT-NeoX's output embedding, tied to its `gpt_neox.embed_in.weight`.
const NEOX_HEAD: &str = "embed_out.weight";
/// How the input embedding's name ends: `model.embed_tokens` (Llama, Qwen, Gemma, OPT's
/// `model.decoder.embed_tokens`, …), `transformer.wte` (GPT-2, MPT), `transformer.word_embeddings`
/// (Bloom, Falcon), `gpt_neox.embed_in` (GPT-NeoX): each family's `get_input_embeddings()`.
const INPUT_EMBEDDINGS: [&str; 4] = ["embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight"];

/// A model opened for reading: its shards' headers, validated, and where each tensor lives.
#[derive(Debug)]
pub struct Model {
    /// What the user passed.
    pub path: PathBuf,
    /// The model folder, when a folder (not a lone file) was given: its side files get copied.
    pub folder: Option<PathBuf>,
    pub shards: Vec<SafetensorsFile>,
    /// The parsed `model.safetensors.index.json`, when the model is sharded.
    pub index: Option<serde_json::Value>,
    /// The file name of the index, when sharded.
    pub index_name: Option<String>,
    /// The parsed `config.json`, when present.
    pub config: Option<serde_json::Value>,
    tensors: HashMap<String, (usize, usize)>,
    /// A tied model that stores only its input embedding: the name of that tensor, which the
    /// output layer ([`Model::head`], `lm_head.weight`) reads as (transformers does the same when
    /// it loads the model).
    pub head_alias: Option<String>,
    /// [`Model::head`], found once.
    head: &'static str,
}

impl Model {
    pub fn open(path: &Path) -> Result<Model> {
        let mut model = Self::open_any(path)?;
        model.path = path.to_path_buf();
        Ok(model)
    }

    fn open_any(path: &Path) -> Result<Model> {
        let meta = std::fs::metadata(path)
            .map_err(|e| input(format!("{}: {}{}", path.display(), io_reason(&e), hub_id_hint(path))))?;
        if meta.is_file() {
            let name = file_name(path);
            if name.ends_with(".index.json") {
                let folder = folder_of(path);
                return Self::open_index(path, &folder, &name);
            }
            if let Some(kind) = other_format(&name) {
                return Err(input(format!("{}: {kind}", path.display())));
            }
            check_link(path)?;
            let shard = SafetensorsFile::open(path)?;
            return Self::assemble(path, None, vec![shard], None, None, None);
        }
        let folder = path.to_path_buf();
        let config = read_json_if_present(&folder.join("config.json"))?;
        if folder.join(INDEX_NAME).is_file() {
            return Self::open_index(&folder.join(INDEX_NAME), &folder, INDEX_NAME);
        }
        if folder.join(SINGLE_NAME).is_file() {
            check_link(&folder.join(SINGLE_NAME))?;
            let shard = SafetensorsFile::open(&folder.join(SINGLE_NAME))?;
            return Self::assemble(path, Some(folder), vec![shard], None, None, config);
        }
        let mut found: Vec<String> = list_names(&folder)?.into_iter().filter(|n| n.ends_with(".safetensors")).collect();
        found.sort();
        let indexes: Vec<String> =
            list_names(&folder)?.into_iter().filter(|n| n.ends_with(".safetensors.index.json")).collect();
        if indexes.len() == 1 {
            return Self::open_index(&folder.join(&indexes[0]), &folder, &indexes[0]);
        }
        if found.len() == 1 && found[0] != "adapter_model.safetensors" {
            check_link(&folder.join(&found[0]))?;
            let shard = SafetensorsFile::open(&folder.join(&found[0]))?;
            return Self::assemble(path, Some(folder), vec![shard], None, None, config);
        }
        let d = folder.display();
        if folder.join("adapter_config.json").is_file() {
            return Err(input(format!(
                "{d}: this is an adapter folder (it has adapter_config.json), not a model: pass it with --adapter"
            )));
        }
        if folder.join("pytorch_model.bin").is_file() || folder.join("pytorch_model.bin.index.json").is_file() {
            return Err(input(format!(
                "{d}: only PyTorch .bin weights, no safetensors: convert them first, e.g. with transformers: \
                 AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )));
        }
        // a model in another format, not a trainer's pickles (training_args.bin, optimizer.pt, …)
        let trainer = ["training_args", "optimizer", "scheduler", "rng_state", "scaler"];
        let names: Vec<String> =
            list_names(&folder)?.into_iter().filter(|n| !trainer.iter().any(|t| n.starts_with(t))).collect();
        if let Some((name, kind)) = names.iter().find_map(|n| Some((n, other_format(n)?))) {
            return Err(input(format!("{d}: no safetensors weights, and {name:?} is {kind}")));
        }
        if found.len() > 1 {
            let shown = found.iter().take(3).map(String::as_str).collect::<Vec<_>>().join(", ");
            return Err(input(format!(
                "{d}: {} .safetensors files ({shown}{}) and no {INDEX_NAME} to say which tensors each holds: \
                 restore the index (it comes with the model), or pass a one-file model as --base",
                found.len(),
                if found.len() > 3 { ", …" } else { "" }
            )));
        }
        Err(input(format!("{d}: no {SINGLE_NAME} or {INDEX_NAME} in this folder")))
    }

    fn open_index(index_path: &Path, folder: &Path, index_name: &str) -> Result<Model> {
        let ip = index_path.display();
        check_link(index_path)?;
        let index = read_json(index_path)?;
        let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            input(format!(
                "{ip}: no \"weight_map\" object (expected {{\"metadata\": …, \"weight_map\": {{tensor: file}}}})"
            ))
        })?;
        let mut shard_names: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file =
                file.as_str().ok_or_else(|| input(format!("{ip}: weight_map[{tensor:?}] is not a file name")))?;
            if !plain_file_name(file) {
                return Err(input(format!(
                    "{ip}: weight_map[{tensor:?}] = {file:?} is not a plain file name in the model folder"
                )));
            }
            if !shard_names.iter().any(|s| s == file) {
                shard_names.push(file.to_string());
            }
        }
        if shard_names.is_empty() {
            return Err(input(format!("{ip}: the weight_map is empty")));
        }
        shard_names.sort();
        let mut shards = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let p = folder.join(name);
            if !p.is_file() {
                return Err(input(format!(
                    "{ip}: shard {name:?} named in the index is missing from {}",
                    folder.display()
                )));
            }
            check_link(&p)?;
            shards.push(SafetensorsFile::open(&p)?);
        }
        // Every tensor the index names must be in the shard it names.
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            let shard = &shards[shard_names.iter().position(|s| s == file).expect("collected above")];
            if shard.get(tensor).is_none() {
                return Err(input(format!("{ip}: tensor {tensor:?} is listed in {file:?}, which does not hold it")));
            }
        }
        let config = read_json_if_present(&folder.join("config.json"))?;
        Self::assemble(
            index_path,
            Some(folder.to_path_buf()),
            shards,
            Some(index),
            Some(index_name.to_string()),
            config,
        )
    }

    fn assemble(
        path: &Path,
        folder: Option<PathBuf>,
        shards: Vec<SafetensorsFile>,
        index: Option<serde_json::Value>,
        index_name: Option<String>,
        config: Option<serde_json::Value>,
    ) -> Result<Model> {
        let mut tensors = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (t, entry) in shard.tensors.iter().enumerate() {
                if let Some((other, _)) = tensors.insert(entry.name.clone(), (s, t)) {
                    return Err(input(format!(
                        "tensor {:?} is stored twice: in {} and in {}",
                        entry.name,
                        shards[other].path.display(),
                        shard.path.display()
                    )));
                }
            }
        }
        let mut model = Model {
            path: path.to_path_buf(),
            folder,
            shards,
            index,
            index_name,
            config,
            tensors,
            head_alias: None,
            head: HEAD,
        };
        if model.embed_name().is_some_and(|e| e.ends_with("embed_in.weight")) {
            model.head = NEOX_HEAD;
        }
        if model.ties() && !model.stores_head() {
            model.head_alias = model.embed_name().map(str::to_string);
        }
        Ok(model)
    }

    /// The shard holding `name` and its entry (`lm_head.weight` of a tied model that stores only the
    /// input embedding: that tensor).
    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorEntry)> {
        let name = match &self.head_alias {
            Some(embed) if name == self.head() => embed.as_str(),
            _ => name,
        };
        self.tensors.get(name).map(|&(s, t)| (s, &self.shards[s].tensors[t]))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }

    /// The name under which this checkpoint stores the tensor that a model loaded from it calls
    /// `name`: `name` itself, or where transformers renames keys on loading (a vision-language
    /// model's [`CHECKPOINT_RENAMES`], either way round), the renamed key that the checkpoint has,
    /// with the rename as (module prefix, stored prefix). None when neither is stored.
    /// After those, transformers 5's renames for the base's architecture
    /// ([`Model::transformers5_renames`]: an adapter trained under transformers 5).
    pub fn stored_name(&self, name: &str) -> Option<(String, Option<(&'static str, &'static str)>)> {
        if self.has(name) {
            return Some((name.to_string(), None));
        }
        let both_ways = CHECKPOINT_RENAMES.iter().flat_map(|&(m, s)| [(m, s), (s, m)]);
        both_ways.chain(self.transformers5_renames().iter().copied()).find_map(|(module, stored)| {
            let candidate = rewrite(name, module, stored)?;
            self.has(&candidate).then_some((candidate, Some((module, stored))))
        })
    }

    /// The renames transformers 5 makes, beyond [`CHECKPOINT_RENAMES`], when it loads a checkpoint
    /// of this model's architecture (config.json's `architectures`): (module prefix, stored prefix),
    /// `*` for a layer number ([`rewrite`]). A CLIP or SigLIP vision tower loses its
    /// `vision_model.` (LLaVA's `model.vision_tower.encoder.…` is stored as
    /// `vision_tower.vision_model.encoder.…`), GPT-NeoX's `embed_out` is `lm_head`, Mixtral's
    /// `block_sparse_moe` is `mlp`. Generated from transformers by
    /// `fixtures/transformers5_renames.py` ([`TRANSFORMERS5_RENAMES`]).
    pub fn transformers5_renames(&self) -> &'static [(&'static str, &'static str)] {
        let table = transformers5_table();
        self.architecture().and_then(|a| table.architectures.get(a)).map_or(&[], Vec::as_slice)
    }

    /// The input embedding (`…embed_tokens.weight`, `…wte.weight`, …: [`INPUT_EMBEDDINGS`]), the
    /// shortest such name when there are several.
    pub fn embed_name(&self) -> Option<&str> {
        self.tensors
            .keys()
            .filter(|n| {
                INPUT_EMBEDDINGS.iter().any(|e| n.strip_suffix(e).is_some_and(|p| p.is_empty() || p.ends_with('.')))
            })
            .min_by_key(|n| (n.len(), n.as_str()))
            .map(String::as_str)
    }

    /// The output layer's weight as PEFT's module paths name it, the one a tied model reads from
    /// its input embedding: `embed_out.weight` beside GPT-NeoX's `gpt_neox.embed_in.weight`, else
    /// `lm_head.weight`.
    pub fn head(&self) -> &'static str {
        self.head
    }

    /// Whether transformers ties `lm_head` to the input embedding when it loads this model:
    /// config.json says so, or (saying nothing) the model stores the embedding but no `lm_head`.
    pub fn ties(&self) -> bool {
        match self.ties_embeddings() {
            Some(t) => t,
            None => !self.stores_head() && self.embed_name().is_some(),
        }
    }

    /// The name this checkpoint's layout gives an output layer that it does not store (a tied
    /// model's, once untied): `language_model.lm_head.weight` beside a vision-language model's
    /// `language_model.model.embed_tokens.weight` ([`CHECKPOINT_RENAMES`]), else `lm_head.weight`.
    pub fn head_name(&self) -> String {
        let embed = self.embed_name().unwrap_or_default();
        renamed_heads()
            .find(|h| {
                h.strip_suffix("lm_head.weight").is_some_and(|outer| embed.starts_with(&format!("{outer}model.")))
            })
            .unwrap_or_else(|| self.head().to_string())
    }

    /// Whether the checkpoint is a bare backbone, saved from the model without its head
    /// (LlamaModel, BloomModel, OPTModel): its input embedding lies under none of the outer
    /// modules a task model wraps the backbone in ([`BACKBONES`]) nor a vision-language
    /// checkpoint's ([`CHECKPOINT_RENAMES`]): `embed_tokens.weight`, `decoder.embed_tokens.weight`,
    /// `word_embeddings.weight`. transformers loads it under its task model's outer module and
    /// refuses such a checkpoint with an output layer beside it.
    pub fn is_bare_backbone(&self) -> bool {
        self.embed_name().is_some_and(|e| {
            !BACKBONES.iter().chain(CHECKPOINT_RENAMES.iter().map(|(_, stored)| stored)).any(|p| e.starts_with(p))
        })
    }

    /// Whether some tensor's name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors.keys().any(|n| n.starts_with(prefix))
    }

    /// Whether the checkpoint stores an output layer: `lm_head.weight`, or a vision-language
    /// model's renamed one (`language_model.lm_head.weight`, [`CHECKPOINT_RENAMES`]).
    fn stores_head(&self) -> bool {
        self.tensors.contains_key(self.head()) || renamed_heads().any(|h| self.tensors.contains_key(&h))
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().flat_map(|s| s.tensors.iter()).map(|t| t.len_bytes()).sum()
    }

    /// Whether transformers leaves the module `module` (a tensor name without `.weight`) out when
    /// it loads this model, so that PEFT never wraps it: a multi-token-prediction layer stored
    /// after config.json's `num_hidden_layers` decoder layers (DeepSeek-V3's `model.layers.61`,
    /// GLM-4.5's `model.layers.92`), or Qwen3-Next's and Qwen3.5's `mtp.*` (each family's
    /// `_keys_to_ignore_on_load_unexpected`).
    pub fn never_loaded(&self, module: &str) -> bool {
        if module.starts_with("mtp.") {
            return true;
        }
        let layers = self.config.as_ref().and_then(|c| c.get("num_hidden_layers")?.as_u64());
        let index = module
            .strip_prefix("model.")
            .unwrap_or(module)
            .strip_prefix("layers.")
            .and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
        matches!((layers, index), (Some(layers), Some(n)) if n >= layers)
    }

    /// The output layer's weight and bias, by the names PEFT's modules give them (stored or not).
    pub fn head_tensors(&self) -> [String; 2] {
        let module = self.head().strip_suffix(".weight").unwrap_or(self.head());
        [self.head().to_string(), format!("{module}.bias")]
    }

    /// Whether the checkpoint stores the tensor `name` under that name (no tied head read from
    /// its embedding, no vision-language rename).
    pub fn stores(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored tensors whose rows are the vocabulary: the input embedding, and an untied output
    /// layer's weight and bias.
    pub fn vocab_tensors(&self) -> Vec<String> {
        let stored = self.head_tensors().into_iter().filter(|n| self.stores(n));
        self.embed_name().map(str::to_string).into_iter().chain(stored).collect()
    }

    /// The transformers class config.json names (`architectures`, its first entry).
    pub fn architecture(&self) -> Option<&str> {
        self.config.as_ref()?.get("architectures")?.get(0)?.as_str()
    }

    /// `config.json`'s `tie_word_embeddings`, when the file says; for a vision-language model
    /// saying nothing at the top, its `text_config`'s (which transformers ties by).
    pub fn ties_embeddings(&self) -> Option<bool> {
        let c = self.config.as_ref()?;
        c.get("tie_word_embeddings").or_else(|| c.get("text_config")?.get("tie_word_embeddings"))?.as_bool()
    }
}

/// The outer modules that transformers' task models (…ForCausalLM) wrap their backbone in, their
/// `base_model_prefix`: `model.` (Llama, Qwen, Mistral, Gemma, OPT, …), `transformer.` (Bloom,
/// Falcon, GPT-J, GPT-2, MPT), `gpt_neox.` ([`Model::is_bare_backbone`],
/// [`crate::adapter::Adapter::for_base`]).
pub const BACKBONES: [&str; 3] = ["model.", "transformer.", "gpt_neox."];

/// How transformers (4.52 and later) renames a vision-language model's checkpoint keys when it
/// loads them (each model class's `_checkpoint_conversion_mapping`), and back when it saves: module
/// paths, which PEFT's adapter keys follow, on the left; the keys of checkpoints saved by older
/// versions, as most on the Hub are (and as 4.57 still saves them), on the right. LLaVA and its
/// kin, PaliGemma, Gemma 3, Mistral 3, InternVL, Aya Vision and Mllama keep the language model
/// under `language_model.model.`; Qwen2-VL and Qwen2.5-VL under `model.`; Emu3 under
/// `text_model.model.`. [`Model::stored_name`] also tries each the other way round (an adapter
/// made before 4.52 on a checkpoint saved in the new layout; Gemma3n's text model).
pub const CHECKPOINT_RENAMES: &[(&str, &str)] = &[
    ("model.language_model.", "language_model.model."),
    ("model.language_model.", "model."),
    ("model.text_model.", "text_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("lm_head.", "text_model.lm_head."),
    ("model.visual.", "visual."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_model.", "vision_model."),
    ("model.image_tower.", "image_tower."),
    ("model.video_tower.", "video_tower."),
    ("model.vqmodel.", "vqmodel."),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
];

/// transformers 5's renames per architecture ([`Model::transformers5_renames`]), written by
/// `scripts/transformers5-renames.sh`.
pub const TRANSFORMERS5_RENAMES: &str = include_str!("transformers5-renames.json");

#[derive(serde::Deserialize)]
struct Transformers5Table {
    /// The transformers version the table was made with.
    #[cfg_attr(not(test), allow(dead_code))]
    transformers: &'static str,
    architectures: HashMap<&'static str, Vec<(&'static str, &'static str)>>,
}

fn transformers5_table() -> &'static Transformers5Table {
    static TABLE: std::sync::OnceLock<Transformers5Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        serde_json::from_str(TRANSFORMERS5_RENAMES).expect("src/model/transformers5-renames.json is valid (unit test)")
    })
}

/// `name` (a dotted tensor or module name) with the prefix `from` replaced by `to`: dotted prefixes
/// that end in `.`, where a segment `*` stands for a number (a layer's), carried over to the `*` of
/// `to` in order. None when `name` does not begin with `from`. A `name` that is `from` without its
/// dot gives `to` without its dot.
pub fn rewrite(name: &str, from: &str, to: &str) -> Option<String> {
    let from = from.strip_suffix('.').unwrap_or(from);
    let to = to.strip_suffix('.').unwrap_or(to);
    let parts: Vec<&str> = name.split('.').collect();
    let pattern: Vec<&str> = if from.is_empty() { vec![] } else { from.split('.').collect() };
    if parts.len() < pattern.len() {
        return None;
    }
    let mut numbers = vec![];
    for (p, n) in pattern.iter().zip(&parts) {
        if *p == "*" {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            numbers.push(*n);
        } else if p != n {
            return None;
        }
    }
    let mut numbers = numbers.into_iter();
    let head = if to.is_empty() { vec![] } else { to.split('.').collect() };
    let mut out = Vec::with_capacity(head.len() + parts.len() - pattern.len());
    for t in head {
        out.push(if t == "*" { numbers.next()? } else { t });
    }
    out.extend(&parts[pattern.len()..]);
    Some(out.join("."))
}

/// The names a vision-language checkpoint may store the output layer under
/// (`language_model.lm_head.weight`, …): [`CHECKPOINT_RENAMES`] of `lm_head`.
fn renamed_heads() -> impl Iterator<Item = String> {
    CHECKPOINT_RENAMES.iter().filter(|(module, _)| format!("{module}weight") == HEAD).map(|(_, s)| format!("{s}weight"))
}

/// A weights file that is a symbolic link must point inside its folder, or, in a Hugging Face cache
/// snapshot (`models--*/snapshots/<rev>/`), into that repository's `blobs/`.
pub fn check_link(path: &Path) -> Result<()> {
    let is_link = std::fs::symlink_metadata(path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
    if !is_link {
        return Ok(());
    }
    let folder = folder_of(path);
    let folder = folder.canonicalize().unwrap_or(folder);
    let target = path
        .canonicalize()
        .map_err(|e| input(format!("{}: broken symbolic link: {}", path.display(), io_reason(&e))))?;
    if target.starts_with(&folder) {
        return Ok(());
    }
    let snapshots = folder.parent().filter(|p| p.file_name().is_some_and(|n| n == "snapshots"));
    let repo =
        snapshots.and_then(Path::parent).filter(|r| r.file_name().is_some_and(|n| n.to_string_lossy().contains("--")));
    if let Some(repo) = repo {
        if target.starts_with(repo.join("blobs")) {
            return Ok(());
        }
    }
    Err(input(format!(
        "{} is a symbolic link to {}, outside its folder: copy the file into the folder (links are followed only \
         inside it, or into a Hugging Face cache's blobs/)",
        path.display(),
        target.display()
    )))
}

/// What a weights file of another format is, and what to do instead; None for anything else.
/// `--base` refuses these files, and a merge does not copy them from the model folder.
pub(crate) fn other_format(name: &str) -> Option<String> {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
    let (what, instead) = match ext.as_str() {
        "gguf" => ("a GGUF file (llama.cpp)", "merge into the Hugging Face model, then convert it (convert_hf_to_gguf.py)"),
        "bin" | "pt" | "pth" => (
            "a PyTorch pickle, which bone-tool does not unpickle",
            "save the model as safetensors first: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
        ),
        "ckpt" | "h5" | "msgpack" | "onnx" => ("not a safetensors file", "bone-tool reads Hugging Face safetensors models"),
        _ => return None,
    };
    Some(format!("{what}: {instead}"))
}

/// The folder holding `p`: `.` for a bare file name (whose `parent()` is the empty path, which no
/// file-system call accepts and every path `starts_with`).
pub fn folder_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(f) if !f.as_os_str().is_empty() => f.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `p` itself when it is not a file (a folder, or a path that does not exist), else the folder
/// holding it: an adapter folder given by its config or weights file, a model by its index file.
pub fn dir_of(p: &Path) -> PathBuf {
    if p.is_file() {
        folder_of(p)
    } else {
        p.to_path_buf()
    }
}

pub fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn list_names(folder: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(folder).with_context(|| format!("cannot list {}", folder.display()))?;
    Ok(rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| input(format!("{}: {}", path.display(), io_reason(&e))))?;
    serde_json::from_str(&text).map_err(|e| input(format!("{}: not valid JSON: {e}", path.display())))
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// For a path that does not exist but reads like a Hugging Face Hub id (`org/name[@revision]`),
/// which [`crate::hub::resolve`] did not find in the local cache: a hint to download it there;
/// else nothing.
pub fn hub_id_hint(path: &Path) -> String {
    match crate::hub::parse_id(path) {
        Some((id, rev)) if id.contains('/') => {
            let cache = crate::hub::cache_dir()
                .map_or_else(|| "(no HOME or HF_HOME set)".to_string(), |c| c.display().to_string());
            let rev = rev.map_or(String::new(), |r| format!(" --revision {r}"));
            format!(
                " (not in the local Hugging Face cache {cache} either; bone-tool does not download: \
                 `hf download {id}{rev}` or `huggingface-cli download {id}{rev}` puts it there)"
            )
        }
        _ => String::new(),
    }
}

/// A short reason for an I/O error, the way a user reads it.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or folder".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

/// A name that, joined to a folder, names a file in that folder: one normal component, with no
/// separator of either system (on Windows `C:x` names a file on drive C's working folder).
fn plain_file_name(name: &str) -> bool {
    use std::path::Component;
    let mut parts = Path::new(name).components();
    matches!((parts.next(), parts.next()), (Some(Component::Normal(n)), None) if n == name)
        && !name.contains(['/', '\\'])
}

#[cfg(test)]
mod tests {
    use super::{hub_id_hint, plain_file_name, rewrite, transformers5_table, CHECKPOINT_RENAMES};
    use std::path::Path;

    #[test]
    fn rewrite_swaps_prefixes_and_carries_layer_numbers() {
        let r = |n, f, t| rewrite(n, f, t);
        assert_eq!(r("lm_head.weight", "lm_head.", "embed_out.").as_deref(), Some("embed_out.weight"));
        // whole segments only: a longer segment name is another module
        assert_eq!(r("lm_head2.weight", "lm_head.", "embed_out."), None);
        assert_eq!(
            r("model.vision_tower.encoder.layers.3.fc1.weight", "model.vision_tower.", "vision_tower.vision_model."),
            Some("vision_tower.vision_model.encoder.layers.3.fc1.weight".into())
        );
        // `*` takes a number, and gives it back where the other side has its `*`
        let (m, s) = ("model.layers.*.mlp.", "model.layers.*.block_sparse_moe.");
        assert_eq!(
            r("model.layers.12.mlp.gate.weight", m, s).as_deref(),
            Some("model.layers.12.block_sparse_moe.gate.weight")
        );
        assert_eq!(r("model.layers.12.block_sparse_moe.gate", s, m).as_deref(), Some("model.layers.12.mlp.gate"));
        assert_eq!(r("model.layers.x.mlp.gate.weight", m, s), None);
        assert_eq!(r("model.layers..mlp.gate.weight", m, s), None);
        // a name that is the prefix itself (a module path read back)
        assert_eq!(r("language_model.lm_head", "language_model.lm_head.", "lm_head.").as_deref(), Some("lm_head"));
        assert_eq!(r("model", "model.language_model.", "model."), None);
        // an empty side: everything, or nothing put before
        assert_eq!(r("layers.0.q.weight", "", "llm.").as_deref(), Some("llm.layers.0.q.weight"));
        assert_eq!(
            r("model.language_model.layers.0.q.weight", "model.language_model.", "").as_deref(),
            Some("layers.0.q.weight")
        );
    }

    #[test]
    fn transformers5_table_reads_and_holds_the_known_renames() {
        let t = transformers5_table();
        assert!(t.transformers.starts_with("5."), "{}", t.transformers);
        let rules = |a: &str| t.architectures.get(a).cloned().unwrap_or_default();
        // the renames bone-tool's fixtures check against PEFT on transformers 5
        assert!(rules("LlavaForConditionalGeneration").contains(&("model.vision_tower.", "vision_tower.vision_model.")));
        assert_eq!(rules("GPTNeoXForCausalLM"), [("lm_head.", "embed_out.")]);
        assert!(rules("MixtralForCausalLM").contains(&("model.layers.*.mlp.", "model.layers.*.block_sparse_moe.")));
        // and one whose default config builds only repaired (tests/peft_fixtures.rs merges through it)
        assert!(rules("HunYuanVLForConditionalGeneration")
            .contains(&("model.vision_tower.layers.*.mlp.fc2.", "vit.layers.*.mlp.dense_4h_to_h.")));
        for (arch, rules) in &t.architectures {
            for &(m, s) in rules {
                // dotted prefixes, no rule that CHECKPOINT_RENAMES already makes, and as many
                // layer numbers on both sides
                // (never an empty side, which would read back every name)
                assert!(m.len() > 1 && m.ends_with('.') && s.len() > 1 && s.ends_with('.'), "{arch}: {m} {s}");
                assert!(!CHECKPOINT_RENAMES.iter().any(|&p| p == (m, s) || p == (s, m)), "{arch}: {m} {s}");
                assert_eq!(m.matches('*').count(), s.matches('*').count(), "{arch}: {m} {s}");
            }
        }
    }

    #[test]
    fn hub_id_hint_only_for_missing_org_name_paths() {
        assert!(hub_id_hint(Path::new("meta-llama/Llama-3.2-1B")).contains("`hf download meta-llama/Llama-3.2-1B`"));
        assert!(hub_id_hint(Path::new("org/m@v2")).contains("`huggingface-cli download org/m --revision v2`"));
        // cargo runs unit tests in the package root, where src/model exists: an existing folder gets
        // no hint, nor do an absolute path, one part, three parts, ./ and ~
        assert!(Path::new("src/model").is_dir());
        for p in ["src/model", "/abs/path", "model", "a/b/c", "./model", "../model", "~/m", "org/"] {
            assert_eq!(hub_id_hint(Path::new(p)), "", "{p}");
        }
    }

    #[test]
    fn shard_names_stay_in_their_folder() {
        for ok in ["model-00001-of-00002.safetensors", "a b.safetensors", "x..y"] {
            assert!(plain_file_name(ok), "{ok}");
        }
        for not in ["", ".", "..", "../x", "sub/x", "/abs", "a\\b", "..\\x", "x/"] {
            assert!(!plain_file_name(not), "{not}");
        }
        // a drive prefix makes it a path on Windows; elsewhere `C:x` is a file name
        assert_eq!(plain_file_name("C:x.safetensors"), !cfg!(windows));
        assert!(!plain_file_name("\\\\?\\C:\\x"));
    }
}
