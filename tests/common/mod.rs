//! Helpers shared by the end-to-end tests: running the binary, reading and writing safetensors
//! independently of bone-tool's own reader, and decoding values.
#![allow(dead_code)]

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("fixtures")
}

/// The binary, with the Hugging Face cache pointed at a folder that does not exist, so that a
/// developer's own cache never changes what a test sees (a test that wants one sets its own).
/// Through `BONE_TOOL_TEST_RUNNER` when set (an emulator and its arguments, as
/// `scripts/cross-check.sh` sets for a binary built for another processor).
pub fn bin() -> Command {
    let exe = env!("CARGO_BIN_EXE_bone-tool");
    let runner = std::env::var("BONE_TOOL_TEST_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    let mut c = match runner.next() {
        Some(emulator) => {
            let mut c = Command::new(emulator);
            c.args(runner).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    c.env("HF_HUB_CACHE", root().join("target/no-such-hf-cache"));
    c
}

/// Say in the test output that a check did not run here, and why. Straight to stderr: the test
/// harness captures `eprintln!` and shows it only for failing tests, so a skipped check would pass
/// silently.
pub fn not_checked(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "NOT CHECKED: {why}");
}

/// Run bone-tool with these arguments.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("bone-tool runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bone-tool merge --base BASE --adapter ADAPTER --out OUT EXTRA...`, whatever its outcome.
pub fn merge_with(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["merge", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    run(&args)
}

/// `bone-tool -q merge --base BASE --adapter ADAPTER --out OUT`, which must succeed.
pub fn merge(base: &Path, adapter: &Path, out: &Path) {
    ok(&merge_with(base, adapter, out, &["-q"]));
}

/// Assert success, showing stderr otherwise.
pub fn ok(o: &Output) {
    assert!(o.status.success(), "bone-tool failed ({:?}): {}", o.status, stderr(o));
}

#[derive(Clone, Debug)]
pub struct T {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a model folder (all its .safetensors files) or of one file.
pub fn load(path: &Path) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    let files: Vec<PathBuf> = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    };
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                T { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() },
            );
            assert!(prev.is_none(), "{name} stored twice");
        }
    }
    out
}

/// The `__metadata__` of a safetensors file.
pub fn file_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

pub fn save(path: &Path, tensors: &BTreeMap<String, T>) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// Values as f64 (F32, F16, BF16).
pub fn values(t: &T) -> Vec<f64> {
    match t.dtype {
        Dtype::F32 => t.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        Dtype::F16 => {
            t.data.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect()
        }
        Dtype::BF16 => {
            t.data.chunks_exact(2).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64()).collect()
        }
        d => panic!("not a float dtype: {d:?}"),
    }
}

/// Raw element bits as integers, for ulp distances.
pub fn bits(t: &T) -> Vec<i64> {
    match t.dtype {
        Dtype::F32 => {
            t.data.chunks_exact(4).map(|c| ordered(i32::from_le_bytes(c.try_into().unwrap()) as i64, 31)).collect()
        }
        _ => t.data.chunks_exact(2).map(|c| ordered(i16::from_le_bytes(c.try_into().unwrap()) as i64, 15)).collect(),
    }
}

/// Map sign-magnitude float bits onto a line where neighbours differ by one.
fn ordered(v: i64, sign_bit: u32) -> i64 {
    if v < 0 {
        -(v & ((1i64 << sign_bit) - 1))
    } else {
        v
    }
}

pub fn f32_tensor(shape: Vec<usize>, vals: &[f32]) -> T {
    T { dtype: Dtype::F32, shape, data: vals.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// Copy a folder (flat or nested) for tests that alter inputs.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A digest of every file below a folder (names, sizes, contents), to prove inputs are untouched.
pub fn digest(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `digest` with paths relative to `dir`, to compare two output folders file by file.
pub fn digest_relative(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    digest(dir).into_iter().map(|(p, b)| (p.strip_prefix(dir).unwrap().to_path_buf(), b)).collect()
}

/// Entries of a folder whose names contain `needle` (temporary folders left behind).
pub fn leftovers(dir: &Path, needle: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(needle))
        .collect()
}

/// AMD-only cases of the manifest made for their unmerges, at r from 12 to 192, where both
/// processors sum a BAT merge's GEMM alike (each product fused, k in one block).
pub const SAME_MERGE_AMD: [&str; 4] = ["bone-bat-r18-f32", "bone-bat-r19-f32", "miss-bat-r45-f32", "miss-bat-r136-f32"];

/// The fixture manifest written by fixtures/generate.py.
pub fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap()
}

/// The manifest of the fixtures PEFT 0.21.2 made on transformers 5 (fixtures/transformers5.py).
pub fn transformers5_manifest() -> serde_json::Value {
    let path = fixtures().join("transformers5/manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Both manifests, each with the folder of its cases relative to fixtures/.
pub fn manifests() -> [(serde_json::Value, &'static str); 2] {
    [(manifest(), "cases"), (transformers5_manifest(), "transformers5/cases")]
}

/// Read the JSON file `path`, let `edit` change it, and write it back.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// The tensors as a checkpoint of the bare backbone names them (LlamaModel's `layers.0.…` for
/// LlamaForCausalLM's `model.layers.0.…`): without the outer `model.`.
pub fn bare_backbone(t: BTreeMap<String, T>) -> BTreeMap<String, T> {
    t.into_iter().map(|(k, v)| (k.strip_prefix("model.").map(str::to_string).unwrap_or(k), v)).collect()
}

/// Load a safetensors file, `edit` its tensors, and save it back (tests that alter an input).
pub fn edit_tensors(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, T>)) {
    let mut t = load(path);
    edit(&mut t);
    save(path, &t);
}

/// The tensor of a checkpoint (`tensors`) that the module path `module` names, found independently
/// of bone-tool: `<module>.weight`, or where the vision-language fixtures (saved by transformers
/// 4.57, which renames keys on loading and back on saving) store it: LLaVA's
/// `language_model.model.`, `vision_tower.`, `multi_modal_projector.` and `language_model.lm_head`,
/// Qwen2.5-VL's `model.` and `visual.`.
pub fn stored_tensor(tensors: &BTreeMap<String, T>, module: &str) -> String {
    let name = format!("{module}.weight");
    let renames = [
        ("model.language_model.", "language_model.model."),
        ("model.language_model.", "model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.visual.", "visual."),
        ("lm_head.", "language_model.lm_head."),
        // transformers 5 (fixtures/transformers5): LLaVA's CLIP tower without its `vision_model.`,
        // GPT-NeoX's output layer
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("lm_head.", "embed_out."),
    ];
    let candidates = renames.iter().filter_map(|(m, s)| name.strip_prefix(m).map(|rest| format!("{s}{rest}")));
    std::iter::once(name.clone()).chain(candidates).find(|n| tensors.contains_key(n)).unwrap_or(name)
}
