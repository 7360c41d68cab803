//! `bone-tool convert` against PEFT: fixtures/generate.py converted adapters with bone-tool, had
//! PEFT 0.18.1 load each result (`PeftConfig`/`PeftModel.from_pretrained`) and merge it;
//! fixtures/transformers5.py did the same with PEFT 0.21.2 on transformers 5 for adapters keyed by
//! transformers 5's module paths (fixtures/transformers5/manifest.json). Here:
//! - bone-tool still writes exactly those adapters (so PEFT's verdict holds for today's code);
//! - for exact conversions, PEFT's merge of the converted adapter equals its merge of the
//!   original, value for value (at most one ulp apart);
//! - `bone-tool merge` of a Bone → MiSS conversion gives the Bone input's bytes;
//! - BAT → LoRA: the reported per-layer error equals an independent f64 computation from the
//!   base weights, the BAT blocks and the written LoRA factors.

mod common;
use common::*;
use std::path::Path;

/// The conversions of both manifests (PEFT 0.18.1's, and PEFT 0.21.2's on transformers 5), each
/// with `source`: the folder of the adapter converted, relative to fixtures/.
fn conversions() -> Vec<serde_json::Value> {
    manifests()
        .into_iter()
        .flat_map(|(m, cases)| {
            let convs = m["conversions"].as_array().cloned().unwrap_or_default();
            convs.into_iter().map(move |mut c| {
                c["source"] = format!("{cases}/{}/adapter", c["case"].as_str().unwrap()).into();
                c
            })
        })
        .collect()
}

fn convert(conv: &serde_json::Value, out: &Path, json: bool) -> serde_json::Value {
    let mut args: Vec<String> = vec![
        "convert".into(),
        fixtures().join(conv["source"].as_str().unwrap()).display().to_string(),
        "--to".into(),
        conv["to"].as_str().unwrap().into(),
        "--out".into(),
        out.display().to_string(),
        "--base".into(),
        fixtures().join(conv["base"].as_str().unwrap()).display().to_string(),
    ];
    args.extend(conv["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()));
    if json {
        args.push("--json".into());
    }
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&o);
    if json {
        serde_json::from_str(&stdout(&o)).unwrap()
    } else {
        serde_json::Value::Null
    }
}

#[test]
fn conversions_are_the_adapters_peft_loaded() {
    let convs = conversions();
    assert!(convs.len() >= 15, "the manifests list the conversions");
    let tf5 = convs.iter().filter(|c| c["source"].as_str().unwrap().starts_with("transformers5/")).count();
    assert!(tf5 >= 3, "fixtures/transformers5/manifest.json lists {tf5} conversions");
    let tmp = tempfile::tempdir().unwrap();
    for (n, conv) in convs.iter().enumerate() {
        let out = tmp.path().join(format!("c{n}"));
        convert(conv, &out, false);
        let committed = fixtures().join(conv["adapter"].as_str().unwrap());
        let (ours, theirs) =
            (load(&out.join("adapter_model.safetensors")), load(&committed.join("adapter_model.safetensors")));
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{conv}");
        for (k, t) in &ours {
            assert_eq!(t.shape, theirs[k].shape, "{conv}: {k}");
            if conv["exact"] == true {
                assert!(t.data == theirs[k].data, "{conv}: {k} changed");
            } else if k.ends_with(".lora_A.weight") {
                // An SVD's factors may differ in sign or last bits from one processor to another:
                // compare the product B·A, which is what PEFT merges.
                let bk = k.replace(".lora_A.", ".lora_B.");
                let (a1, b1, a2, b2) = (values(t), values(&ours[&bk]), values(&theirs[k]), values(&theirs[&bk]));
                let (kk, i) = (t.shape[0], t.shape[1]);
                let o = ours[&bk].shape[0];
                let (mut num, mut den) = (0f64, 0f64);
                for x in 0..o {
                    for y in 0..i {
                        let p1: f64 = (0..kk).map(|j| b1[x * kk + j] * a1[j * i + y]).sum();
                        let p2: f64 = (0..kk).map(|j| b2[x * kk + j] * a2[j * i + y]).sum();
                        num += (p1 - p2).powi(2);
                        den += p2 * p2;
                    }
                }
                assert!((num / den).sqrt() < 1e-4, "{conv}: {k}: B·A moved by {}", (num / den).sqrt());
            }
        }
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap()
        };
        assert_eq!(read(&out), read(&committed), "{conv}: adapter_config.json");
        assert_eq!(file_metadata(&out.join("adapter_model.safetensors")).get("format").map(String::as_str), Some("pt"));
    }
}

