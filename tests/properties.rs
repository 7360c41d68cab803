//! Properties checked with independent arithmetic (f64, written here, not bone-tool's code):
//! - default/mini: `x·W'ᵀ` of the merged weight equals the adapter's forward `x·Wᵀ + s(x)·E`
//!   (`s(x)[k] = Σ_{c mod r = k} x[c]`) on random inputs, within the rounding of the weight dtype;
//! - f32: unmerge∘merge gives back the base within f32 rounding, for every variant.

mod common;
use common::*;
use std::path::Path;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

fn config(adapter: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap()
}

/// Unit roundoff of a dtype, 2^-p for p significant bits (the implicit one included): f32 24,
/// f16 11, bf16 8.
fn unit_roundoff(d: safetensors::Dtype) -> f64 {
    match d {
        safetensors::Dtype::F32 => 2f64.powi(-24),
        safetensors::Dtype::F16 => 2f64.powi(-11),
        safetensors::Dtype::BF16 => 2f64.powi(-8),
        other => panic!("{other:?}"),
    }
}

#[test]
fn merged_default_and_mini_weights_equal_the_adapter_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut rng = Lcg(42);
    for c in manifest()["cases"].as_array().unwrap() {
        let adapters = c["adapters"].as_array().unwrap();
        if adapters.len() != 1 || c["autocast_adapter_dtype"] == false {
            continue;
        }
        let adapter = fixtures().join(adapters[0].as_str().unwrap());
        let cfg = config(&adapter);
        let mini = cfg["init_weights"] == "mini";
        if cfg["init_weights"] == "bat" {
            continue;
        }
        let base = fixtures().join(c["base"].as_str().unwrap());
        let out = tmp.path().join(c["name"].as_str().unwrap());
        merge(&base, &adapter, &out);
        let (w_all, m_all) = (load(&base), load(&out));
        let blocks = load(&adapter.join("adapter_model.safetensors"));
        // the modules PEFT put no layer on (its config does not target them): left as they were
        let untargeted: Vec<&str> =
            c["untargeted"][0].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        for (key, blk) in blocks.iter().filter(|(k, _)| k.ends_with("_block")) {
            let module = key.trim_start_matches("base_model.model.").rsplit_once('.').unwrap().0;
            let name = stored_tensor(&w_all, module);
            let (w, m) = (&w_all[&name], &m_all[&name]);
            if untargeted.contains(&module) {
                assert!(w.data == m.data, "{}: {name} is not targeted, yet changed", c["name"]);
                continue;
            }
            let (o, i) = (w.shape[0], w.shape[1]);
            let (wv, mv, e) = (values(w), values(m), values(blk));
            let (r, cols) = (blk.shape[0], blk.shape[1]);
            assert!(mini || cols == o);
            let u = unit_roundoff(m.dtype);
            for _ in 0..4 {
                let x: Vec<f64> = (0..i).map(|_| rng.next()).collect();
                let mut s = vec![0f64; r];
                for (c, xc) in x.iter().enumerate() {
                    s[c % r] += xc;
                }
                for oo in 0..o {
                    let merged: f64 = (0..i).map(|c| x[c] * mv[oo * i + c]).sum();
                    let base_part: f64 = (0..i).map(|c| x[c] * wv[oo * i + c]).sum();
                    let adapter_part: f64 = (0..r).map(|k| s[k] * e[k * cols + oo % cols]).sum();
                    // each merged element is (W + E)(1 + δ) with |δ| <= u (plus f32's own rounding of the sum)
                    let bound =
                        (u + 2f64.powi(-24)) * (0..i).map(|c| (x[c] * mv[oo * i + c]).abs()).sum::<f64>() * 1.01
                            + 1e-12;
                    let err = (merged - (base_part + adapter_part)).abs();
                    assert!(err <= bound, "{}: {name} row {oo}: |x·W'ᵀ - forward| = {err:e} > {bound:e}", c["name"]);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "checked {checked} layers");
}

#[test]
fn unmerge_after_merge_is_identity_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let base = fixtures().join(c["base"].as_str().unwrap());
        if !c["base"].as_str().unwrap().contains("f32") {
            continue;
        }
        let name = c["name"].as_str().unwrap();
        let merged = tmp.path().join(format!("{name}-m"));
        let back = tmp.path().join(format!("{name}-u"));
        let mut args: Vec<String> = vec!["-q".into(), "merge".into(), "--base".into(), base.display().to_string()];
        for a in c["adapters"].as_array().unwrap() {
            args.extend(["--adapter".into(), fixtures().join(a.as_str().unwrap()).display().to_string()]);
        }
        let tail: Vec<String> = args[4..].to_vec();
        args.extend(["--out".into(), merged.display().to_string()]);
        ok(&run(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        let mut uargs: Vec<String> =
            vec!["-q".into(), "unmerge".into(), "--merged".into(), merged.display().to_string()];
        uargs.extend(tail);
        uargs.extend(["--out".into(), back.display().to_string()]);
        ok(&run(&uargs.iter().map(String::as_str).collect::<Vec<_>>()));
        let (b, u, m) = (load(&base), load(&back), load(&merged));
        // f32 noise: BAT's r-long sums and its f32 inverse (PEFT's own, at r = 8, 12 and 16: the
        // same bytes) each part from exact by up to about r units of roundoff (2⁻²⁴)
        let r = c["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| config(&fixtures().join(a.as_str().unwrap()))["r"].as_u64().unwrap())
            .max()
            .unwrap();
        let rel = 1e-6f64.max(4.0 * r as f64 * 2f64.powi(-24));
        for (t, orig) in &b {
            let (bv, uv, mv) = (values(orig), values(&u[t]), values(&m[t]));
            let scale = bv.iter().fold(0f64, |a, v| a.max(v.abs()));
            for k in 0..bv.len() {
                let tol = rel * (bv[k].abs() + mv[k].abs() + 0.01 * scale);
                assert!(
                    (uv[k] - bv[k]).abs() <= tol,
                    "{name}: {t}[{k}]: {} after merge+unmerge, base {}",
                    uv[k],
                    bv[k]
                );
            }
            if orig.data != m[t].data {
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "checked {checked} changed tensors");
}
