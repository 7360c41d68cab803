//! The command line, defined once: every flag and its documentation.

use crate::backend::DeviceChoice;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const ABOUT: &str = "Merge, unmerge and inspect PEFT Bone / MiSS adapters: streaming, bit-for-bit PEFT's math";

const LONG_ABOUT: &str = "\
bone-tool folds PEFT Bone / BAT / MiSS adapters (DiSHA, arXiv 2409.15371) into a base model's
safetensors weights and takes them back out, shard by shard, without loading the model into RAM.
Merges are byte-identical to PEFT 0.18.1's merge_and_unload for every variant and dtype (BAT as
PEFT computes it on an Intel AVX-512 processor, or on an AMD one with --bat-sums amd: PEFT's own
BAT bytes vary by processor; PEFT 0.20 and later round f16/bf16 BAT once: --rounding once).
Output is written to a temporary folder beside --out and renamed into place only when complete.";

const EXAMPLES: &str = "\
Examples:
  bone-tool merge --base ./Llama-3.2-1B --adapter ./my-bone-adapter --out ./Llama-3.2-1B-merged
  bone-tool merge --base ./model --adapter ./first --adapter ./second --out ./merged
  bone-tool merge --base meta-llama/Llama-3.2-1B --adapter ./my-bone-adapter --out ./merged
  bone-tool merge --adapter ./my-bone-adapter --out ./merged   (the base the adapter records)
  bone-tool unmerge --merged ./Llama-3.2-1B-merged --adapter ./my-bone-adapter --out ./restored
  bone-tool inspect adapter ./my-bone-adapter --base ./Llama-3.2-1B
  bone-tool verify --base ./Llama-3.2-1B --adapter ./my-bone-adapter --merged ./Llama-3.2-1B-merged
  bone-tool convert ./my-bone-adapter --to miss --out ./my-miss-adapter

Exit codes: 0 ok, 1 failed while working (I/O) or verify found differences, 2 bad usage or input,
130 interrupted.";