#[test]
fn exact_conversions_merge_to_the_original_merge_in_peft() {
    let mut checked = 0;
    for conv in conversions().iter().filter(|c| c["exact"] == true) {
        let original = load(&fixtures().join(conv["source"].as_str().unwrap()).with_file_name("merged"));
        let converted = load(&fixtures().join(conv["merged"].as_str().unwrap()));
        assert_eq!(original.keys().collect::<Vec<_>>(), converted.keys().collect::<Vec<_>>());
        for (k, t) in &original {
            let far = bits(t).iter().zip(bits(&converted[k])).filter(|(a, b)| (*a - b).abs() > 1).count();
            assert_eq!(far, 0, "{conv}: {k}: {far} values more than one ulp from the original merge");
        }
        checked += 1;
    }
    assert!(checked >= 11, "{checked}");
}

#[test]
fn bone_to_miss_merges_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["bone-default-tail-bf16", "bone-bat-f32", "bone-bat-sharded-f32"] {
        let c = manifest()["cases"].as_array().unwrap().iter().find(|c| c["name"] == case).unwrap().clone();
        let base = fixtures().join(c["base"].as_str().unwrap());
        let adapter = fixtures().join("cases").join(case).join("adapter");
        let miss = tmp.path().join(format!("{case}-miss"));
        ok(&run(&["-q", "convert", adapter.to_str().unwrap(), "--to", "miss", "--out", miss.to_str().unwrap()]));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(miss.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], "MISS");
        assert!(load(&miss.join("adapter_model.safetensors")).keys().all(|k| k.ends_with(".miss_block")));
        let (m1, m2) = (tmp.path().join(format!("{case}-m1")), tmp.path().join(format!("{case}-m2")));
        merge(&base, &adapter, &m1);
        merge(&base, &miss, &m2);
        let (x, y) = (load(&m1), load(&m2));
        assert!(x.iter().all(|(k, t)| y[k].data == t.data), "{case}");
        // `--adapter DIR`, as merge spells it, writes the same files as the positional ADAPTER
        let flag = tmp.path().join(format!("{case}-flag"));
        ok(&run(&[
            "-q",
            "convert",
            "--adapter",
            adapter.to_str().unwrap(),
            "--to",
            "miss",
            "--out",
            flag.to_str().unwrap(),
        ]));
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(std::fs::read(miss.join(f)).unwrap() == std::fs::read(flag.join(f)).unwrap(), "{case} {f}");
        }
    }
}

