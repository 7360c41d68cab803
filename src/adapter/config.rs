//! `adapter_config.json` of a Bone or MiSS adapter.

use crate::error::{input, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftType {
    Bone,
    Miss,
}

impl PeftType {
    pub fn name(self) -> &'static str {
        match self {
            PeftType::Bone => "BONE",
            PeftType::Miss => "MISS",
        }
    }

    /// The suffix of a block's key in the safetensors file.
    pub fn block_suffix(self) -> &'static str {
        match self {
            PeftType::Bone => ".bone_block",
            PeftType::Miss => ".miss_block",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `init_weights` true or false: block `[r, O]`, added periodically along the input axis.
    Default,
    /// `init_weights: "bat"`: block `[O/r, r, r]`, `W_ij·(I + B_i) + B_i`.
    Bat,
    /// MiSS `init_weights: "mini"`: block `[r, mini_r]`, tiled along the output axis.
    Mini,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Default => "default",
            Variant::Bat => "bat",
            Variant::Mini => "mini",
        }
    }
}

#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub peft_type: PeftType,
    pub variant: Variant,
    pub r: usize,
    pub mini_r: usize,
    pub init_weights: Value,
    pub target_modules: Value,
    /// The config's list, and the classifier heads PEFT adds for the task type
    /// ([`task_modules_to_save`]).
    pub modules_to_save: Vec<String>,
    pub layers_to_transform: Value,
    pub base_model_name_or_path: Option<String>,
    pub peft_version: Option<String>,
    pub task_type: Option<String>,
    pub bias: String,
    /// The file as read.
    pub raw: Value,
}

/// Keys PEFT writes for every config, and those of BoneConfig / MissConfig.
const COMMON_KEYS: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "r",
    "init_weights",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "modules_to_save",
];
const MISS_KEYS: &[&str] = &["mini_r", "miss_dropout"];

/// PEFT 0.18.1's target modules by `model_type` for a config without `target_modules`
/// (`TRANSFORMERS_MODELS_TO_BONE_TARGET_MODULES_MAPPING`, the same for MiSS; a copy of LoRA's);
/// a model type not listed makes PEFT refuse the config.
/// `fixtures/peft-default-targets.json` holds PEFT's own table, which a test compares.
const PEFT_DEFAULT_TARGETS: &[(&str, &[&str])] = &[
    ("t5", &["q", "v"]),
    ("mt5", &["q", "v"]),
    ("bart", &["q_proj", "v_proj"]),
    ("gpt2", &["c_attn"]),
    ("bloom", &["query_key_value"]),
    ("blip-2", &["q", "v", "q_proj", "v_proj"]),
    ("opt", &["q_proj", "v_proj"]),
    ("gptj", &["q_proj", "v_proj"]),
    ("gpt_neox", &["query_key_value"]),
    ("gpt_neo", &["q_proj", "v_proj"]),
    ("bert", &["query", "value"]),
    ("roberta", &["query", "value"]),
    ("xlm-roberta", &["query", "value"]),
    ("electra", &["query", "value"]),
    ("deberta-v2", &["query_proj", "value_proj"]),
    ("deberta", &["in_proj"]),
    ("layoutlm", &["query", "value"]),
    ("llama", &["q_proj", "v_proj"]),
    ("llama4", &["q_proj", "v_proj"]),
    ("chatglm", &["query_key_value"]),
    ("gpt_bigcode", &["c_attn"]),
    ("mpt", &["Wqkv"]),
    ("RefinedWebModel", &["query_key_value"]),
    ("RefinedWeb", &["query_key_value"]),
    ("falcon", &["query_key_value"]),
    ("btlm", &["c_proj", "c_attn"]),
    ("codegen", &["qkv_proj"]),
    ("mistral", &["q_proj", "v_proj"]),
    ("mixtral", &["q_proj", "v_proj"]),
    ("stablelm", &["q_proj", "v_proj"]),
    ("phi", &["q_proj", "v_proj", "fc1", "fc2"]),
    ("gemma", &["q_proj", "v_proj"]),
    ("gemma2", &["q_proj", "v_proj"]),
    ("gemma3_text", &["q_proj", "v_proj"]),
    ("qwen2", &["q_proj", "v_proj"]),
    ("qwen3", &["q_proj", "v_proj"]),
    ("rwkv", &["key", "value", "receptance", "output"]),
    ("rwkv7", &["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"]),
];

/// From how many distinct entries PEFT shortens a target_modules list
/// (`MIN_TARGET_MODULES_FOR_OPTIMIZATION`; [`AdapterConfig::shorten_targets`]).
const MIN_TARGETS_SHORTENED: usize = 20;

