//! PEFT Bone / MiSS adapter folders: the config, the blocks, the replacement tensors, and how each
//! maps onto a base model's tensors.

pub mod config;

use crate::error::{input, Result};
use crate::model::{io_reason, Model, SafetensorsFile, TensorEntry, BACKBONES};
use crate::ops::dtype::Float;
pub use config::{AdapterConfig, PeftType, Regexes, Variant};
use std::path::{Path, PathBuf};

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The prefix PeftModel puts before every module path.
pub const DEFAULT_PREFIX: &str = "base_model.model.";

/// A module's path as PEFT names it when it decides what to target (`named_modules()` of the model
/// PEFT wrapped), from its path in the adapter file: without [`DEFAULT_PREFIX`], whatever
/// `--adapter-prefix` says. With `--adapter-prefix base_model.model.model.` (for a base saved
/// without its `model.` wrapper), the block on `layers.0.mlp.up_proj` is PEFT's
/// `model.layers.0.mlp.up_proj`, and `layers_to_transform` finds its layer only in the latter.
pub fn peft_path(path_in_file: &str) -> &str {
    path_in_file.strip_prefix(DEFAULT_PREFIX).unwrap_or(path_in_file)
}

/// One adapted layer.
#[derive(Clone, Debug)]
pub struct Block {
    /// The key in `adapter_model.safetensors`.
    pub key: String,
    /// The module path (`model.layers.0.self_attn.q_proj`): the key without `--adapter-prefix`
    /// and the block suffix.
    pub module: String,
    pub entry: TensorEntry,
    /// The base tensor the block changes: `<module>.weight`, or that tensor's name in the base's
    /// checkpoint where transformers renames it on loading ([`Adapter::locate`]).
    tensor: String,
}

impl Block {
    pub fn new(key: String, module: String, entry: TensorEntry) -> Block {
        let tensor = format!("{module}.weight");
        Block { key, module, entry, tensor }
    }

    /// The base tensor the block changes.
    pub fn target(&self) -> String {
        self.tensor.clone()
    }
}

/// A tensor that replaces a base tensor outright (modules_to_save, resized embeddings).
#[derive(Clone, Debug)]
pub struct Replacement {
    pub key: String,
    /// The base tensor it replaces.
    pub target: String,
    pub entry: TensorEntry,
    /// A `….base_layer.weight`: the base weight the adapter was trained on, which PEFT saves for
    /// embedding-like targets such as lm_head (not a trained copy, as modules_to_save are).
    pub base_layer: bool,
}

#[derive(Clone, Debug)]
pub struct Ignored {
    pub key: String,
    pub reason: String,
}

impl Ignored {
    /// The warning that names it, in the adapter file `file`.
    fn warning(&self, file: &str) -> String {
        format!("{file}: ignored {:?}: {}", self.key, self.reason)
    }
}

#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub file: SafetensorsFile,
    /// `--adapter-prefix`: what is cut from a key to give its base tensor's name.
    pub prefix: String,
    /// The blocks that merge and unmerge apply: those on modules PEFT targets.
    pub blocks: Vec<Block>,
    /// Blocks on modules that the config does not target ([`AdapterConfig::peft_targets`]):
    /// PEFT does not load them, so merge and unmerge leave them out; convert keeps them.
    pub untargeted: Vec<Block>,
    pub replacements: Vec<Replacement>,
    pub ignored: Vec<Ignored>,
    pub warnings: Vec<String>,
    /// The renames between module paths and the base's names ([`Adapter::renames`]).
    renames: Vec<(&'static str, &'static str)>,
}

/// The shape of one adapted layer, once checked against its base tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// out_features, in_features
    pub o: usize,
    pub i: usize,
    pub weight: Float,
    pub block: Float,
}

/// The way out of an adapter saved without its weights.
const UNGATHERED: &str = ": the adapter was probably saved without its weights, as DeepSpeed ZeRO-3 \
    saves it unless they are gathered first; save it again with \"stage3_gather_16bit_weights_on_model_save\": \
    true in the DeepSpeed config or save_pretrained inside deepspeed.zero.GatheredParameters \
    (transformers 5 gathers an adapter itself)";

/// Why a tensor of a module PEFT wraps (`<module>.<tensor>`, saved without `.base_layer.`) is
/// not loaded: the wrapped module's own tensors lie under `<module>.base_layer.`.
fn wrapped_reason(target: &str) -> String {
    let (module, tensor) = target.rsplit_once('.').unwrap_or((target, "weight"));
    format!(
        "a tensor of {module:?}, a module adapter_config.json targets, saved without \".base_layer.\": \
         PEFT wraps that module and loads only \"{module}.base_layer.{tensor}\", so it does not load this"
    )
}

/// `config` resolved against `base` as PEFT resolves it when it loads the adapter: no
/// target_modules → PEFT's default for the base's `model_type` ([`AdapterConfig::default_targets`],
/// an error for a type PEFT has none for); a long list beside layers_to_transform → PEFT's
/// shortened list ([`AdapterConfig::shorten_targets`]). Returns a warning for each change.
fn resolve(config: &mut AdapterConfig, base: &Model, prefix: &str, path: &Path) -> Result<Vec<String>> {
    let model_type = base.config.as_ref().and_then(|c| c.get("model_type")).and_then(serde_json::Value::as_str);
    let mut warnings: Vec<String> = config.default_targets(model_type, path)?.into_iter().collect();
    warnings.extend(config.shorten_targets(|t| other_modules(base, prefix, t), path));
    Ok(warnings)
}