#[test]
fn bat_to_lora_reports_the_error_an_independent_computation_finds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    // as the fixtures were made (factors in f32), and at full rank in bf16, where the rounding of
    // the factors is all the error: the error reported is that of the factors written
    let bf16 = |c: &serde_json::Value| {
        let mut c = c.clone();
        c["args"] = serde_json::json!(["--energy", "1", "--dtype", "bf16"]);
        c
    };
    let convs: Vec<_> = conversions().into_iter().filter(|c| c["exact"] == false).flat_map(|c| [bf16(&c), c]).collect();
    for conv in &convs {
        let out = tmp.path().join("lora");
        let _ = std::fs::remove_dir_all(&out);
        let report = convert(conv, &out, true);
        let want =
            if conv["args"].to_string().contains("bf16") { safetensors::Dtype::BF16 } else { safetensors::Dtype::F32 };
        let case = conv["case"].as_str().unwrap();
        let base = load(&fixtures().join(conv["base"].as_str().unwrap()));
        let bat = load(&fixtures().join(conv["source"].as_str().unwrap()).join("adapter_model.safetensors"));
        let lora = load(&out.join("adapter_model.safetensors"));
        let (mut num_all, mut den_all) = (0f64, 0f64);
        for layer in report["layers"].as_array().unwrap() {
            let module = layer["module"].as_str().unwrap();
            let w = &base[&stored_tensor(&base, module)];
            let (o, i) = (w.shape[0], w.shape[1]);
            let wv = values(w);
            let key =
                &format!("base_model.model.{module}.{}_block", if case.starts_with("miss") { "miss" } else { "bone" });
            let b = values(&bat[key]);
            let r = bat[key].shape[2];
            let a_key = format!("base_model.model.{module}.lora_A.weight");
            let b_key = format!("base_model.model.{module}.lora_B.weight");
            let (la, lb) = (values(&lora[&a_key]), values(&lora[&b_key]));
            let k = lora[&a_key].shape[0];
            assert_eq!(layer["rank"], k);
            assert_eq!((lora[&a_key].dtype, lora[&b_key].dtype), (want, want), "{case} {module}");
            // Δ_ij = W_ij·B_i + B_i, tile by tile, in f64
            let (mut num, mut den) = (0f64, 0f64);
            for oo in 0..o {
                let (bi, a) = (oo / r, oo % r);
                for c in 0..i {
                    let (bj, cc) = (c / r, c % r);
                    let mut d = b[bi * r * r + a * r + cc];
                    for t in 0..r {
                        d += wv[oo * i + bj * r + t] * b[bi * r * r + t * r + cc];
                    }
                    let approx: f64 = (0..k).map(|j| lb[oo * k + j] * la[j * i + c]).sum();
                    num += (d - approx).powi(2);
                    den += d * d;
                }
            }
            let rel = (num / den).sqrt();
            let reported = layer["rel_error"].as_f64().unwrap();
            assert!(want == safetensors::Dtype::F32 || rel > 1e-4, "{case} {module}: bf16 factors, error {rel}");
            assert!(
                (rel - reported).abs() <= 1e-4 * rel.max(1e-6) + 1e-7,
                "{case} {module}: reported {reported}, computed {rel}"
            );
            num_all += num;
            den_all += den;
            checked += 1;
        }
        let total = (num_all / den_all).sqrt();
        let reported = report["total_rel_error"].as_f64().unwrap();
        assert!((total - reported).abs() <= 1e-4 * total, "{case}: total {reported} vs {total}");
    }
    assert!(checked >= 90, "{checked}");
}

