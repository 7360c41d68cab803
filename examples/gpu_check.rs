//! The GPU acceptance check: every fixture case merged and unmerged with `--device cuda` and with
//! `--device cpu`, every output tensor compared: the same bytes (BAT too: the GPU's GEMM kernel sums
//! in the CPU's order). With `BONE_TOOL_GEMM=cublas`, whose GEMMs sum in their own order, at most
//! one unit in the last place apart, or in f32 within 2^-18 of the tensor's largest value
//! (`Float::disagreement` says why). The f16/bf16 BAT cases are also merged with `--rounding
//! once`, and those whose PEFT merge differs on an AMD processor (and the AMD-only wide case) with
//! `--bat-sums amd`, the GEMM kernel's other ways of summing.
//!
//!   gpu_check BONE_TOOL_BINARY FIXTURES_DIR [CASE_SUBSTRING,...]
//!
//! With a third argument only the cases whose names contain one of the substrings are run.
//! Exit 0: every tensor agrees. Exit 1: a difference (listed). Exit 2: no usable GPU (the
//! reason is printed): this check then checked nothing.

use bone_tool::ops::dtype::Float;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn load(dir: &Path) -> BTreeMap<String, (Dtype, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, v) in st.tensors() {
                out.insert(name, (v.dtype(), v.data().to_vec()));
            }
        }
    }
    out
}

/// How a device's tensor compares with the CPU's: None when the bytes are equal, else the largest
/// distance in units and, when `Float::disagreement` rejects it, the first element it rejects.
fn compare(d: Dtype, cpu: &[u8], dev: &[u8]) -> Option<(u64, Option<String>)> {
    if cpu == dev {
        return None;
    }
    let Some(f) = Float::from_dtype(d) else {
        return Some((u64::MAX, Some("a non-float tensor differs".into())));
    };
    let (mut x, mut y) = (vec![0f32; cpu.len() / f.size()], vec![0f32; dev.len() / f.size()]);
    f.decode(cpu, &mut x);
    f.decode(dev, &mut y);
    let units = x.iter().zip(&y).map(|(p, q)| f.ulps(*p, *q)).max().unwrap_or(0);
    let bad = f.disagreement(&x, &y).map(|k| format!("element {k}: CPU {} vs GPU {}", x[k], y[k]));
    Some((units, bad))
}

/// What the runs found: failures, tensors compared, and differences within the criterion.
#[derive(Default)]
struct Tally {
    failures: usize,
    compared: usize,
    notes: Vec<String>,
}

/// `cmd` (merge or unmerge) of `model` with `adapters` on the CPU and on cuda, every output tensor
/// compared (`exact`: the same bytes). Exits 2 when no GPU is usable.
#[allow(clippy::too_many_arguments)]
fn cpu_and_cuda(
    bin: &Path,
    tmp: &Path,
    name: &str,
    cmd: &str,
    model: &Path,
    adapters: &[PathBuf],
    extra: &[&str],
    exact: bool,
    tally: &mut Tally,
) {
    let mut outs = vec![];
    for device in ["cpu", "cuda"] {
        let out = tmp.join(format!("{name}-{cmd}-{device}"));
        let mut command = Command::new(bin);
        command.args(["-q", cmd, if cmd == "merge" { "--base" } else { "--merged" }]).arg(model);
        for a in adapters {
            command.arg("--adapter").arg(a);
        }
        command.arg("--out").arg(&out).args(["--device", device]).args(extra);
        if device == "cuda" {
            command.arg("--all-on-gpu"); // else the CPU computes the adds while it starts
        }
        let o = command.output().expect("run bone-tool");
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            if device == "cuda" && err.contains("no usable GPU") {
                println!("NO GPU: {}", err.trim());
                println!("gpu_check checked nothing");
                std::process::exit(2);
            }
            println!("FAIL {name} {cmd} --device {device}: {}", err.trim());
            tally.failures += 1;
            return;
        }
        outs.push(load(&out));
    }
    for (t, (d, cpu)) in &outs[0] {
        let (_, gpu) = &outs[1][t];
        tally.compared += 1;
        match compare(*d, cpu, gpu) {
            None => {}
            Some((u, Some(bad))) => {
                println!("FAIL {name} {cmd} {t}: up to {u} units apart; {bad}");
                tally.failures += 1;
            }
            Some((u, None)) if exact => {
                println!("FAIL {name} {cmd} {t}: not the CPU's bytes (up to {u} units apart)");
                tally.failures += 1;
            }
            Some((u, None)) => tally.notes.push(format!("{name} {cmd} {t}: up to {u} units apart")),
        }
    }
}