/// The module paths of `base` that none of `targets` (PEFT's names) names, whole or as a suffix:
/// every parent path of a stored tensor, and a tied model's output layer, with the outer module
/// that `prefix` puts back for a bare backbone. A target's stored name counts as the target (a
/// vision-language checkpoint's renames, [`Model::stored_name`]); the others keep their stored
/// names, whose renamed first parts do not change the suffixes that
/// [`AdapterConfig::shorten_targets`] compares.
fn other_modules(base: &Model, prefix: &str, targets: &std::collections::BTreeSet<String>) -> Vec<String> {
    let outer = prefix.strip_prefix(DEFAULT_PREFIX).unwrap_or("");
    let stored: std::collections::HashSet<String> = targets
        .iter()
        .filter_map(|t| base.stored_name(&format!("{}.weight", t.strip_prefix(outer)?)))
        .filter_map(|(name, _)| Some(format!("{outer}{}", name.strip_suffix(".weight")?)))
        .collect();
    let tied_head = base.head_alias.is_some().then(|| base.head());
    let mut paths = std::collections::BTreeSet::new();
    for name in base.tensor_names().chain(tied_head) {
        let mut path = name;
        while let Some((parent, _)) = path.rsplit_once('.') {
            paths.insert(format!("{outer}{parent}"));
            path = parent;
        }
    }
    paths
        .into_iter()
        .filter(|m| !stored.contains(m) && !targets.iter().any(|t| m == t || m.ends_with(&format!(".{t}"))))
        .collect()
}

impl Adapter {
    /// Open an adapter folder (or the path of its config or weights file).
    pub fn open(path: &Path, prefix: &str) -> Result<Adapter> {
        Adapter::open_with(path, prefix, None)
    }