#[derive(Parser, Debug)]
#[command(name = "bone-tool", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Worker threads for the math [default: one per core]
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,

    /// Print no progress bar or summary (warnings and errors still go to stderr)
    #[arg(long, short, global = true)]
    pub quiet: bool,

    /// Colour the `error:` and `warning:` labels: `auto` when stderr is a terminal and NO_COLOR is unset
    #[arg(long, global = true, value_enum, default_value_t = crate::report::ColorChoice::Auto, value_name = "WHEN")]
    pub color: crate::report::ColorChoice,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Merge adapters into a base model (PEFT's merge_and_unload), writing a new model folder
    #[command(
        after_help = "Examples:\n  bone-tool merge --base ./base-model --adapter ./bone-adapter --out ./merged\n  \
                            bone-tool merge --base ./base-model --adapter ./bone-adapter --out ./merged --dtype bf16 --max-shard-size 2GB\n  \
                            bone-tool merge --base ./base-model --each ./runs/* --out-pattern ./merged/{name}\n  \
                            bone-tool merge --base ./base-model --adapter ./bone-adapter --out ./merged --dry-run\n  \
                            bone-tool merge --base Qwen/Qwen2.5-0.5B --adapter ./bone-adapter --out ./merged\n  \
                            bone-tool merge --adapter ./bone-adapter --out ./merged"
    )]
    Merge(MergeArgs),
    /// Remove merged adapters from a model again (last adapter first), writing a new model folder
    #[command(
        after_help = "Example:\n  bone-tool unmerge --merged ./merged --adapter ./bone-adapter --out ./restored"
    )]
    Unmerge(UnmergeArgs),
    /// Look inside an adapter (and check it against a base model)
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Check a merged model: recompute the merge tensor by tensor (nothing is written) and compare
    #[command(
        after_help = "Examples:\n  bone-tool verify --base ./base --adapter ./bone-adapter --merged ./downloaded-merged\n  \
                            bone-tool verify --reverse --base ./restored --adapter ./bone-adapter --merged ./merged\n\n\
                            Exit 0 when every tensor is within one unit in the last place, 1 when not, 2 on bad input."
    )]
    Verify(VerifyArgs),
    /// Rewrite an adapter: Bone -> MiSS, MiSS -> Bone, or Bone/MiSS -> LoRA for any serving stack
    #[command(after_help = "Examples:\n  bone-tool convert ./bone-adapter --to miss --out ./miss-adapter\n  \
                            bone-tool convert ./miss-adapter --to lora --out ./lora-adapter --base ./base-model\n  \
                            bone-tool convert ./bat-adapter --to lora --out ./lora --base ./base-model --energy 0.99")]
    Convert(ConvertArgs),
    /// Print a shell completion script (e.g. `bone-tool completions bash > /etc/bash_completion.d/bone-tool`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page in roff (e.g. `bone-tool man > bone-tool.1 && man ./bone-tool.1`)
    Man,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The base model (with --reverse: the unmerged model to check). Without it (and without
    /// --reverse), the base the adapters record, as merge finds it
    #[arg(long, value_name = "MODEL", required_if_eq("reverse", "true"))]
    pub base: Option<PathBuf>,

    /// The adapters, in the order they were merged
    #[arg(long = "adapter", value_name = "ADAPTER", required = true)]
    pub adapters: Vec<PathBuf>,

    /// The merged model to check (with --reverse: the merged model to unmerge)
    #[arg(long, value_name = "MODEL")]
    pub merged: PathBuf,

    /// Check an unmerged folder: recompute the unmerge of --merged and compare it with --base
    #[arg(long)]
    pub reverse: bool,

    /// Also accept a changed tensor whose every value is within REL times the tensor's largest
    /// |value| (status `within_tolerance`). Off by default: exit 0 needs every tensor within one
    /// ulp. For f32 BAT from another machine, 1e-5: PEFT's own f32 BAT sums depend on the
    /// processor it ran on, and its unmerge inverts in f32
    #[arg(long, value_name = "REL", value_parser = parse_tolerance)]
    pub tolerance: Option<f64>,

    /// Print one JSON object (every tensor's status, max abs and ulp error) instead of text
    #[arg(long)]
    pub json: bool,

    /// As for merge. Where only f16/bf16 BAT tensors differ, the other rounding is checked too
    /// (PEFT 0.20 and later merge as `once`), and a note says which one matched
    #[arg(long, value_enum, default_value_t = RoundingArg::Peft)]
    pub rounding: RoundingArg,

    /// As for merge. Where only BAT tensors differ, the other processor's sums are checked too,
    /// and a note says which one matched
    #[arg(long, value_enum, default_value_t = BatSumsArg::Intel, value_name = "PROCESSOR")]
    pub bat_sums: BatSumsArg,

    /// As for merge
    #[arg(long)]
    pub no_autocast_adapter_dtype: bool,

    /// The --dtype the merge was written with (`keep`: each tensor its own): the recomputed merge
    /// is rounded to it before comparing
    #[arg(long, value_enum, default_value_t = DtypeArg::Keep)]
    pub dtype: DtypeArg,

    /// As for merge
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,

    #[command(flatten)]
    pub prefix: PrefixArg,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub adapter: AdapterArg,

    /// What to write: `miss` (from Bone, lossless), `bone` (from MiSS, for PEFT 0.14-0.18), or
    /// `lora` (default and mini exactly; BAT by truncated SVD)
    #[arg(long, value_enum)]
    pub to: ConvertTo,

    /// The folder to write (adapter_config.json + adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// The base model: gives in_features for LoRA's A, out_features for expanding mini blocks, and
    /// the weights BAT's delta depends on. Without it, adapter_config.json's
    /// base_model_name_or_path is tried when it is a local folder or in the local Hugging Face cache
    #[arg(long, value_name = "MODEL")]
    pub base: Option<PathBuf>,

    /// BAT -> LoRA: keep this many singular values per layer
    #[arg(long, value_name = "N", conflicts_with = "energy")]
    pub rank: Option<usize>,

    /// BAT -> LoRA: keep, per layer, the fewest singular values whose energy (cumulative S²)
    /// reaches this fraction of the total, in (0, 1]
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub energy: Option<f64>,

    /// The dtype of the written tensors (`keep`: the blocks' own). Default: `keep`, but f32 for
    /// the factors of BAT -> LoRA (new values from an SVD, stored as PEFT's convert_to_lora stores
    /// them). A narrower dtype than the blocks' rounds them: the conversion is then no longer exact,
    /// and says by how much
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,

    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,

    /// Print one JSON summary (layers, ranks, errors) on stdout
    #[arg(long)]
    pub json: bool,

    /// Print what would be written (tensors, shapes, dtypes, sizes) and exit without computing or
    /// writing anything
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub prefix: PrefixArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvertTo {
    Miss,
    Bone,
    Lora,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Keep,
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    /// None for `keep`.
    pub fn float(self) -> Option<crate::ops::dtype::Float> {
        use crate::ops::dtype::Float;
        match self {
            DtypeArg::Keep => None,
            DtypeArg::F32 => Some(Float::F32),
            DtypeArg::Bf16 => Some(Float::BF16),
            DtypeArg::F16 => Some(Float::F16),
        }
    }
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model: a folder with model.safetensors or model.safetensors.index.json and its
    /// shards, or one .safetensors file. A Hub id (`org/name`, `org/name@REVISION`) names its
    /// snapshot in the local Hugging Face cache. Without --base, the base the adapters record
    /// (adapter_config.json's base_model_name_or_path), as PEFT's AutoPeftModel loads it: a local
    /// folder or a model in the local Hugging Face cache
    #[arg(long, value_name = "MODEL")]
    pub base: Option<PathBuf>,

    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or its Hub id when
    /// it is in the local Hugging Face cache. Repeat to stack adapters: they are merged in the
    /// order given
    #[arg(long = "adapter", value_name = "ADAPTER", required_unless_present = "each", conflicts_with = "each")]
    pub adapters: Vec<PathBuf>,

    /// The folder to write: the base's files with the adapters merged in
    #[arg(long, value_name = "DIR", required_unless_present = "each", conflicts_with = "each")]
    pub out: Option<PathBuf>,

    /// Write one merged model per adapter (each merged alone into the base), reading the base once
    /// for all of them; needs --out-pattern
    #[arg(long, value_name = "ADAPTER", num_args = 1.., requires = "out_pattern")]
    pub each: Vec<PathBuf>,

    /// With --each: where each model goes; `{name}` is replaced by the adapter folder's name
    /// (e.g. `merged/{name}`)
    #[arg(long, value_name = "PATTERN", requires = "each")]
    pub out_pattern: Option<String>,

    #[command(flatten)]
    pub opts: ApplyOptions,
}

#[derive(Args, Debug)]
pub struct UnmergeArgs {
    /// The merged model (same forms as merge's --base)
    #[arg(long, value_name = "MODEL")]
    pub merged: PathBuf,

    /// The adapters that were merged, in the order they were merged; they are removed last first
    #[arg(long = "adapter", value_name = "ADAPTER", required = true)]
    pub adapters: Vec<PathBuf>,

    /// The folder to write: the model with the adapters taken out
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    #[command(flatten)]
    pub opts: ApplyOptions,
}

#[derive(Args, Debug)]
pub struct ApplyOptions {
    /// Replace --out if it exists (only once the new folder is complete)
    #[arg(long)]
    pub force: bool,

    /// How BAT merges round: `peft` rounds the delta to the weight dtype before adding it, as PEFT
    /// 0.18.1's merge_and_unload() does (byte-identical output; PEFT 0.17-0.19 too); `once` rounds
    /// W + delta once (more accurate; byte-identical to merge_and_unload(safe_merge=True), and to
    /// PEFT 0.20 and later's merge_and_unload() of MiSS adapters). f32 weights: the same either way
    #[arg(long, value_enum, default_value_t = RoundingArg::Peft)]
    pub rounding: RoundingArg,

    /// Which processor's f32 sums BAT's GEMMs reproduce. PEFT's torch hands them to Intel MKL,
    /// whose sums depend on the processor, so PEFT's own f32 BAT merges differ in the last bit from
    /// one processor to another (at r = 8 to 11 and from 193; f16/bf16 ones in a few values): `intel`,
    /// an Intel processor with AVX-512; `amd`, an AMD one, with AVX-512 or without (whose sums at
    /// r = 8 to 11 only the CPU computes in places, also under --device cuda); `auto`, the one bone-tool runs
    /// on (for PEFT's bytes on the same machine). An unmerge's f32 (I + B)⁻¹ follows it too:
    /// PEFT's bytes up to r = 128 with intel and 149 with amd (above, the f64 inverse, within an
    /// ulp or so).
    /// Default and mini merges are the same either way
    #[arg(long, value_enum, default_value_t = BatSumsArg::Intel, value_name = "PROCESSOR")]
    pub bat_sums: BatSumsArg,

    /// Where the math runs: `auto` uses an NVIDIA GPU when one is usable (built with the `cuda`
    /// feature, driver and NVRTC present, and it gives the CPU's bytes on a self-check), else the
    /// CPU. Both give the same bytes (BAT: on a processor with FMA). A GPU starts beside
    /// the work (0.4-0.7 s), while the CPU computes the first pieces
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,

    /// Compute every changed tensor on the GPU: wait for it to start rather than letting the CPU
    /// compute the first pieces meanwhile (the output is the same bytes either way)
    #[arg(long)]
    pub all_on_gpu: bool,

    /// The dtype of the written float tensors (`keep`: each its own). Changed tensors are computed
    /// in the base's dtype as without it, then rounded once; config.json's torch_dtype follows
    #[arg(long, value_enum, default_value_t = DtypeArg::Keep)]
    pub dtype: DtypeArg,

    /// Re-shard the output: at most SIZE of tensor data per file (decimal 500MB, 5GB or binary
    /// 512MiB), split as Hugging Face does, with a fresh index [default: the base's own files]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_shard_size: Option<u64>,

    /// When the base ties its output layer to its input embedding (lm_head to embed_tokens, wte or
    /// word_embeddings; GPT-NeoX's embed_out to embed_in) and an adapter changes one of them, refuse
    /// (default: write both tensors and set tie_word_embeddings false, with a warning). Unmerge
    /// takes a still-tied model's head blocks out of the shared weight (merged there in place, as
    /// PEFT does) and keeps the tie
    #[arg(long, conflicts_with = "untie")]
    pub keep_tied: bool,

    /// Write both tied tensors and set tie_word_embeddings false when an adapter changes one side.
    /// This is the default; the flag spells it out in scripts
    #[arg(long)]
    pub untie: bool,

    /// Print the plan (each changed tensor and how, the files and their sizes, memory and time) and
    /// exit without writing anything
    #[arg(long)]
    pub dry_run: bool,

    /// Print one JSON object on stdout: with --dry-run the plan, else a summary of the run
    #[arg(long)]
    pub json: bool,

    /// Print where the time went (read, compute, write, fsync busy seconds) on stderr
    #[arg(long)]
    pub timings: bool,

    /// Write values that become inf or NaN (by default, as PEFT's safe_merge, such a value stops
    /// the run with an error naming the tensor)
    #[arg(long)]
    pub allow_non_finite: bool,

    /// Skip the fsync before the final rename: faster where the disk is slow, but a power loss soon
    /// after may leave a complete-looking --out with data missing. Inputs are never at risk
    #[arg(long)]
    pub no_fsync: bool,

    /// Reproduce PEFT with autocast_adapter_dtype=False: the blocks are first rounded to the
    /// weight's dtype (default: blocks are used exactly, as PEFT's default f32 upcast does)
    #[arg(long)]
    pub no_autocast_adapter_dtype: bool,

    #[command(flatten)]
    pub prefix: PrefixArg,
}

/// `1e-5`: a relative tolerance for `verify`, from 0 to below 1.
fn parse_tolerance(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..1.0).contains(&x) => Ok(x),
        _ => Err(format!("{text:?}: expected a relative tolerance from 0 to below 1, e.g. 1e-5")),
    }
}