/// PEFT 0.18.1's `_find_minimal_target_modules`: for each target (in the order of their suffix
/// lists, shortest suffix first), its shortest suffix that no other module's path ends in, unless
/// a suffix already chosen covers it; the targets themselves if that leaves none.
fn minimal_suffixes(targets: &BTreeSet<String>, others: &[String]) -> Vec<String> {
    use std::collections::HashSet;
    // the suffixes of a dotted path, the last part first, the whole path last
    fn suffixes(s: &str) -> Vec<String> {
        let parts: Vec<&str> = s.split('.').collect();
        (0..parts.len()).rev().map(|i| parts[i..].join(".")).collect()
    }
    let other_suffixes: HashSet<String> = others.iter().flat_map(|o| suffixes(o)).collect();
    let mut items: Vec<(&String, Vec<String>)> = targets.iter().map(|t| (t, suffixes(t))).collect();
    items.sort_by(|a, b| a.1.cmp(&b.1));
    let mut required: Vec<String> = vec![];
    for (item, sufs) in items {
        for suffix in sufs {
            if required.contains(&suffix) || other_suffixes.contains(&suffix) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.push(suffix);
                break;
            }
        }
    }
    if required.is_empty() {
        return targets.iter().cloned().collect();
    }
    required.sort();
    required
}

/// The last part of the module paths of the embeddings, which are no `nn.Linear` though their
/// weights are 2-D like one: the input embeddings of the families bone-tool knows, the learned
/// position embeddings of GPT-2, OPT and the vision towers, BERT-style token types. PEFT puts no
/// Bone/MiSS layer on them ("only `torch.nn.Linear` is supported") and "all-linear" leaves them out.
pub const EMBEDDING_LAYERS: &[&str] = &[
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "wpe",
    "embed_positions",
    "position_embedding",
    "position_embeddings",
    "token_type_embeddings",
];

/// The output layer, which "all-linear" leaves out too: PEFT finds it as
/// `get_output_embeddings()` (`lm_head`; GPT-NeoX's `embed_out`).
const OUTPUT_LAYERS: &[&str] = &["lm_head", "embed_out"];

/// The modules PEFT adds to `modules_to_save` for a task type before it puts the adapter on the
/// model (`PeftModelForSequenceClassification`: the classifier heads `classifier` and `score`), so
/// that no block goes on them, whatever target_modules says ("all-linear" included). PEFT saves
/// the longer list, so only a config written by hand lacks them.
fn task_modules_to_save(task_type: Option<&str>) -> &'static [&'static str] {
    match task_type {
        Some("SEQ_CLS") => &["classifier", "score"],
        _ => &[],
    }
}

/// The heads PEFT adds to `modules_to_save` only after it put the adapter on the model
/// (`PeftModelForTokenClassification`: `classifier` and `score`; `…ForQuestionAnswering`:
/// `qa_outputs`): a config that targets one of them (and does not list it in modules_to_save, as
/// the configs PEFT saves do) gets a block there, and then PEFT refuses to keep that layer in
/// modules_to_save ([`AdapterConfig::targets_task_head`]).
fn task_heads_added_after(task_type: Option<&str>) -> &'static [&'static str] {
    match task_type {
        Some("TOKEN_CLS") => &["classifier", "score"],
        Some("QUESTION_ANS") => &["qa_outputs"],
        _ => &[],
    }
}

/// The transformers class suffix of the task model PEFT's task class wraps for a task type whose
/// classifier head (`score` or `classifier`, kept in modules_to_save) sits on a language model's
/// backbone: `LlamaForCausalLM`'s backbone under a new `score` is `LlamaForSequenceClassification`.
pub fn task_class_suffix(task_type: Option<&str>) -> Option<&'static str> {
    match task_type {
        Some("SEQ_CLS") => Some("ForSequenceClassification"),
        Some("TOKEN_CLS") => Some("ForTokenClassification"),
        _ => None,
    }
}

/// Whether a target_modules value is "all-linear" (PEFT compares it lowercased).
pub fn is_all_linear(target_modules: &Value) -> bool {
    target_modules.as_str().is_some_and(|s| s.eq_ignore_ascii_case("all-linear"))
}

/// Whether PEFT's "all-linear" takes the module `module` (a path in the base model that holds a
/// 2-D weight): `_maybe_include_all_linear_layers` replaces "all-linear" with the full path of
/// every `nn.Linear` (and GPT-2's `Conv1D`) but the output layer, which then match exactly.
/// bone-tool sees names, not module types: [`EMBEDDING_LAYERS`] are the 2-D weights that are not
/// Linear, [`OUTPUT_LAYERS`] the head.
fn all_linear_takes(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    !OUTPUT_LAYERS.contains(&last) && !EMBEDDING_LAYERS.contains(&last)
}