#[test]
fn convert_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let bat = fixtures().join("cases/bone-bat-f32/adapter");
    let base = fixtures().join("bases/llama-f32");
    let out = tmp.path().join("o");
    let o_s = out.to_str().unwrap();
    let expect = |args: &[&str], needles: &[&str]| {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: missing {n:?} in {err}");
        }
        assert!(!out.exists());
    };
    // a LoRA adapter
    let lora = tmp.path().join("lora-in");
    copy_dir(&fixtures().join("cases/bone-default-f32/converted-lora/adapter"), &lora);
    expect(&["convert", lora.to_str().unwrap(), "--to", "miss", "--out", o_s], &["\"LORA\"", "Bone and MiSS"]);
    // BAT -> LoRA without a base (and a base_model_name_or_path that is no local folder)
    let moved = tmp.path().join("bat");
    copy_dir(&bat, &moved);
    let cfg = moved.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("fixtures/bases/llama-f32", "someone/llama-on-the-hub");
    std::fs::write(&cfg, text).unwrap();
    expect(
        &["convert", moved.to_str().unwrap(), "--to", "lora", "--rank", "4", "--out", o_s],
        &["--base", "someone/llama-on-the-hub"],
    );
    // BAT -> LoRA without a rank rule
    expect(
        &["convert", bat.to_str().unwrap(), "--to", "lora", "--base", base.to_str().unwrap(), "--out", o_s],
        &["--rank N or --energy F"],
    );
    // a rank larger than the layer (k_proj is [24, 48])
    expect(
        &[
            "convert",
            bat.to_str().unwrap(),
            "--to",
            "lora",
            "--base",
            base.to_str().unwrap(),
            "--rank",
            "30",
            "--out",
            o_s,
        ],
        &["rank 30", "k_proj", "min(out, in) = 24"],
    );
    // energy outside (0, 1]
    for e in ["0", "1.5", "-0.1"] {
        expect(
            &[
                "convert",
                bat.to_str().unwrap(),
                "--to",
                "lora",
                "--base",
                base.to_str().unwrap(),
                "--energy",
                e,
                "--out",
                o_s,
            ],
            &["--energy", "(0, 1]"],
        );
    }
    // Bone to Bone
    expect(&["convert", bat.to_str().unwrap(), "--to", "bone", "--out", o_s], &["already a Bone adapter"]);
}