    /// [`Adapter::open`], its config resolved against `base` as PEFT resolves it ([`resolve`]).
    fn open_with(path: &Path, prefix: &str, base: Option<&Model>) -> Result<Adapter> {
        let dir = crate::model::dir_of(path);
        let d = dir.display();
        if !dir.is_dir() {
            return Err(input(format!(
                "{}: no such adapter folder{}",
                path.display(),
                crate::model::hub_id_hint(path)
            )));
        }
        let cfg_path = dir.join(CONFIG_NAME);
        let text = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let inside = adapters_inside(&dir);
                let hint = if !inside.is_empty() {
                    let shown: Vec<String> = inside.iter().take(4).map(|p| p.display().to_string()).collect();
                    let more = if inside.len() > 4 { format!(" and {} more", inside.len() - 4) } else { String::new() };
                    let (which, pass) = if inside.len() > 1 {
                        ("subfolders", "are adapters: pass one of them")
                    } else {
                        ("subfolder", "is one: pass it")
                    };
                    format!(
                        "; its {which} {}{more} {pass} (PEFT saves each named adapter, and a trainer each \
                         checkpoint, in a folder of its own)",
                        shown.join(", ")
                    )
                } else if dir.join("config.json").is_file() {
                    " (this looks like a model folder: pass it with --base)".to_string()
                } else {
                    String::new()
                };
                return Err(input(format!("{d}: no {CONFIG_NAME}, so this is not a PEFT adapter folder{hint}")));
            }
            Err(e) => return Err(input(format!("{}: {}", cfg_path.display(), io_reason(&e)))),
        };
        let mut warnings = vec![];
        let mut config = AdapterConfig::parse(&cfg_path, &text, &mut warnings)?;
        if let Some(base) = base {
            warnings.extend(resolve(&mut config, base, prefix, &cfg_path)?);
        }
        let weights = dir.join(WEIGHTS_NAME);
        if !weights.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                return Err(input(format!(
                    "{d}: only adapter_model.bin (a torch pickle, which bone-tool does not unpickle); convert it to safetensors: \
                     python -c \"import torch; from safetensors.torch import save_file; \
                     save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors', metadata={{'format': 'pt'}})\""
                )));
            }
            return Err(input(format!("{d}: no {WEIGHTS_NAME}")));
        }
        crate::model::check_link(&weights)?;
        let file = SafetensorsFile::open(&weights)?;
        let mut adapter = Adapter {
            dir,
            config,
            file,
            prefix: prefix.to_string(),
            blocks: vec![],
            untargeted: vec![],
            replacements: vec![],
            ignored: vec![],
            warnings,
            renames: vec![],
        };
        adapter.classify()?;
        Ok(adapter)
    }

    /// [`Adapter::open`], with each block's base tensor found in `base` ([`Adapter::for_base`]).
    pub fn open_for(path: &Path, prefix: &str, base: &Model) -> Result<Adapter> {
        Adapter::open(path, prefix)?.for_base(base)
    }

    /// The adapter, each block's base tensor found in `base` ([`Adapter::locate`]). A base saved
    /// as the bare backbone (LlamaModel's `layers.0.…`, Bloom's `h.0.…`, OPT's `decoder.…`, as
    /// facebook/opt-* and bigscience/bloom-* are on the Hub) stores no tensor under the outer
    /// module that the task model wraps it in (`model.`, `transformer.`, `gpt_neox.`: its
    /// `base_model_prefix`), and transformers loads such a checkpoint under that module. Where
    /// every key of the adapter lies under one such module, the default prefix finds no block's
    /// tensor, and without the module every block's is found, the keys are read as
    /// `--adapter-prefix base_model.model.<module>.` would read them, with a warning.
    ///
    /// The config is resolved against the base as PEFT resolves it ([`resolve`]); where that
    /// changes it, the adapter is opened again with the resolved config.
    pub fn for_base(self, base: &Model) -> Result<Adapter> {
        let changes = resolve(&mut self.config.clone(), base, &self.prefix, &self.dir).map_or(true, |w| !w.is_empty());
        let mut a = match self.backbone_prefix(base) {
            Some(prefix) => {
                let mut a = Adapter::open_with(&self.dir, &prefix, Some(base))?;
                a.warnings.push(format!(
                    "{}: the base stores its tensors without the outer module {:?} (a checkpoint of the bare \
                     backbone, which transformers loads under {:?}): the adapter's keys are read as with \
                     --adapter-prefix {prefix:?}, and the output keeps the base's names",
                    a.dir.display(),
                    &prefix[DEFAULT_PREFIX.len()..],
                    prefix[DEFAULT_PREFIX.len()..].trim_end_matches('.'),
                ));
                a
            }
            None if changes => Adapter::open_with(&self.dir, &self.prefix, Some(base))?,
            None => self,
        };
        a.locate(base);
        a.ignore_wrapped_all_linear(base);
        Ok(a)
    }

    /// With "all-linear" PEFT wraps the Linear layers the config targets, which only the base
    /// tells (a 2-D weight): a tensor of one saved without `.base_layer.` is not loaded, as for
    /// named targets ([`Adapter::classify`]).
    fn ignore_wrapped_all_linear(&mut self, base: &Model) {
        if !self.config.all_linear() {
            return;
        }
        let mut regexes = Regexes::default();
        let wp = self.file.path.display().to_string();
        for r in std::mem::take(&mut self.replacements) {
            let in_file = r.key.rsplit_once('.').map_or(r.key.as_str(), |(m, _)| m);
            let weight = r.target.rsplit_once('.').map(|(m, _)| format!("{m}.weight"));
            let linear = weight.and_then(|w| base.tensor(&w).map(|(_, e)| e.shape.len() == 2)) == Some(true);
            if !r.base_layer && linear && self.targets(in_file, &mut regexes) == Some(true) {
                // (the key's own path: `target` may be the checkpoint's renamed one by now)
                let ig = Ignored {
                    reason: wrapped_reason(r.key.strip_prefix(self.prefix.as_str()).unwrap_or(&r.key)),
                    key: r.key,
                };
                self.warnings.push(ig.warning(&wp));
                self.ignored.push(ig);
            } else {
                self.replacements.push(r);
            }
        }
    }

    /// Whether the PEFT that saved this adapter (its `peft_version`: 0.20 or later) merges its BAT
    /// blocks as W + delta rounded once, where PEFT 0.18.1 rounds the delta to the weight's dtype
    /// first (f16/bf16 weights only; bone-tool's `--rounding once`).
    pub fn saved_rounding_bat_once(&self) -> bool {
        self.config.variant == Variant::Bat && self.config.saved_by().is_some_and(|v| v >= (0, 20))
    }

    /// [`DEFAULT_PREFIX`] and the outer module the adapter's keys all lie under, where `base` is
    /// a bare backbone that stores their tensors without it ([`Adapter::for_base`]): no block's
    /// tensor is found under its own name (nor a vision-language model's renames), and every
    /// block's is found without the module.
    fn backbone_prefix(&self, base: &Model) -> Option<String> {
        if self.prefix != DEFAULT_PREFIX || BACKBONES.iter().any(|p| base.has_prefix(p)) {
            return None;
        }
        let blocks: Vec<&Block> = self.blocks.iter().chain(&self.untargeted).collect();
        if blocks.is_empty() || blocks.iter().any(|b| base.stored_name(&b.tensor).is_some()) {
            return None;
        }
        let modules: Vec<&str> = blocks
            .iter()
            .map(|b| b.module.as_str())
            .chain(self.replacements.iter().map(|r| r.target.as_str()))
            .collect();
        let outer = BACKBONES.iter().find(|p| modules.iter().all(|m| m.starts_with(*p)))?;
        let found = blocks.iter().all(|b| base.has(&format!("{}.weight", &b.module[outer.len()..])));
        found.then(|| format!("{DEFAULT_PREFIX}{outer}"))
    }

    /// Sort the file's tensors into blocks, replacements and ignored keys, and check each block's
    /// shape against the config (the checks that need no base model).
    fn classify(&mut self) -> Result<()> {
        let prefix = self.prefix.clone();
        let prefix = prefix.as_str();
        let pt = self.config.peft_type;
        let other = if pt == PeftType::Bone { PeftType::Miss } else { PeftType::Bone };
        let wp = self.file.path.display().to_string();
        // ignored without a warning: what PEFT itself saves and does not merge
        let mut expected: Vec<Ignored> = vec![];
        if self.file.tensors.is_empty() {
            return Err(input(format!("{wp}: holds no tensors at all{UNGATHERED}")));
        }
        if let Some(empty) = self.file.tensors.iter().find(|t| t.shape.contains(&0)) {
            return Err(input(format!("{wp}: tensor {:?} is empty (shape {:?}){UNGATHERED}", empty.name, empty.shape)));
        }
        for entry in self.file.tensors.clone() {
            let key = entry.name.clone();
            if let Some(path) = key.strip_suffix(pt.block_suffix()) {
                let module = path.strip_prefix(prefix).unwrap_or(path).to_string();
                let block = Block::new(key, module, entry);
                self.check_block_shape(&block)?;
                self.blocks.push(block);
            } else if key.ends_with(other.block_suffix()) {
                return Err(input(format!(
                    "{wp}: tensor {key:?} is a {} block, but adapter_config.json says peft_type {:?}",
                    other.name(),
                    pt.name()
                )));
            } else if key.contains(".bone_block.") || key.contains(".miss_block.") {
                self.ignored.push(Ignored {
                    key,
                    reason: "another adapter's block (PEFT <= 0.19 saved it under this adapter's name)".into(),
                });
            } else if key.contains("bone_") || key.contains("miss_") {
                self.ignored.push(Ignored { key, reason: "a Bone/MiSS tensor that is not a block".into() });
            } else if key.contains(".original_module.") {
                // PEFT saves a ModulesToSaveWrapper's whole state for the embedding layers when the
                // vocabulary was resized (save_embedding_layers): its original module is the base
                // as trained on, which the merge discards for the copy
                let reason = "the base layer inside PEFT's modules_to_save wrapper (saved with a resized vocabulary): \
                              the merge takes the trained copy";
                expected.push(Ignored { key, reason: reason.into() });
            } else if key.contains(".modules_to_save.")
                && self.file.get(&key.replace(".modules_to_save.", ".")).is_some()
            {
                let reason =
                    "the trained copy inside PEFT's modules_to_save wrapper (saved with a resized vocabulary), \
                              the same as the module's own key";
                expected.push(Ignored { key, reason: reason.into() });
            } else {
                let stripped = key.strip_prefix(prefix).unwrap_or(&key);
                let target = stripped.replace(".base_layer.", ".").replace(".modules_to_save.", ".");
                let base_layer = stripped != target;
                self.replacements.push(Replacement { key, target, entry, base_layer });
            }
        }
        let found = self.blocks.len();
        let bare: Vec<&str> = self.blocks.iter().map(|b| b.key.as_str()).filter(|k| !k.starts_with(prefix)).collect();
        if let (Some(first), true) = (bare.first(), prefix == DEFAULT_PREFIX) {
            self.warnings.push(format!(
                "{wp}: {} of its {found} blocks lack PeftModel's prefix {DEFAULT_PREFIX:?} (e.g. {first:?}; not a file \
                 PEFT's save_pretrained wrote): read as the module paths they name, as transformers' load_adapter \
                 reads them; PeftModel.from_pretrained would not load them and would merge its initial blocks instead",
                bare.len()
            ));
        }
        let mut regexes = Regexes::default();
        let (blocks, untargeted) = std::mem::take(&mut self.blocks).into_iter().partition(|b| {
            self.targets(b.key.strip_suffix(pt.block_suffix()).unwrap_or(&b.key), &mut regexes) != Some(false)
        });
        (self.blocks, self.untargeted) = (blocks, untargeted);
        // A module's saved base weight (`<module>.base_layer.weight`) is loaded only into the layer
        // PEFT wraps that module in: not for a module the config does not target. And the other
        // way round: a targeted module's own tensors lie under `.base_layer.` once PEFT has wrapped
        // it, so a key without it (`<module>.bias`, as hand-made files hold) loads into nothing.
        for r in std::mem::take(&mut self.replacements) {
            let module = r.target.rsplit_once('.').map_or(r.target.as_str(), |(m, _)| m);
            let in_file = r.key.replace(".base_layer.", ".");
            let in_file = in_file.rsplit_once('.').map_or(in_file.as_str(), |(m, _)| m);
            let targeted = self.targets(in_file, &mut regexes);
            if r.base_layer && targeted == Some(false) {
                let reason = format!(
                    "the base weight of {module:?}, a module adapter_config.json does not target: PEFT does not load it"
                );
                self.ignored.push(Ignored { key: r.key, reason });
            } else if !r.base_layer && !self.config.all_linear() && targeted == Some(true) {
                // ("all-linear" wraps the Linear layers, which only the base tells: Adapter::for_base)
                self.ignored.push(Ignored { key: r.key, reason: wrapped_reason(&r.target) });
            } else {
                self.replacements.push(r);
            }
        }
        for ig in &self.ignored {
            self.warnings.push(ig.warning(&wp));
        }
        // PEFT trains biases with bias "all" or "<type>_only", but saves only the blocks (and
        // modules_to_save): the trained biases are lost, and its merge keeps the base's
        if self.config.bias != "none" && !self.replacements.iter().any(|r| r.target.ends_with(".bias")) {
            self.warnings.push(format!(
                "{}: bias {:?}: PEFT trains the biases with it but saves none of them (only the {:?} tensors), \
                 so this adapter holds no trained bias; the merge keeps the base's biases, as PEFT's does",
                self.dir.join(CONFIG_NAME).display(),
                self.config.bias,
                &pt.block_suffix()[1..]
            ));
        }
        self.ignored.append(&mut expected);
        if let Some(first) = self.untargeted.first() {
            let n = self.untargeted.len();
            let count = match (n == found, n) {
                (true, 1) => "its only block".to_string(),
                (true, _) => format!("all {n} of its blocks"),
                (false, _) => format!("{n} of its {found} blocks"),
            };
            let on = if n == 1 { "is on a module" } else { "are on modules" };
            let rules = if self.config.all_linear() {
                "\"all-linear\" takes every linear layer but the output layer; exclude_modules"
            } else {
                "target_modules, layers_to_transform, exclude_modules"
            };
            let what =
                format!("{count} {on} that adapter_config.json does not target ({rules}), e.g. {:?}", first.module);
            if self.blocks.is_empty() && self.replacements.is_empty() {
                return Err(input(format!(
                    "{wp}: {what}: PEFT loads none of them, so there is nothing to apply; \
                     make adapter_config.json name the modules the blocks are for"
                )));
            }
            self.warnings.push(format!(
                "{wp}: {what}: PEFT does not load those, so merge and unmerge leave them out as PEFT \
                 does (convert keeps them); make adapter_config.json name them to apply them"
            ));
        }
        if self.blocks.is_empty() && self.replacements.is_empty() {
            return Err(input(format!("{wp}: holds no {} blocks (keys ending in {:?})", pt.name(), pt.block_suffix())));
        }
        Ok(())
    }

    /// Whether PEFT targets the module at `path_in_file` (a key without its suffix), asking the
    /// config about PEFT's name for it ([`peft_path`]).
    fn targets(&self, path_in_file: &str, regexes: &mut Regexes) -> Option<bool> {
        self.config.peft_targets_with(peft_path(path_in_file), regexes)
    }

    /// Find each block's and replacement's base tensor under the name the base stores it by
    /// ([`Model::stored_name`]): a vision-language model's checkpoint names its tensors otherwise
    /// than the modules PEFT wraps (`language_model.model.layers.0…` for
    /// `model.language_model.layers.0…`). A tensor found under neither name keeps its own, for the
    /// checks to report.
    pub fn locate(&mut self, base: &Model) {
        let mut used = vec![];
        let mut find = |name: &mut String| {
            if let Some((stored, Some(rename))) = base.stored_name(name) {
                *name = stored;
                if !used.contains(&rename) {
                    used.push(rename);
                }
            }
        };
        for b in self.blocks.iter_mut().chain(&mut self.untargeted) {
            find(&mut b.tensor);
        }
        for r in &mut self.replacements {
            find(&mut r.target);
        }
        // A rename that a block needed tells the checkpoint's layout, and the adapter's: the other
        // renames of that direction that the base's names call for hold as well, for the modules
        // without a block (a vision tower whose only block was taken out)
        // transformers 5's renames for the base's architecture first: the others that the base's
        // names call for
        let transformers5 = base.transformers5_renames();
        if used.iter().any(|u| transformers5.contains(u)) {
            for &(module, stored) in transformers5 {
                let stores = || base.tensor_names().any(|t| crate::model::rewrite(t, stored, module).is_some());
                if !used.contains(&(module, stored)) && stores() {
                    used.push((module, stored));
                }
            }
        }
        // then the older ones, where no rename of that module prefix holds already
        let renames = crate::model::CHECKPOINT_RENAMES;
        for forward in [true, false] {
            let this_way = |&(m, s): &(&str, &str)| renames.contains(&if forward { (m, s) } else { (s, m) });
            if !used.iter().any(this_way) {
                continue;
            }
            for &(m, s) in renames {
                let (module, stored) = if forward { (m, s) } else { (s, m) };
                let known = used.iter().any(|&(u, _)| u == module);
                if base.has_prefix(stored) && !base.has_prefix(module) && !known {
                    used.push((module, stored));
                }
            }
        }
        // No block told the layout (none needed a rename, and none is under a prefix that one
        // would have renamed: blocks on `lm_head` alone, say) on a vision-language checkpoint in
        // the older layout: take the module paths of transformers 4.52 and later, by which PEFT
        // there targets the modules without a block
        let applies = |&&(m, s): &&(&str, &str)| base.has_prefix(s) && !base.has_prefix(m);
        let vision_language = renames.iter().filter(applies).any(|&(_, s)| s != "model.");
        if used.is_empty() && vision_language {
            let tensors = self.blocks.iter().chain(&self.untargeted).map(|b| &b.tensor);
            let mut tensors = tensors.chain(self.replacements.iter().map(|r| &r.target));
            if !tensors.any(|t| renames.iter().filter(applies).any(|&(_, s)| t.starts_with(s))) {
                for &(module, stored) in renames.iter().filter(applies) {
                    if !used.iter().any(|&(u, _)| u == module) {
                        used.push((module, stored));
                    }
                }
            }
        }
        // the most particular stored prefix first, for peft_module
        used.sort_by_key(|(_, stored)| std::cmp::Reverse(stored.len()));
        self.renames = used;
    }

    /// The renames [`Adapter::locate`] found the base's tensors by, and those that the base's
    /// layout implies with them: (module prefix, stored prefix).
    pub fn renames(&self) -> &[(&'static str, &'static str)] {
        &self.renames
    }

    /// The module path of the base module stored as `stored` (a tensor name without `.weight`):
    /// [`Adapter::locate`]'s renames undone.
    fn peft_module(&self, stored: &str) -> String {
        self.renames
            .iter()
            .find_map(|(module, prefix)| crate::model::rewrite(stored, prefix, module))
            .unwrap_or_else(|| stored.to_string())
    }

    /// Whether PEFT targets the base module stored as `module` (a base tensor's name without
    /// `.weight`), the module that a block keyed `<prefix><module>` would change.
    pub fn targets_base_module(&self, module: &str, regexes: &mut Regexes) -> Option<bool> {
        self.targets(&format!("{}{}", self.prefix, self.peft_module(module)), regexes)
    }

    /// The base's modules (tensor names without `.weight`, sorted) that adapter_config.json
    /// targets but that have no block in the file. PEFT builds its layer there all the same, warns
    /// "Found missing adapter keys", and merges the layer's initial block: zeros
    /// ([`Adapter::zero_blocks`]), or random values when `init_weights` is false. Either way the
    /// adapter was likely made for another model or config. Modules that transformers does not load
    /// ([`Model::never_loaded`], multi-token-prediction layers) have no PEFT layer: not listed.
    pub fn modules_without_blocks(&self, base: &Model) -> Vec<String> {
        let have: std::collections::HashSet<&str> =
            self.blocks.iter().chain(&self.untargeted).filter_map(|b| b.tensor.strip_suffix(".weight")).collect();
        let mut regexes = Regexes::default();
        // (a tied model's output layer is a module too, though the checkpoint stores only the embedding)
        let tied_head = base.head_alias.is_some().then(|| base.head());
        let mut missing: Vec<String> = base
            .tensor_names()
            .chain(tied_head)
            .filter_map(|name| Some((name.strip_suffix(".weight")?, base.tensor(name)?.1)))
            .filter(|(module, e)| e.shape.len() == 2 && !have.contains(module) && !base.never_loaded(module))
            .filter(|(module, _)| self.targets_base_module(module, &mut regexes) == Some(true))
            .map(|(module, _)| module.to_string())
            .collect();
        missing.sort_unstable();
        missing
    }

    /// PEFT's initial blocks, zeros, on the `missing` modules ([`Adapter::modules_without_blocks`]):
    /// blocks of the variant's shape with no bytes ([`TensorEntry::zeros`]), to be checked and
    /// applied as the file's blocks are. None for `init_weights` false, whose initial blocks are
    /// random in PEFT and cannot be reproduced.
    pub fn zero_blocks(&self, base: &Model, missing: &[String]) -> Vec<Block> {
        if self.config.init_weights == serde_json::Value::Bool(false) {
            return vec![];
        }
        let c = &self.config;
        missing
            .iter()
            .filter_map(|module| {
                let o = *base.tensor(&format!("{module}.weight"))?.1.shape.first()?;
                let shape = match c.variant {
                    Variant::Default => vec![c.r, o],
                    Variant::Mini => vec![c.r, c.mini_r],
                    Variant::Bat => vec![o / c.r, c.r, c.r],
                };
                let key = format!("(PEFT's initial block of {module}: zeros)");
                let mut block = Block::new(key.clone(), self.peft_module(module), TensorEntry::zeros(key, shape));
                block.tensor = format!("{module}.weight");
                Some(block)
            })
            .collect()
    }

    /// The warning about the `missing` modules ([`Adapter::modules_without_blocks`]), if any.
    pub fn missing_blocks_warning(&self, missing: &[String]) -> Option<String> {
        let stored = missing.first()?;
        let module = self.peft_module(stored);
        let first =
            if module == *stored { format!("{stored:?}") } else { format!("{module:?} (stored as {stored:?})") };
        let random = self.config.init_weights == serde_json::Value::Bool(false);
        let (initial, ours) = match (random, missing.len()) {
            (true, 1) => ("random values, as init_weights is false: PEFT's merge adds noise", "leaves it unchanged"),
            (true, _) => ("random values, as init_weights is false: PEFT's merge adds noise", "leaves them unchanged"),
            (false, _) => ("zeros: no change but -0 becoming +0", "does the same"),
        };
        let what = match missing.len() {
            1 => format!(
                "targets {first} of the base, but the adapter has no block for it: PEFT warns of a missing \
                 adapter key and applies its initial block there ({initial}); bone-tool {ours}"
            ),
            n => format!(
                "targets {n} modules of the base that the adapter has no block for, e.g. {first}: PEFT warns \
                 of missing adapter keys and applies its initial blocks there ({initial}); bone-tool {ours}"
            ),
        };
        let question = if self.config.all_linear() {
            "\"all-linear\" takes every linear layer of the base: list the modules the blocks are for in \
             target_modules to leave the others alone"
        } else {
            "Was the adapter made for this base?"
        };
        Some(format!("{}: adapter_config.json {what}. {question}", self.dir.display()))
    }

    fn check_block_shape(&self, b: &Block) -> Result<()> {
        let c = &self.config;
        let s = &b.entry.shape;
        let at = format!("{}: block {:?}", self.file.path.display(), b.key);
        if Float::from_dtype(b.entry.dtype).is_none() {
            return Err(input(format!("{at}: dtype {:?}, expected F32, BF16 or F16", b.entry.dtype)));
        }
        let ok = match c.variant {
            Variant::Default => s.len() == 2 && s[0] == c.r,
            Variant::Mini => s.len() == 2 && s[0] == c.r && s[1] == c.mini_r,
            Variant::Bat => s.len() == 3 && s[1] == c.r && s[2] == c.r,
        };
        if !ok {
            let expected = match c.variant {
                Variant::Default => format!("[r, out_features] = [{}, O]", c.r),
                Variant::Mini => format!("[r, mini_r] = [{}, {}]", c.r, c.mini_r),
                Variant::Bat => format!("[out_features / r, r, r] = [O/{0}, {0}, {0}]", c.r),
            };
            return Err(input(format!(
                "{at}: shape {s:?} does not fit the {} variant with r = {}: expected {expected}",
                c.variant.name(),
                c.r
            )));
        }
        Ok(())
    }

    /// Check one block against the base model: the tensor exists, is a float `[O, I]` matrix, and
    /// the variant's shape and divisibility rules hold. The error names the tensor and what was
    /// expected.
    pub fn check_layer(&self, b: &Block, base: &Model) -> Result<Geometry, String> {
        let c = &self.config;
        let target = b.target();
        let Some((_, w)) = base.tensor(&target) else {
            return Err(missing_target(&b.key, &target, base));
        };
        let weight = Float::from_dtype(w.dtype).ok_or_else(|| {
            let method = quantized(base).map(|m| format!(", quant_method {m:?} in config.json")).unwrap_or_default();
            format!(
                "base tensor {target:?} has dtype {:?}: bone-tool merges into F32, BF16 or F16 weights (quantized bases{method} \
                 are not supported: merge into the original model and quantize after)",
                w.dtype
            )
        })?;
        let block = Float::from_dtype(b.entry.dtype).expect("checked when the adapter was opened");
        if w.shape.len() != 2 {
            return Err(format!("base tensor {target:?} has shape {:?}, expected a Linear weight [out, in]", w.shape));
        }
        if let Some(model_type) = conv1d_model(base, &target) {
            return Err(format!(
                "{target:?} is a Conv1D weight of a {model_type} model, stored [in_features, out_features]: Bone and MiSS \
                 apply to nn.Linear layers only (PEFT refuses to put them on Conv1D too), so this adapter was not made for this base"
            ));
        }
        let layer = target.strip_suffix(".weight").and_then(|m| m.rsplit('.').next()).unwrap_or("");
        if config::EMBEDDING_LAYERS.contains(&layer) {
            return Err(format!(
                "{target:?} is an embedding (nn.Embedding, by its name), not a Linear layer: Bone and MiSS apply to \
                 nn.Linear layers only (PEFT refuses to put them on an embedding), so this adapter was not made for this base"
            ));
        }
        let (o, i) = (w.shape[0], w.shape[1]);
        let s = &b.entry.shape;
        let r = c.r;
        match c.variant {
            Variant::Default if s[1] != o => {
                return Err(format!(
                    "block {:?} has shape {s:?}, but {target:?} is [{o}, {i}]: expected [{r}, {o}] ([r, out_features])",
                    b.key
                ))
            }
            Variant::Mini if o % c.mini_r != 0 => {
                return Err(format!(
                    "{target:?} is [{o}, {i}]: out_features {o} is not a multiple of mini_r {} (mini blocks are tiled along out_features)",
                    c.mini_r
                ))
            }
            Variant::Bat if o % r != 0 || i % r != 0 => {
                return Err(format!(
                    "{target:?} is [{o}, {i}]: BAT needs out_features and in_features to be multiples of r = {r}"
                ))
            }
            Variant::Bat if s[0] * r != o => {
                return Err(format!(
                    "block {:?} has shape {s:?}, but {target:?} is [{o}, {i}]: expected [{}, {r}, {r}] ([out_features / r, r, r])",
                    b.key,
                    o / r
                ))
            }
            _ => {}
        }
        Ok(Geometry { o, i, weight, block })
    }

    /// Check a replacement tensor against the base: the target exists and has the same shape.
    pub fn check_replacement(&self, rep: &Replacement, base: &Model) -> Result<(), String> {
        if let Some((module, _)) = rep.target.rsplit_once('.').filter(|(m, _)| self.config.targets_task_head(m)) {
            return Err(format!(
                "{:?}: the config targets the {} head {module:?}, which PEFT puts in modules_to_save only after it \
                 placed the adapter, and then refuses (\"modules_to_save cannot be applied to modules of type …Linear\"); \
                 list {module:?} in modules_to_save, as the configs PEFT saves do",
                rep.key,
                self.config.task_type.as_deref().unwrap_or_default()
            ));
        }
        let Some((_, w)) = base.tensor(&rep.target) else {
            let task = self.config.task_type.as_deref();
            if let (Some(_), Some(suffix)) = (classifier_head(&rep.target), config::task_class_suffix(task)) {
                let why = match base.architecture().and_then(|a| a.strip_suffix("ForCausalLM")) {
                    // (a merge takes it as new: only an unmerge gets here)
                    Some(family) => format!(
                        "a merge into this {family}ForCausalLM adds it, making a {family}{suffix}; an unmerge takes \
                         the merged {family}{suffix}, which has it"
                    ),
                    None => format!(
                        "a merge adds it, making the task model as PEFT's merge does, only to a base whose config.json \
                         names its …ForCausalLM class in \"architectures\" (this one's: {}); else save the task model \
                         once with transformers (AutoModelFor{}.from_pretrained(base, num_labels=N).save_pretrained(dir)) \
                         and merge into that",
                        base.architecture().map_or("none".to_string(), |a| format!("{a:?}")),
                        suffix.trim_start_matches("For"),
                    ),
                };
                return Err(format!(
                    "adapter tensor {:?}: the base has no tensor {:?}, the classifier head of this {} adapter: {why}",
                    rep.key,
                    rep.target,
                    task.unwrap_or_default(),
                ));
            }
            return Err(missing_target(&rep.key, &rep.target, base));
        };
        if w.shape != rep.entry.shape {
            return Err(format!(
                "{:?} would replace {:?} of shape {:?} with shape {:?}: bone-tool keeps the base's shapes but for a vocabulary \
                 resized before training (rows of the input embedding and output layer, merging)",
                rep.key, rep.target, w.shape, rep.entry.shape
            ));
        }
        if Float::from_dtype(w.dtype).is_none() && w.dtype != rep.entry.dtype {
            return Err(format!(
                "{:?} has dtype {:?}, but the base tensor {:?} is {:?}",
                rep.key, rep.entry.dtype, rep.target, w.dtype
            ));
        }
        if Float::from_dtype(w.dtype).is_some() && Float::from_dtype(rep.entry.dtype).is_none() {
            return Err(format!("{:?} has dtype {:?}, expected F32, BF16 or F16", rep.key, rep.entry.dtype));
        }
        Ok(())
    }

    /// The task model a merge makes where `rep` is the classifier head (`score` or `classifier`,
    /// weight or bias) of an adapter trained for sequence or token classification (task_type
    /// SEQ_CLS or TOKEN_CLS, the head kept in modules_to_save) on the backbone of a causal LM
    /// whose checkpoint has no such head: as PEFT's merge of it is saved, the class named after
    /// the base's (`LlamaForCausalLM` → `LlamaForSequenceClassification`), with the adapter's
    /// head and no output layer. None otherwise.
    pub fn new_head_class(&self, rep: &Replacement, base: &Model) -> Option<String> {
        if rep.base_layer || base.has(&rep.target) {
            return None;
        }
        let suffix = config::task_class_suffix(self.config.task_type.as_deref())?;
        if self.config.targets_task_head(classifier_head(&rep.target)?) {
            return None;
        }
        let family = base.architecture()?.strip_suffix("ForCausalLM")?;
        Some(format!("{family}{suffix}"))
    }

    /// The number of rows the vocabulary is resized to where `rep` is a copy of the base's input
    /// embedding or stored output layer (modules_to_save) with other rows and the same columns:
    /// an adapter trained on the base after `resize_token_embeddings(N)` (tokens added), which
    /// PEFT loads only onto the base resized the same way, and whose merge holds the adapter's
    /// copies. None otherwise.
    pub fn resized_vocab(&self, rep: &Replacement, base: &Model) -> Option<usize> {
        let (_, w) = base.tensor(&rep.target)?;
        // (a tied model's head: its copy, which PEFT saves beside the embedding's)
        let tied_head = base.head_alias.is_some() && rep.target == base.head();
        let vocab = base.vocab_tensors().contains(&rep.target) || tied_head;
        let (new, old) = (&rep.entry.shape, &w.shape);
        let resized = !new.is_empty() && new.len() == old.len() && new[1..] == old[1..] && new[0] != old[0];
        (vocab && resized && !rep.base_layer).then(|| new[0])
    }

    /// Elements in all blocks.
    pub fn num_parameters(&self) -> usize {
        self.blocks.iter().map(|b| b.entry.numel()).sum()
    }
}