impl AdapterConfig {
    /// Parse and check `adapter_config.json`; unknown keys become warnings.
    pub fn parse(path: &Path, text: &str, warnings: &mut Vec<String>) -> Result<AdapterConfig> {
        let p = path.display();
        let raw: Value = serde_json::from_str(text).map_err(|e| input(format!("{p}: not valid JSON: {e}")))?;
        let obj = raw.as_object().ok_or_else(|| input(format!("{p}: expected a JSON object")))?;
        let peft_type = match obj.get("peft_type") {
            Some(Value::String(s)) if s == "BONE" => PeftType::Bone,
            Some(Value::String(s)) if s == "MISS" => PeftType::Miss,
            Some(Value::String(s)) => {
                return Err(input(format!(
                    "{p}: peft_type is {s:?}: bone-tool handles Bone and MiSS adapters only (peft_type \"BONE\" or \"MISS\")"
                )))
            }
            Some(other) => return Err(input(format!("{p}: peft_type must be the string \"BONE\" or \"MISS\", found {other}"))),
            None => return Err(input(format!("{p}: no peft_type (expected \"BONE\" or \"MISS\")"))),
        };
        let positive = |key: &str, default: usize| -> Result<usize> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| input(format!("{p}: {key} must be a positive integer, found {v}"))),
            }
        };
        let r = positive("r", 64)?;
        let mini_r = if peft_type == PeftType::Miss { positive("mini_r", 1)? } else { 1 };
        let init_weights = obj.get("init_weights").cloned().unwrap_or(Value::Bool(true));
        let variant = match (&init_weights, peft_type) {
            (Value::Bool(_), _) => Variant::Default,
            (Value::String(s), _) if s == "bat" => Variant::Bat,
            (Value::String(s), PeftType::Miss) if s == "mini" => Variant::Mini,
            (Value::String(s), PeftType::Bone) if s == "mini" => {
                return Err(input(format!(
                    "{p}: init_weights \"mini\" exists only for MiSS (peft_type \"MISS\"), not Bone"
                )))
            }
            (other, _) => {
                let allowed = if peft_type == PeftType::Miss {
                    "true, false, \"bat\" or \"mini\""
                } else {
                    "true, false or \"bat\""
                };
                return Err(input(format!("{p}: init_weights must be {allowed}, found {other}")));
            }
        };
        let modules_to_save = match obj.get("modules_to_save") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| input(format!("{p}: modules_to_save must list strings")))
                })
                .collect::<Result<_>>()?,
            Some(v) => return Err(input(format!("{p}: modules_to_save must be a list or null, found {v}"))),
        };
        // BoneConfig and MissConfig refuse these (`__post_init__`): PEFT cannot load such a config
        if let Some(Value::String(t)) = obj.get("target_modules") {
            for key in ["layers_to_transform", "layers_pattern"] {
                if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                    return Err(input(format!(
                        "{p}: {key} is {v} while target_modules is the string {t:?}: PEFT refuses this config \
                         (\"`{key}` cannot be used when `target_modules` is a str\"); set {key} to null, or list \
                         the target modules"
                    )));
                }
            }
        }
        let string = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
        let mut modules_to_save = modules_to_save;
        for m in task_modules_to_save(string("task_type").as_deref()) {
            if !modules_to_save.iter().any(|s| s == m) {
                modules_to_save.push(m.to_string());
            }
        }
        for key in obj.keys() {
            let known = COMMON_KEYS.contains(&key.as_str())
                || (peft_type == PeftType::Miss && MISS_KEYS.contains(&key.as_str()));
            if !known {
                warnings.push(format!("{p}: unknown key {key:?} ignored"));
            }
        }
        Ok(AdapterConfig {
            peft_type,
            variant,
            r,
            mini_r,
            init_weights,
            target_modules: obj.get("target_modules").cloned().unwrap_or(Value::Null),
            modules_to_save,
            layers_to_transform: obj.get("layers_to_transform").cloned().unwrap_or(Value::Null),
            base_model_name_or_path: string("base_model_name_or_path"),
            peft_version: string("peft_version"),
            task_type: string("task_type"),
            bias: string("bias").unwrap_or_else(|| "none".to_string()),
            raw,
        })
    }
}