#[test]
fn dtype_rounds_the_written_tensors_and_says_what_that_cost() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("cases/bone-default-f32/adapter");
    let src = load(&adapter.join("adapter_model.safetensors"));
    let convert = |to: &str, dtype: &str, out: &Path| {
        let mut args = vec!["convert", adapter.to_str().unwrap(), "--to", to, "--out", out.to_str().unwrap()];
        args.extend(["--base", "fixtures/bases/llama-f32", "--dtype", dtype, "--json"]);
        let o = bin().current_dir(root()).args(&args).output().unwrap();
        ok(&o);
        (serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap(), stderr(&o))
    };
    // Bone -> MiSS in bf16: each value rounded to nearest; how many changed and by how much, said
    let out = tmp.path().join("bf16");
    let (report, err) = convert("miss", "bf16", &out);
    let dst = load(&out.join("adapter_model.safetensors"));
    let (mut changed, mut num, mut den) = (0u64, 0f64, 0f64);
    for (k, t) in &src {
        let d = &dst[&k.replace(".bone_block", ".miss_block")];
        assert_eq!(d.dtype, safetensors::Dtype::BF16);
        for (a, b) in values(t).iter().zip(values(d)) {
            assert_eq!(half::bf16::from_f64(*a).to_f64(), b, "{k}");
            changed += u64::from(*a != b);
            num += (a - b).powi(2);
            den += a * a;
        }
    }
    assert!(changed > 1000, "{changed}");
    assert_eq!((report["exact"].clone(), report["rounded_values"].as_u64()), (false.into(), Some(changed)));
    let total = report["total_rel_error"].as_f64().unwrap();
    assert!((total - (num / den).sqrt()).abs() <= 1e-9 * total, "{total} vs {}", (num / den).sqrt());
    assert!(err.contains(&format!("--dtype bf16 rounded {changed} of the adapter's block values")), "{err}");
    // default -> LoRA in f16: A stays exact, and the error is that of B·A against the block's delta
    // (Δ[x, c] = block[c mod r, x], in f64 from the f32 file)
    let out = tmp.path().join("lora-f16");
    let (report, err) = convert("lora", "f16", &out);
    assert!(err.contains("--dtype f16 rounded"), "{err}");
    let lora = load(&out.join("adapter_model.safetensors"));
    let (mut num_all, mut den_all) = (0f64, 0f64);
    for layer in report["layers"].as_array().unwrap() {
        let module = layer["module"].as_str().unwrap();
        let block = &src[&format!("base_model.model.{module}.bone_block")];
        let (r, o) = (block.shape[0], block.shape[1]);
        let bv = values(block);
        let la = values(&lora[&format!("base_model.model.{module}.lora_A.weight")]);
        let lb = values(&lora[&format!("base_model.model.{module}.lora_B.weight")]);
        let i = la.len() / r;
        let (mut num, mut den) = (0f64, 0f64);
        for x in 0..o {
            for c in 0..i {
                let d = bv[(c % r) * o + x];
                let approx: f64 = (0..r).map(|j| lb[x * r + j] * la[j * i + c]).sum();
                num += (d - approx).powi(2);
                den += d * d;
            }
        }
        let (rel, reported) = ((num / den).sqrt(), layer["rel_error"].as_f64().unwrap());
        assert!(rel > 1e-5 && (rel - reported).abs() <= 1e-9 * rel, "{module}: reported {reported}, computed {rel}");
        (num_all, den_all) = (num_all + num, den_all + den);
    }
    let total = report["total_rel_error"].as_f64().unwrap();
    assert!((total - (num_all / den_all).sqrt()).abs() <= 1e-9 * total);
    // f32 keeps every value: exact, nothing said
    let (report, err) = convert("miss", "f32", &tmp.path().join("f32"));
    assert_eq!((report["exact"].clone(), report["rounded_values"].as_u64()), (true.into(), Some(0)));
    assert!(!err.contains("rounded"), "{err}");
    // a value beyond f16's range: an error naming the tensor, nothing written
    let big = tmp.path().join("big");
    copy_dir(&adapter, &big);
    let name = src.keys().next().unwrap().clone();
    edit_tensors(&big.join("adapter_model.safetensors"), |t| {
        let v = t.get_mut(&name).unwrap();
        v.data[..4].copy_from_slice(&1e6f32.to_le_bytes());
    });
    let out = tmp.path().join("f16");
    let o = run(&["convert", big.to_str().unwrap(), "--to", "miss", "--dtype", "f16", "--out", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&name) && err.contains("does not fit in F16") && err.contains("65504"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_rank_that_does_not_apply_is_said_to_be_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("cases/miss-default-f32/adapter");
    let written = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["convert", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend(["--base", "fixtures/bases/llama-f32"]);
        args.extend(extra);
        let o = bin().current_dir(root()).args(&args).output().unwrap();
        ok(&o);
        (std::fs::read(out.join("adapter_model.safetensors")).unwrap(), stderr(&o))
    };
    // a default adapter converts exactly at its own r (16), as PEFT's convert_to_lora does
    let (plain, _) = written("lora", &["--to", "lora"]);
    let (ranked, err) = written("lora-4", &["--to", "lora", "--rank", "4"]);
    assert_eq!(plain, ranked);
    assert!(err.contains("--rank 4 is ignored") && err.contains("r = 16"), "{err}");
    let (_, err) = written("bone", &["--to", "bone", "--energy", "0.5"]);
    assert!(err.contains("--energy 0.5 is ignored") && err.contains("converts to Bone"), "{err}");
}

#[test]
fn bat_factors_are_f32_unless_dtype_says_otherwise() {
    // new values from an SVD: f32 by default, as PEFT's convert_to_lora stores them for an adapter
    // it loaded (its bf16 blocks upcast); --dtype keep keeps the blocks' bf16
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("cases/bone-bat-f16-blocks-bf16/adapter");
    let base = fixtures().join("bases/llama-f16");
    for (extra, want) in [(&[][..], safetensors::Dtype::F32), (&["--dtype", "keep"][..], safetensors::Dtype::BF16)] {
        let out = tmp.path().join(format!("{want:?}"));
        let mut args = vec!["-q", "convert", adapter.to_str().unwrap(), "--to", "lora", "--rank", "4"];
        args.extend(["--base", base.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        args.extend(extra);
        ok(&run(&args));
        let lora = load(&out.join("adapter_model.safetensors"));
        assert!(lora.len() >= 12 && lora.values().all(|t| t.dtype == want), "{extra:?}");
    }
}