/// The classifier head a tensor name belongs to: `score` or `classifier` at the top of the model
/// (`score.weight`, `classifier.bias`), where transformers' sequence and token classifiers built
/// on a language model's backbone keep it.
fn classifier_head(target: &str) -> Option<&str> {
    let (module, _) = target.rsplit_once('.')?;
    matches!(module, "score" | "classifier").then_some(module)
}

/// The model types whose transformers classes use GPT-2's `Conv1D` (a weight stored [in, out]) for
/// these layers: a block there would be added along the wrong axis (silently, where in = out).
const CONV1D_MODELS: [&str; 5] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"];
const CONV1D_LAYERS: [&str; 4] = ["c_attn", "c_fc", "c_proj", "q_attn"];

/// The base's model_type when `target` is one of its Conv1D weights.
fn conv1d_model<'a>(base: &'a Model, target: &str) -> Option<&'a str> {
    let model_type = base.config.as_ref()?.get("model_type")?.as_str()?;
    let layer = target.strip_suffix(".weight")?.rsplit('.').next()?;
    (CONV1D_MODELS.contains(&model_type) && CONV1D_LAYERS.contains(&layer)).then_some(model_type)
}

/// The base's quantization method, when its config.json has a `quantization_config` ("gptq",
/// "awq", "bitsandbytes", "fp8", "compressed-tensors", …; "unknown" when it names none).
fn quantized(base: &Model) -> Option<String> {
    let q = base.config.as_ref()?.get("quantization_config").filter(|q| !q.is_null())?;
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown");
    Some(method.to_string())
}