impl AdapterConfig {
    /// Whether PEFT 0.18.1 puts this adapter on the module `module` (a path in the base model,
    /// `model.layers.0.self_attn.q_proj`) when it loads it, decided as its
    /// `check_target_module_exists` decides: not when `exclude_modules` names it (a list: the whole
    /// path or its last parts; a string: a regex matching all of it) or a `modules_to_save` entry
    /// matches it; else when `target_modules` names it (a list, as above, and then with
    /// `layers_to_transform` only if its layer index, found by `layers_pattern`, is one of those;
    /// a string: a regex matching all of it, layers not consulted). PEFT loads no block for a
    /// module it does not target (`load_state_dict(strict=False)` drops it), so neither merges it.
    /// PEFT's patterns are Python regexes, read here as Rust regexes (the same for what configs
    /// hold). "all-linear" (which PEFT saves resolved, so only a config written by hand holds it)
    /// takes every module but the output layer and the embeddings ([`all_linear_takes`]; `module`
    /// must hold a 2-D weight). None where bone-tool cannot tell: a pattern Rust's regex does not
    /// read (lookaround, backreferences), a layer index or a `layers_to_transform` that is not an
    /// integer.
    pub fn peft_targets(&self, module: &str) -> Option<bool> {
        self.peft_targets_with(module, &mut Regexes::default())
    }

    /// Whether PEFT refuses this config because it targets the task's head `module` (a module path)
    /// before the task class puts that head in modules_to_save ([`task_heads_added_after`]): PEFT
    /// raises "modules_to_save cannot be applied to modules of type …Linear" (or earlier, where
    /// the head's shape does not fit the block).
    pub fn targets_task_head(&self, module: &str) -> bool {
        task_heads_added_after(self.task_type.as_deref()).contains(&module) && self.peft_targets(module) == Some(true)
    }

    /// Whether target_modules is "all-linear" (which PEFT resolves against the model).
    pub fn all_linear(&self) -> bool {
        is_all_linear(&self.target_modules)
    }