/// `500MB`, `5GB`, `2GiB`, `1000` (bytes): decimal units as Hugging Face's max_shard_size, binary
/// ones with `i`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a size like 500MB, 5GB or 2GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")),
    };
    let bytes = (value * scale).round();
    if bytes < 1.0 {
        return Err(format!("{text:?}: a shard must hold at least one byte"));
    }
    Ok(bytes as u64)
}

/// The one adapter folder of `inspect adapter` and `convert`: positional, or `--adapter` as merge
/// spells it (exactly one of the two).
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct AdapterArg {
    /// The adapter folder
    #[arg(value_name = "ADAPTER")]
    positional: Option<PathBuf>,

    /// The adapter folder, spelled as merge spells it (the same as the positional ADAPTER)
    #[arg(long = "adapter", value_name = "ADAPTER")]
    flag: Option<PathBuf>,
}

impl AdapterArg {
    pub fn path(&self) -> &std::path::Path {
        self.positional.as_deref().or(self.flag.as_deref()).expect("clap requires ADAPTER or --adapter")
    }

    pub fn path_mut(&mut self) -> &mut PathBuf {
        self.positional.as_mut().or(self.flag.as_mut()).expect("clap requires ADAPTER or --adapter")
    }
}

#[derive(Args, Debug, Clone)]
pub struct PrefixArg {
    /// The prefix of the adapter's tensor keys before the module path; stripped to find the base
    /// tensor (adapters saved without PeftModel may have "" or "model."). A vision-language
    /// checkpoint's own names (`language_model.model.…` for `model.language_model.…`) are found
    /// without it, and so is a base saved as the bare backbone (`layers.0.…` for
    /// `model.layers.0.…`: the keys are then read as with "base_model.model.model.", with a
    /// warning)
    #[arg(long, value_name = "PREFIX", default_value = crate::adapter::DEFAULT_PREFIX)]
    pub adapter_prefix: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoundingArg {
    Peft,
    Once,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BatSumsArg {
    /// As PEFT's torch sums on an Intel processor with AVX-512
    Intel,
    /// As on an AMD processor (with AVX-512 or without)
    Amd,
    /// As on the processor bone-tool runs on (for PEFT's bytes on this machine): `amd` on an AMD
    /// processor, `intel` on an Intel one with AVX-512, and `intel` with a warning elsewhere
    Auto,
}

impl BatSumsArg {
    /// The sums to reproduce; `auto` warns where this processor's are not modelled.
    pub fn sums(self) -> crate::ops::BatSums {
        match self {
            BatSumsArg::Intel => crate::ops::BatSums::Intel,
            BatSumsArg::Amd => crate::ops::BatSums::Amd,
            BatSumsArg::Auto => crate::ops::BatSums::this_processor().unwrap_or_else(|| {
                crate::report::warning(
                    "--bat-sums auto: this processor is neither an Intel x86-64 one with AVX-512 nor an AMD \
                     one with AVX2, whose sums bone-tool reproduces; BAT is summed as on the Intel one \
                     (--bat-sums intel), and PEFT's own f32 BAT bytes here may differ from it in the last bit",
                );
                crate::ops::BatSums::Intel
            }),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum InspectCommand {
    /// Summarise an adapter: type, variant, r, layers, parameters, replaced tensors, warnings
    #[command(
        after_help = "Examples:\n  bone-tool inspect adapter ./bone-adapter\n  bone-tool inspect adapter ./bone-adapter --base ./base-model --json"
    )]
    Adapter(InspectAdapterArgs),
}

#[derive(Args, Debug)]
pub struct InspectAdapterArgs {
    #[command(flatten)]
    pub adapter: AdapterArg,

    /// Check every layer against this base model; exit 2 when the adapter cannot be merged into it
    #[arg(long, value_name = "MODEL")]
    pub base: Option<PathBuf>,

    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub prefix: PrefixArg,
}
