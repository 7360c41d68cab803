//! The GPU acceptance check: every fixture case merged and unmerged with `--device cuda` and with
//! `--device cpu`, every output tensor compared: the same bytes (BAT too: the GPU's GEMM kernel sums
//! in the CPU's order). With `BONE_TOOL_GEMM=cublas`, whose GEMMs sum in their own order, at most
//! one unit in the last place apart, or in f32 within 2^-18 of the tensor's largest value
//! (`Float::disagreement` says why).
//!
//!   gpu_check BONE_TOOL_BINARY FIXTURES_DIR [CASE_SUBSTRING,...]
//!
//! With a third argument only the cases whose names contain one of the substrings are run.
//! Exit 0: every tensor agrees. Exit 1: a difference (listed). Exit 2: no usable GPU (the
//! reason is printed): this check then checked nothing.

use bone_tool::ops::dtype::Float;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = PathBuf::from(args.get(1).cloned().unwrap_or_else(|| "target/release/bone-tool".into()));
    let fixtures = PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "fixtures".into()));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("manifest.json")).unwrap()).unwrap();
    let tmp = std::env::temp_dir().join(format!("bone-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut failures = 0;
    let exact = std::env::var("BONE_TOOL_GEMM").as_deref() != Ok("cublas");
    // tensors that differ within the criterion (summation order): counted, a few shown
    let mut notes: Vec<String> = vec![];
    let mut compared = 0;
    let only: Vec<String> = args.get(3).map(|a| a.split(',').map(str::to_string).collect()).unwrap_or_default();
    for c in manifest["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        for cmd in ["merge", "unmerge"] {
            let model = if cmd == "merge" {
                fixtures.join(c["base"].as_str().unwrap())
            } else {
                fixtures.join("cases").join(name).join("merged")
            };
            let mut outs = vec![];
            for device in ["cpu", "cuda"] {
                let out = tmp.join(format!("{name}-{cmd}-{device}"));
                let mut command = Command::new(&bin);
                command.args(["-q", cmd, if cmd == "merge" { "--base" } else { "--merged" }]).arg(&model);
                for a in c["adapters"].as_array().unwrap() {
                    command.arg("--adapter").arg(fixtures.join(a.as_str().unwrap()));
                }
                command.arg("--out").arg(&out).args(["--device", device]);
                if device == "cuda" {
                    command.arg("--all-on-gpu"); // else the CPU computes the adds while it starts
                }
                if c["autocast_adapter_dtype"] == false {
                    command.arg("--no-autocast-adapter-dtype");
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
                    failures += 1;
                    continue;
                }
                outs.push(load(&out));
            }
            if outs.len() != 2 {
                continue;
            }
            for (t, (d, cpu)) in &outs[0] {
                let (_, gpu) = &outs[1][t];
                compared += 1;
                match compare(*d, cpu, gpu) {
                    None => {}
                    Some((u, Some(bad))) => {
                        println!("FAIL {name} {cmd} {t}: up to {u} units apart; {bad}");
                        failures += 1;
                    }
                    Some((u, None)) if exact => {
                        println!("FAIL {name} {cmd} {t}: not the CPU's bytes (up to {u} units apart)");
                        failures += 1;
                    }
                    Some((u, None)) => notes.push(format!("{name} {cmd} {t}: up to {u} units apart")),
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !notes.is_empty() {
        println!("{} tensors differ within the criterion (summation order), for example:", notes.len());
        for n in notes.iter().take(5) {
            println!("  {n}");
        }
    }
    println!("{compared} tensors compared, {failures} failures");
    std::process::exit(if failures == 0 { 0 } else { 1 });
}