    /// Replace target_modules with `list`, as PEFT rewrites its config when it loads it: the field
    /// and the file as read ([`AdapterConfig::raw`], which [`AdapterConfig::peft_targets`] reads).
    fn set_targets<'a>(&mut self, list: impl Iterator<Item = &'a str>) {
        self.target_modules = Value::Array(list.map(Value::from).collect());
        if let Some(raw) = self.raw.as_object_mut() {
            raw.insert("target_modules".into(), self.target_modules.clone());
        }
    }

    /// Whether `layers_to_transform` picks layers (PEFT: not null, and not an empty list).
    fn uses_layer_indexes(&self) -> bool {
        match &self.layers_to_transform {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            _ => true,
        }
    }

    /// PEFT shortens a `target_modules` list of 20 or more (distinct) entries to the shortest
    /// suffixes that tell the modules it names from the model's other modules
    /// (`_find_minimal_target_modules`, run by `inject_adapter` on every load), which match as
    /// suffixes: an entry that was a module's whole path then no longer matches exactly, so
    /// `layers_to_transform` applies to it too. PEFT saves the shortened list, so only a config
    /// written by hand holds such a list. Done here only where `layers_to_transform` picks layers
    /// (elsewhere the shorter list targets the same modules). `others(targets)`: the paths of the
    /// model's modules that the list does not name. Returns a warning where the list changes.
    pub fn shorten_targets(
        &mut self,
        others: impl FnOnce(&BTreeSet<String>) -> Vec<String>,
        path: &Path,
    ) -> Option<String> {
        let targets: BTreeSet<String> =
            self.target_modules.as_array()?.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<_>>()?;
        if targets.len() < MIN_TARGETS_SHORTENED || !self.uses_layer_indexes() {
            return None;
        }
        let others = others(&targets);
        let shorter = minimal_suffixes(&targets, &others);
        if shorter.len() >= targets.len() {
            return None;
        }
        self.set_targets(shorter.iter().map(String::as_str));
        Some(format!(
            "{}: target_modules lists {} modules, which PEFT shortens to the suffixes that tell them from the \
             model's other modules, {}, before it matches them: layers_to_transform then also applies to the \
             modules it named by their whole paths",
            path.display(),
            targets.len(),
            self.target_modules
        ))
    }

    /// A config without `target_modules` (null or absent), written by hand (PEFT saves the
    /// modules it chose): PEFT takes its default for the base's `model_type`
    /// ([`PEFT_DEFAULT_TARGETS`]) and refuses the config for a model type it has none for. Sets
    /// that default and returns a warning saying so; None when the config names its targets or
    /// `model_type` is unknown (no config.json), where every block stays targeted; an error where
    /// PEFT refuses. `path` names the config file in messages.
    pub fn default_targets(&mut self, model_type: Option<&str>, path: &Path) -> Result<Option<String>> {
        if !self.target_modules.is_null() {
            return Ok(None);
        }
        let Some(model_type) = model_type else { return Ok(None) };
        let p = path.display();
        let Some((_, list)) = PEFT_DEFAULT_TARGETS.iter().find(|(t, _)| *t == model_type) else {
            return Err(input(format!(
                "{p}: names no target_modules, and PEFT has no default for the base's model_type {model_type:?}, so \
                 it refuses this config (\"Please specify `target_modules` in `peft_config`\"): list the target \
                 modules"
            )));
        };
        self.set_targets(list.iter().copied());
        Ok(Some(format!(
            "{p}: names no target_modules: PEFT takes its default for model_type {model_type:?}, {}",
            self.target_modules
        )))
    }

    /// The version of PEFT that saved the adapter (`peft_version`: "0.21.2", "0.20.0.dev0"), as
    /// (major, minor).
    pub fn saved_by(&self) -> Option<(u32, u32)> {
        let mut parts = self.peft_version.as_deref()?.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    }

    /// [`AdapterConfig::peft_targets`] with the config's regexes compiled once in `regexes`, for
    /// asking about every module of an adapter (compiled for each module, they took 30 ms for the
    /// 154 blocks of a 1b adapter with every rule in play; compiled once, under 10 ms).
    pub fn peft_targets_with(&self, module: &str, regexes: &mut Regexes) -> Option<bool> {
        let raw = |key: &str| self.raw.get(key).filter(|v| !v.is_null());
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array()?.iter().map(|s| s.as_str().map(str::to_string)).collect()
        };
        let names = |list: &[String]| list.iter().any(|t| module == t || module.ends_with(&format!(".{t}")));
        match raw("exclude_modules") {
            Some(Value::String(s)) if !s.is_empty() && regexes.fullmatch(s, module)? => return Some(false),
            Some(v @ Value::Array(a)) if !a.is_empty() && names(&strings(v)?) => return Some(false),
            _ => {}
        }
        for m in &self.modules_to_save {
            if regexes.match_start(&format!(r"(^|.*\.){m}($|\..*)"))?.is_match(module) {
                return Some(false);
            }
        }
        let targets = match raw("target_modules")? {
            Value::String(_) if self.all_linear() => return Some(all_linear_takes(module)),
            Value::String(s) => return regexes.fullmatch(s, module),
            v => strings(v)?,
        };
        if targets.iter().any(|t| t == module) {
            return Some(true);
        }
        if !names(&targets) {
            return Some(false);
        }
        let layers: Vec<u64> = match raw("layers_to_transform") {
            None => return Some(true),
            Some(Value::Number(n)) => vec![n.as_u64()?],
            Some(Value::Array(a)) if a.is_empty() => return Some(true),
            Some(Value::Array(a)) => a.iter().map(Value::as_u64).collect::<Option<_>>()?,
            Some(_) => return None,
        };
        let patterns: Vec<String> = match raw("layers_pattern") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()].into_iter().filter(|s| !s.is_empty()).collect(),
            Some(v) => strings(v)?,
        };
        // PEFT: re.match(r".*\.[^.]*\.(\d+)\.", key), or the first of each pattern p's
        // re.match(rf".*\.{p}\.(\d+)\.", key) that matches; group 1 is the layer index. The greedy
        // `.*` takes the last number of the path: in a mixture of experts the expert's
        // (`layers.1.experts.0.w1`). PEFT 0.20 takes the first (`.*?`), and 0.21 also lets a pattern
        // begin the path (`(?:^|.*?\.){p}`): the rules of the PEFT that saved the adapter
        // (its peft_version; 0.18.1's without one), under which it was trained
        let (lazy, at_start) = match self.saved_by() {
            Some(v) => (v >= (0, 20), v >= (0, 21)),
            None => (false, false),
        };
        let any = if lazy { ".*?" } else { ".*" };
        let layer_regexes: Vec<String> = if patterns.is_empty() {
            vec![format!(r"{any}\.[^.]*\.(\d+)\.")]
        } else if at_start {
            patterns.iter().map(|p| format!(r"(?:^|{any}\.){p}\.(\d+)\.")).collect()
        } else {
            patterns.iter().map(|p| format!(r"{any}\.{p}\.(\d+)\.")).collect()
        };
        for r in &layer_regexes {
            if let Some(c) = regexes.match_start(r)?.captures(module) {
                let index: u64 = c.get(1)?.as_str().parse().ok()?;
                return Some(layers.contains(&index));
            }
        }
        Some(false)
    }
}

/// Compiled regexes by pattern (None: Rust's regex does not read it), for
/// [`AdapterConfig::peft_targets_with`].
#[derive(Default)]
pub struct Regexes(std::collections::HashMap<String, Option<Regex>>);

impl Regexes {
    fn get(&mut self, pattern: String) -> Option<Regex> {
        self.0.entry(pattern).or_insert_with_key(|p| Regex::new(p).ok()).clone()
    }

    /// Python's `re.fullmatch(p, module)`.
    fn fullmatch(&mut self, p: &str, module: &str) -> Option<bool> {
        Some(self.get(format!("^(?:{p})$"))?.is_match(module))
    }