/// A copy of the model folder `base` in `dir` whose 2-D float tensors hold NaNs at every 7th
/// element: quiet and signalling, with payloads, of either sign. A default/mini merge or unmerge
/// gives each that NaN, quieted, on the CPU (x86, torch); the kernels must too, where a GPU's own
/// arithmetic gives its canonical NaN.
fn with_nans(base: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(base).unwrap() {
        let p = e.unwrap().path();
        let to = dir.join(p.file_name().unwrap());
        if p.extension() != Some(std::ffi::OsStr::new("safetensors")) {
            std::fs::copy(&p, &to).unwrap();
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = vec![];
        for (name, v) in st.tensors() {
            let mut data = v.data().to_vec();
            if let Some(d) = Float::from_dtype(v.dtype()).filter(|_| v.shape().len() == 2) {
                d.put_test_nans(&mut data);
            }
            tensors.push((name, v.dtype(), v.shape().to_vec(), data));
        }
        let views: Vec<(String, TensorView)> =
            tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &to).unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = PathBuf::from(args.get(1).cloned().unwrap_or_else(|| "target/release/bone-tool".into()));
    let fixtures = PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "fixtures".into()));
    let read = |path: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .unwrap()
    };
    // PEFT 0.18.1's cases, and PEFT 0.21.2's on transformers 5 (merged with --rounding once)
    let manifests = [
        (read(fixtures.join("manifest.json")), "cases"),
        (read(fixtures.join("transformers5/manifest.json")), "transformers5/cases"),
    ];
    let tmp = std::env::temp_dir().join(format!("bone-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let exact = std::env::var("BONE_TOOL_GEMM").as_deref() != Ok("cublas");
    let mut tally = Tally::default();
    let only: Vec<String> = args.get(3).map(|a| a.split(',').map(str::to_string).collect()).unwrap_or_default();
    let chosen = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    // default and mini cases whose bases get NaN weights (the last a chain of two adapters)
    let with_nan_weights = [
        "bone-default-f32",
        "bone-default-tail-bf16",
        "bone-default-f16-blocks-f16",
        "miss-mini-bf16",
        "bone-stacked-default-bf16",
    ];
    let cases = manifests.iter().flat_map(|(m, folder)| {
        let once = m["rounding"] == "once";
        m["cases"].as_array().unwrap().iter().map(move |c| (c, *folder, once))
    });
    for (c, folder, once) in cases {
        let name = c["name"].as_str().unwrap();
        if !chosen(name) {
            continue;
        }
        let adapters: Vec<PathBuf> =
            c["adapters"].as_array().unwrap().iter().map(|a| fixtures.join(a.as_str().unwrap())).collect();
        let extra: &[&str] = if c["autocast_adapter_dtype"] == false { &["--no-autocast-adapter-dtype"] } else { &[] };
        let base = fixtures.join(c["base"].as_str().unwrap());
        for cmd in ["merge", "unmerge"] {
            let model = if cmd == "merge" { base.clone() } else { fixtures.join(folder).join(name).join("merged") };
            let extra = [extra, if once && cmd == "merge" { &["--rounding", "once"] } else { &[] }].concat();
            cpu_and_cuda(&bin, &tmp, name, cmd, &model, &adapters, &extra, exact, &mut tally);
        }
        // f16/bf16 BAT also rounded once (`bat_merge_post`'s other path), as PEFT's safe merge
        if !once && c["merged_safe"].is_string() {
            let extra = [extra, &["--rounding", "once"]].concat();
            cpu_and_cuda(&bin, &tmp, &format!("{name}-once"), "merge", &base, &adapters, &extra, exact, &mut tally);
        }
        // PEFT's BAT merges made on an AMD processor: the GEMM kernel's other sums (--bat-sums amd)
        for (key, rounding) in [("merged_amd", &[][..]), ("merged_safe_amd", &["--rounding", "once"][..])] {
            if c[key].is_string() {
                let extra = [extra, rounding, &["--bat-sums", "amd"]].concat();
                cpu_and_cuda(
                    &bin,
                    &tmp,
                    &format!("{name}-{key}"),
                    "merge",
                    &base,
                    &adapters,
                    &extra,
                    exact,
                    &mut tally,
                );
            }
        }
        if with_nan_weights.contains(&name) {
            let nan_base = tmp.join(format!("{name}-nan-base"));
            with_nans(&fixtures.join(c["base"].as_str().unwrap()), &nan_base);
            for cmd in ["merge", "unmerge"] {
                let what = format!("{name}-nan-weights");
                cpu_and_cuda(&bin, &tmp, &what, cmd, &nan_base, &adapters, extra, true, &mut tally);
            }
        }
    }
    // the AMD-only cases (r = 200: the AMD processor's blocks of k of 100; r = 9 to 11: MKL's sums at
    // the heads of rows, which only the CPU computes, also under --device cuda), and their unmerges
    // where PEFT's is kept (the AMD inverses at r = 18 to 45 and 200, taken on the host; at r = 8
    // to 11 MKL's dot products on weights of a single block row or column, only on the CPU)
    for c in manifests[0].0["amd"].as_array().unwrap().iter().filter(|c| chosen(c["name"].as_str().unwrap())) {
        let adapters: Vec<PathBuf> =
            c["adapters"].as_array().unwrap().iter().map(|a| fixtures.join(a.as_str().unwrap())).collect();
        let base = fixtures.join(c["base"].as_str().unwrap());
        let what = format!("{}-amd", c["name"].as_str().unwrap());
        cpu_and_cuda(&bin, &tmp, &what, "merge", &base, &adapters, &["--bat-sums", "amd"], exact, &mut tally);
        if c["unmerged_amd"].is_string() {
            let merged = fixtures.join(c["merged_amd"].as_str().unwrap());
            let what = format!("{}-unmerge-amd", c["name"].as_str().unwrap());
            cpu_and_cuda(&bin, &tmp, &what, "unmerge", &merged, &adapters, &["--bat-sums", "amd"], exact, &mut tally);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !tally.notes.is_empty() {
        println!("{} tensors differ within the criterion (summation order), for example:", tally.notes.len());
        for n in tally.notes.iter().take(5) {
            println!("  {n}");
        }
    }
    println!("{} tensors compared, {} failures", tally.compared, tally.failures);
    std::process::exit(if tally.failures == 0 { 0 } else { 1 });
}