/// Explain a key whose base tensor does not exist, suggesting a prefix when one would fix it.
fn missing_target(key: &str, target: &str, base: &Model) -> String {
    let mut msg = format!("adapter tensor {key:?}: the base has no tensor {target:?}");
    // Would stripping more leading segments of the key, or adding "model.", find it?
    let segments: Vec<&str> = key.split('.').collect();
    let tail = target.rsplit('.').next().unwrap_or("weight");
    let module_len = segments.len() - 1; // drop the block suffix or "weight"
    for cut in 0..module_len {
        let candidate = format!("{}.{tail}", segments[cut..module_len].join("."));
        if candidate != target && base.has(&candidate) {
            let prefix = if cut == 0 { String::new() } else { format!("{}.", segments[..cut].join(".")) };
            msg.push_str(&format!("; with --adapter-prefix {prefix:?} it would match {candidate:?}"));
            return msg;
        }
    }
    if target == base.head() && base.has("shared.weight") && base.ties_embeddings() != Some(false) {
        // T5's layout: lm_head, encoder.embed_tokens and decoder.embed_tokens all read `shared`
        msg.push_str(
            ": it ties lm_head to \"shared.weight\" (T5's layout), which bone-tool does not untie: a tied T5 scales \
             the decoder's output by d_model^-0.5 before lm_head and an untied one does not, so an untied merged head \
             would change the model's outputs; leave lm_head out of the adapter's targets",
        );
        return msg;
    }
    if target == base.head() && base.is_bare_backbone() {
        msg.push_str(
            ": the base is a bare backbone (saved without an outer module such as \"model.\", as the model without its \
             head saves it), which has no output layer; merge into the model saved with its head (…ForCausalLM)",
        );
        return msg;
    }
    if let Some(method) = quantized(base) {
        // GPTQ/AWQ keep a layer as "<module>.qweight", compressed-tensors as "<module>.weight_packed"
        let module = target.strip_suffix(".weight").unwrap_or(target);
        let mut stored: Vec<&str> =
            base.tensor_names().filter(|n| n.strip_prefix(module).is_some_and(|t| t.starts_with('.'))).collect();
        stored.sort_unstable();
        stored.truncate(3);
        let stored = if stored.is_empty() { String::new() } else { format!(", which stores this layer as {stored:?}") };
        msg.push_str(&format!(
            "; the base is quantized (config.json: quantization_config, quant_method {method:?}){stored}: bone-tool \
             merges into unquantized F32, BF16 or F16 weights only, so merge into the original model and quantize after"
        ));
    } else if base.has(&format!("model.{target}")) {
        msg.push_str(&format!(
            "; the base has \"model.{target}\": was the adapter made for a model wrapped differently?"
        ));
    } else {
        msg.push_str(" (was the adapter made for another base model?)");
    }
    msg
}

/// The subfolders of `dir` that are adapter folders (they hold adapter_config.json), sorted.
fn adapters_inside(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut found: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join(CONFIG_NAME).is_file()).collect();
    found.sort();
    found
}