    /// Python's `re.match(p, …)`: a match at the start.
    fn match_start(&mut self, p: &str) -> Option<Regex> {
        self.get(format!("^(?:{p})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<(AdapterConfig, Vec<String>)> {
        let mut w = vec![];
        AdapterConfig::parse(Path::new("adapter_config.json"), text, &mut w).map(|c| (c, w))
    }

    #[test]
    fn defaults_follow_peft() {
        let (c, w) = parse(r#"{"peft_type": "BONE"}"#).unwrap();
        assert_eq!((c.r, c.variant, c.mini_r), (64, Variant::Default, 1));
        assert!(w.is_empty());
    }

    #[test]
    fn variants_come_from_init_weights() {
        assert_eq!(parse(r#"{"peft_type":"MISS","init_weights":false}"#).unwrap().0.variant, Variant::Default);
        assert_eq!(parse(r#"{"peft_type":"MISS","init_weights":"bat"}"#).unwrap().0.variant, Variant::Bat);
        let (c, _) = parse(r#"{"peft_type":"MISS","init_weights":"mini","mini_r":4,"r":8}"#).unwrap();
        assert_eq!((c.variant, c.mini_r, c.r), (Variant::Mini, 4, 8));
    }

    #[test]
    fn rejects_what_is_not_bone_or_miss() {
        let e = parse(r#"{"peft_type":"LORA","r":8}"#).unwrap_err().to_string();
        assert!(e.contains("\"LORA\"") && e.contains("BONE") && e.contains("MISS"), "{e}");
        assert!(parse(r#"{"r":8}"#).unwrap_err().to_string().contains("no peft_type"));
        assert!(parse(r#"{"peft_type":"BONE","init_weights":"mini"}"#)
            .unwrap_err()
            .to_string()
            .contains("only for MiSS"));
        assert!(parse(r#"{"peft_type":"BONE","r":0}"#).unwrap_err().to_string().contains("positive integer"));
        assert!(parse(r#"{"peft_type":"BONE","init_weights":"pissa"}"#).is_err());
        assert!(parse("{not json").unwrap_err().to_string().contains("not valid JSON"));
    }

    /// PEFT's own decisions (fixtures/peft-targets.json, written by fixtures/generate.py from
    /// PEFT 0.18.1's check_target_module_exists) for list and regex targets, layer indexes and
    /// patterns, exclusions, modules_to_save and "all-linear" (resolved by PEFT against a model
    /// holding the paths: the output layer and the embeddings left out): bone-tool decides each
    /// the same way.
    #[test]
    fn targets_are_decided_as_peft_decides_them() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft-targets.json");
        let table: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(table.len() >= 450);
        let (mut yes, mut regex, mut all_linear) = (0, 0, [0, 0]);
        for row in &table {
            let mut cfg = row["config"].clone();
            cfg["peft_type"] = "BONE".into();
            cfg["peft_version"] = "0.18.1".into();
            let (c, _) = parse(&cfg.to_string()).unwrap();
            let module = row["module"].as_str().unwrap();
            let peft = row["peft"].as_bool().unwrap_or_else(|| panic!("{cfg} {module}: PEFT says {}", row["peft"]));
            assert_eq!(c.peft_targets(module), Some(peft), "{cfg} {module}");
            yes += usize::from(peft);
            regex += usize::from(["target_modules", "exclude_modules"].iter().any(|k| cfg[*k].is_string()));
            if cfg["target_modules"] == "all-linear" {
                all_linear[usize::from(peft)] += 1;
            }
        }
        // both answers occur, often, regexes among them; "all-linear" takes some paths, not others
        let n = table.len();
        assert!(
            yes >= 120 && n - yes >= 120 && regex >= 90 && all_linear[0] >= 5 && all_linear[1] >= 10,
            "{yes} {regex}"
        );
    }

    /// An adapter saved by a newer PEFT is targeted by that PEFT's rules (its peft_version): from
    /// 0.20 the layer index of layers_to_transform is a path's first number, not its last (an
    /// expert's, in a mixture of experts), and from 0.21 a layers_pattern may begin the path.
    /// fixtures/peft-targets-VERSION.json: generate.py's table decided by PEFT 0.20.0 and 0.21.2
    /// themselves (scripts/peft-newer.sh VERSION --targets); each differs from 0.18.1's in 4 or 5
    /// rows, and every row must be decided as it says.
    #[test]
    fn newer_peft_s_layer_rules_for_adapters_it_saved() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let old: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("peft-targets.json")).unwrap()).unwrap();
        for version in ["0.20.0", "0.21.2"] {
            let file: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("peft-targets-{version}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(file["peft_version"], version);
            let table = file["table"].as_array().unwrap();
            assert_eq!(table.len(), old.len());
            let mut changed = 0;
            for (row, before) in table.iter().zip(&old) {
                assert_eq!((&row["config"], &row["module"]), (&before["config"], &before["module"]));
                changed += usize::from(row["peft"] != before["peft"]);
                let mut cfg = row["config"].clone();
                (cfg["peft_type"], cfg["peft_version"]) = ("MISS".into(), version.into());
                let (c, _) = parse(&cfg.to_string()).unwrap();
                let module = row["module"].as_str().unwrap();
                assert_eq!(c.peft_targets(module), row["peft"].as_bool(), "PEFT {version}: {cfg} {module}");
            }
            assert!(changed >= 4, "PEFT {version} decides {changed} rows otherwise than 0.18.1");
        }
    }

    /// The defaults by model type are PEFT's own (fixtures/peft-default-targets.json, written by
    /// fixtures/generate.py from PEFT 0.18.1), for Bone and MiSS alike, and only a config without
    /// target_modules takes them.
    #[test]
    fn a_config_without_targets_takes_peft_s_default_for_the_model_type() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft-default-targets.json");
        let peft: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for peft_type in ["BONE", "MISS"] {
            let table = peft[peft_type].as_object().unwrap();
            assert_eq!(table.len(), PEFT_DEFAULT_TARGETS.len(), "{peft_type}");
            for (model_type, list) in PEFT_DEFAULT_TARGETS {
                assert_eq!(table[*model_type], json!(list), "{peft_type} {model_type}");
            }
        }
        let file = Path::new("adapter_config.json");
        for text in [r#"{"peft_type":"MISS"}"#, r#"{"peft_type":"BONE","target_modules":null}"#] {
            let (mut c, _) = parse(text).unwrap();
            assert_eq!(c.peft_targets("model.layers.0.self_attn.k_proj"), None, "undecided without the model type");
            assert_eq!(c.default_targets(None, file).unwrap(), None);
            let w = c.default_targets(Some("llama"), file).unwrap().unwrap();
            assert!(w.contains("names no target_modules") && w.contains("\"llama\""), "{w}");
            assert_eq!(c.peft_targets("model.layers.0.self_attn.k_proj"), Some(false));
            assert_eq!(c.peft_targets("model.layers.0.self_attn.v_proj"), Some(true));
            let (mut c, _) = parse(text).unwrap();
            let e = c.default_targets(Some("llava"), file).unwrap_err().to_string();
            assert!(e.contains("adapter_config.json") && e.contains("\"llava\"") && e.contains("refuses"), "{e}");
        }
        let (mut c, _) = parse(r#"{"peft_type":"BONE","target_modules":["k_proj"]}"#).unwrap();
        assert_eq!(c.default_targets(Some("llama"), file).unwrap(), None, "it names its targets");
        assert_eq!(c.peft_targets("model.layers.0.self_attn.k_proj"), Some(true));
    }

    /// The classifier heads each task type adds to modules_to_save are PEFT's own
    /// (fixtures/peft-task-modules.json, written by fixtures/generate.py from PEFT 0.18.1: the
    /// config's list when the adapter is placed, and once the task's PeftModel class is built).
    /// Those added before the placing take no block, "all-linear" included, while the same config
    /// without the task type targets them; one added after it that the config targets makes PEFT
    /// refuse the config.
    #[test]
    fn a_task_type_keeps_the_blocks_off_its_classifier_heads_as_peft_does() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft-task-modules.json");
        let peft: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let peft = peft.as_object().unwrap();
        assert!(peft.len() >= 6, "{peft:?}");
        for (task, lists) in peft {
            assert_eq!(json!(task_modules_to_save(Some(task))), lists["placed"], "{task}");
            let after: Vec<&Value> = lists["after"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| !lists["placed"].as_array().unwrap().contains(m))
                .collect();
            assert_eq!(json!(task_heads_added_after(Some(task))), json!(after), "{task}");
        }
        assert!(task_modules_to_save(None).is_empty() && task_heads_added_after(None).is_empty());
        let config = |task: &str, targets: &str, save: &str| {
            let task = if task.is_empty() { String::new() } else { format!(r#","task_type":"{task}""#) };
            let text = format!(r#"{{"peft_type":"BONE","target_modules":{targets},"modules_to_save":{save}{task}}}"#);
            parse(&text).unwrap().0
        };
        for targets in [r#""all-linear""#, r#"["q_proj","score","classifier","qa_outputs"]"#] {
            for head in ["score", "classifier", "qa_outputs"] {
                assert_eq!(config("", targets, "null").peft_targets(head), Some(true), "{targets} {head}");
            }
            let seq = config("SEQ_CLS", targets, "null");
            for head in ["score", "classifier"] {
                assert_eq!(seq.peft_targets(head), Some(false), "{targets} {head}");
                assert!(!seq.targets_task_head(head));
            }
            assert_eq!(seq.peft_targets("model.layers.0.self_attn.q_proj"), Some(true), "{targets}");
            for (task, head) in [("TOKEN_CLS", "score"), ("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")] {
                assert!(config(task, targets, "null").targets_task_head(head), "{task} {targets} {head}");
                // as PEFT saves such a config: the heads listed, so not targeted
                let saved = config(task, targets, &format!(r#"["{head}"]"#));
                assert!(!saved.targets_task_head(head) && saved.peft_targets(head) == Some(false), "{task} {head}");
            }
        }
        assert!(!config("TOKEN_CLS", r#"["q_proj"]"#, "null").targets_task_head("score"));
        // listed already: not twice
        let (c, _) = parse(r#"{"peft_type":"BONE","task_type":"SEQ_CLS","modules_to_save":["score"]}"#).unwrap();
        assert_eq!(c.modules_to_save, ["score", "classifier"]);
    }

    /// `_find_minimal_target_modules`'s own example (PEFT 0.18.1's docstring), and a path whose
    /// shorter suffixes all name other modules too.
    #[test]
    fn long_target_lists_are_shortened_as_peft_shortens_them() {
        let set = |v: Vec<String>| v.into_iter().collect::<BTreeSet<String>>();
        let mut targets: Vec<String> = (0..100).map(|i| format!("model.decoder.layers.{i}.self_attn.q_proj")).collect();
        targets.extend((0..100).map(|i| format!("model.decoder.layers.{i}.self_attn.v_proj")));
        let others: Vec<String> = (0..100).map(|i| format!("model.encoder.layers.{i}.self_attn.k_proj")).collect();
        assert_eq!(minimal_suffixes(&set(targets), &others), ["q_proj", "v_proj"]);
        let targets = set(vec!["a.b.q".into(), "lm_head".into(), "c.b.q".into()]);
        let others = vec!["x.b.q".to_string(), "a.x".to_string()];
        assert_eq!(minimal_suffixes(&targets, &others), ["a.b.q", "c.b.q", "lm_head"]);

        // in a config: only a list of 20 or more beside layers_to_transform
        let paths: Vec<String> = (0..20).map(|i| format!("model.layers.{i}.self_attn.q_proj")).collect();
        let others = |_: &BTreeSet<String>| vec!["model.layers.0.mlp.up_proj".to_string(), "lm_head".to_string()];
        let file = Path::new("adapter_config.json");
        let text = |layers: &str, n: usize| {
            format!(r#"{{"peft_type":"BONE","target_modules":{},"layers_to_transform":{layers}}}"#, json!(paths[..n]))
        };
        let (mut c, _) = parse(&text("[1]", 20)).unwrap();
        assert_eq!(c.peft_targets("model.layers.0.self_attn.q_proj"), Some(true), "a whole path, before");
        let w = c.shorten_targets(others, file).unwrap();
        assert!(w.contains("lists 20 modules, which PEFT shortens") && w.contains(r#"["q_proj"]"#), "{w}");
        assert_eq!(c.peft_targets("model.layers.0.self_attn.q_proj"), Some(false), "layer 0 is not in [1]");
        assert_eq!(c.peft_targets("model.layers.1.self_attn.q_proj"), Some(true));
        for (layers, n) in [("[1]", 19), ("null", 20), ("[]", 20)] {
            let (mut c, _) = parse(&text(layers, n)).unwrap();
            assert_eq!(c.shorten_targets(others, file), None, "{layers} {n}");
        }
    }

    #[test]
    fn a_string_target_with_layers_is_refused_as_peft_refuses_it() {
        for (extra, key) in [
            (r#""layers_to_transform":[0]"#, "layers_to_transform"),
            (r#""layers_pattern":"layers""#, "layers_pattern"),
        ] {
            for target in [r#""all-linear""#, r#"".*q_proj""#] {
                let e = parse(&format!(r#"{{"peft_type":"BONE","target_modules":{target},{extra}}}"#))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(key) && e.contains("PEFT refuses") && e.contains("adapter_config.json"), "{e}");
            }
            // beside a list, or set to null, both are fine
            parse(&format!(r#"{{"peft_type":"BONE","target_modules":["q_proj"],{extra}}}"#)).unwrap();
        }
        parse(r#"{"peft_type":"BONE","target_modules":"all-linear","layers_to_transform":null,"layers_pattern":null}"#)
            .unwrap();
    }

    #[test]
    fn unknown_keys_warn() {
        let (_, w) = parse(r#"{"peft_type":"BONE","lora_alpha":16}"#).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("lora_alpha"));
        // MiSS-only keys are unknown to Bone
        let (_, w) = parse(r#"{"peft_type":"BONE","mini_r":2}"#).unwrap();
        assert_eq!(w.len(), 1);
    }
}
