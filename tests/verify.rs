//! `bone-tool verify` end to end: PEFT's merged fixtures verify; a tampered, truncated or padded
//! merged model does not, and the report names the tensor.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;

/// `bone-tool verify --base BASE --adapter ADAPTER --merged MERGED`, then `extra`.
fn verify_run(base: &Path, adapter: &Path, merged: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["verify", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--merged"];
    args.push(merged.to_str().unwrap());
    args.extend(extra);
    let o = run(&args);
    assert!(!stderr(&o).contains("panicked"));
    o
}

/// [`verify_run`] with `--json`: the exit code and the report.
fn verify(base: &Path, adapter: &Path, merged: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let o = verify_run(base, adapter, merged, &[&["--json"], extra].concat());
    (o.status.code(), serde_json::from_str(&stdout(&o)).unwrap_or(serde_json::Value::Null))
}

#[test]
fn peft_merges_verify() {
    let mut checked = 0;
    for c in manifest()["cases"].as_array().unwrap() {
        let adapters = c["adapters"].as_array().unwrap();
        if adapters.len() != 1 || c["expect"] != "bytes" || c["autocast_adapter_dtype"] == false {
            continue;
        }
        let case = fixtures().join("cases").join(c["name"].as_str().unwrap());
        let (code, j) = verify(
            &fixtures().join(c["base"].as_str().unwrap()),
            &fixtures().join(adapters[0].as_str().unwrap()),
            &case.join("merged"),
            &[],
        );
        assert_eq!(code, Some(0), "{}: {j}", c["name"]);
        assert_eq!(j["ok"], true);
        assert_eq!(j["equal"].as_u64().unwrap() as usize, j["tensors"].as_array().unwrap().len());
        assert!(j["seconds"].as_f64().unwrap() >= j["timings"]["wall"].as_f64().unwrap());
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn reverse_checks_an_unmerged_folder() {
    let case = fixtures().join("cases/miss-default-tail-f16");
    let (code, j) = verify(&case.join("unmerged"), &case.join("adapter"), &case.join("merged"), &["--reverse"]);
    assert_eq!(code, Some(0), "{j}");
    assert_eq!(j["direction"], "unmerge");
    // the base is not the unmerged folder (f16 rounding): reverse against the base fails
    let (code, _) =
        verify(&fixtures().join("bases/llama-f16"), &case.join("adapter"), &case.join("merged"), &["--reverse"]);
    assert_eq!(code, Some(1));
}

#[test]
fn tampered_missing_and_extra_tensors_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-default-tail-bf16");
    let base = fixtures().join("bases/llama-bf16");
    let adapter = case.join("adapter");
    let mut t = load(&case.join("merged/model.safetensors"));
    // flip one bit of one value of q_proj, drop the norm, add a stranger
    let q = "model.layers.0.self_attn.q_proj.weight";
    let mut tq = t[q].clone();
    tq.data[10] ^= 0x40;
    t.insert(q.into(), tq);
    t.remove("model.norm.weight");
    t.insert("stranger.weight".into(), f32_tensor(vec![2], &[1.0, 2.0]));
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    save(&bad.join("model.safetensors"), &t);
    let (code, j) = verify(&base, &adapter, &bad, &[]);
    assert_eq!(code, Some(1), "{j}");
    let status = |name: &str| {
        j["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .map(|x| x["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status(q).as_deref(), Some("differs"));
    assert_eq!(status("model.norm.weight").as_deref(), Some("missing"));
    assert_eq!(status("stranger.weight").as_deref(), Some("extra"));
    assert_eq!(j["ok"], false);
    // the text report names them too, and the error line says how many
    let o = verify_run(&base, &adapter, &bad, &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains(q) && out.contains("missing") && out.contains("stranger.weight"), "{out}");
    assert!(stderr(&o).contains("3 of 30 tensors differ or do not correspond"), "{}", stderr(&o));
}

#[test]
fn nan_weights_verify_whichever_nan_bits_the_merge_wrote() {
    // A bf16 base with NaN weights: bone-tool's merge keeps each NaN (quieted); PEFT's torch
    // writes every NaN an add makes as 0xffff (its vector loop; measured with PEFT 0.18.1 on this
    // fixture with NaNs put in). Both are the merge: verify accepts either, as within one ulp; a
    // NaN where the merge has a number still differs.
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("cases/bone-default-tail-bf16/adapter");
    let mut t = load(&fixtures().join("bases/llama-bf16/model.safetensors"));
    let q = "model.layers.0.self_attn.q_proj.weight";
    for (k, nan) in [(0, 0x7fc1u16), (7, 0x7f81), (14, 0xffc3)] {
        t.get_mut(q).unwrap().data[2 * k..2 * k + 2].copy_from_slice(&nan.to_le_bytes());
    }
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::copy(fixtures().join("bases/llama-bf16/config.json"), base.join("config.json")).unwrap();
    save(&base.join("model.safetensors"), &t);
    let merged = tmp.path().join("merged");
    merge(&base, &adapter, &merged);
    let ours = load(&merged.join("model.safetensors"));
    let word = |t: &T, k: usize| u16::from_le_bytes([t.data[2 * k], t.data[2 * k + 1]]);
    assert_eq!([0, 7, 14].map(|k| word(&ours[q], k)), [0x7fc1, 0x7fc1, 0xffc3], "each NaN, quieted");
    let (code, j) = verify(&base, &adapter, &merged, &[]);
    assert_eq!((code, j["equal"].as_u64()), (Some(0), Some(ours.len() as u64)), "{j}");
    // PEFT's bytes
    let mut peft = ours.clone();
    for k in [0, 7, 14] {
        peft.get_mut(q).unwrap().data[2 * k..2 * k + 2].copy_from_slice(&0xffffu16.to_le_bytes());
    }
    let theirs = tmp.path().join("peft");
    std::fs::create_dir(&theirs).unwrap();
    save(&theirs.join("model.safetensors"), &peft);
    let (code, j) = verify(&base, &adapter, &theirs, &[]);
    assert_eq!(code, Some(0), "{j}");
    let entry =
        |j: &serde_json::Value| j["tensors"].as_array().unwrap().iter().find(|x| x["name"] == q).cloned().unwrap();
    assert_eq!(entry(&j)["status"], "within_1_ulp", "{j}");
    // a number where the merge has a NaN
    let mut wrong = peft;
    wrong.get_mut(q).unwrap().data[0..2].copy_from_slice(&0x3f80u16.to_le_bytes());
    save(&theirs.join("model.safetensors"), &wrong);
    let (code, j) = verify(&base, &adapter, &theirs, &[]);
    assert_eq!((code, entry(&j)["status"].as_str()), (Some(1), Some("differs")), "{j}");
}

#[test]
fn verify_s_note_allows_one_percent_off_for_each_stacked_bat_adapter() {
    // Stacked BAT adapters each round their own deltas, so PEFT's merge on another processor can
    // part from bone-tool's in 1% of a tensor's values for each of them (seen: 1.1% with two at
    // r = 640). Here up_proj takes both adapters of the fixture, gate_proj one: 1.5% of the values
    // one unit off is PEFT-like in the first (the note), not in the second.
    let case = fixtures().join("cases/miss-stacked-bat-bf16");
    let base = fixtures().join("bases/llama-bf16");
    let tmp = tempfile::tempdir().unwrap();
    let check = |tensor: &str| -> serde_json::Value {
        let mut t = load(&case.join("merged/model.safetensors"));
        let x = t.get_mut(tensor).unwrap();
        let values: Vec<f32> =
            x.data.chunks(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect();
        let scale = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        // 1.5% of the values, two units off where they are below a quarter of the largest: more
        // than one ulp, less than two units of the dtype at the tensor's scale
        let off = values.len() * 3 / 200;
        let small: Vec<usize> = (0..values.len()).filter(|&k| values[k].abs() < scale / 4.0).collect();
        assert!(small.len() >= off);
        for k in 0..off {
            x.data[2 * small[k * small.len() / off]] ^= 2;
        }
        let dir = tmp.path().join(tensor);
        std::fs::create_dir(&dir).unwrap();
        save(&dir.join("model.safetensors"), &t);
        let mut args = vec!["verify", "--json", "--base", base.to_str().unwrap()];
        let (a1, a2) = (case.join("adapter-1"), case.join("adapter-2"));
        args.extend(["--adapter", a1.to_str().unwrap(), "--adapter", a2.to_str().unwrap()]);
        args.extend(["--merged", dir.to_str().unwrap()]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let both = check("model.layers.0.mlp.up_proj.weight");
    assert!(both["hint"].as_str().is_some_and(|h| h.contains("for each BAT adapter")), "{both}");
    let one = check("model.layers.0.mlp.gate_proj.weight");
    assert!(one["hint"].is_null(), "{one}");
}

#[test]
fn tolerance_accepts_peft_f32_bat_unmerge_and_still_refuses_a_wrong_adapter() {
    // PEFT's unmerge of f32 BAT inverts I + B in f32; bone-tool does it as torch does up to r = 128
    // on either processor, and in f64 above: PEFT's unmerge (on the AMD processor) at r = 200
    // (`unmerged-amd` of the AMD-only case miss-bat-r200-f32) then differs in many values by more
    // than one ulp, all of them by far less than 1e-5 of the tensor's largest value
    for r in ["cases/bone-bat-f32", "cases/miss-bat-f32"] {
        let c = fixtures().join(r);
        let (code, j) = verify(&c.join("unmerged"), &c.join("adapter"), &c.join("merged"), &["--reverse"]);
        assert_eq!((code, &j["differs"], &j["within_1_ulp"]), (Some(0), &0.into(), &0.into()), "{r}: {j}");
    }
    let case = fixtures().join("cases/miss-bat-r200-f32");
    let (unmerged, adapter, merged) = (case.join("unmerged-amd"), case.join("adapter"), case.join("merged-amd"));
    let (code, j) = verify(&unmerged, &adapter, &merged, &["--reverse"]);
    assert_eq!(code, Some(1), "{j}");
    assert!(j["differs"].as_u64().unwrap() > 0, "{j}");
    assert!(j["hint"].as_str().unwrap().contains("--tolerance 1e-5"), "{j}");
    // the text report says it on stderr, and lists max_rel beside each tensor
    let (u, a, m) = (unmerged.to_str().unwrap(), adapter.to_str().unwrap(), merged.to_str().unwrap());
    let o = run(&["verify", "--reverse", "--base", u, "--adapter", a, "--merged", m]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("note: every tensor that differs is f32 BAT"), "{}", stderr(&o));
    assert!(stdout(&o).contains("max rel "), "{}", stdout(&o));
    let o = run(&["verify", "--reverse", "--base", u, "--adapter", a, "--merged", m, "--tolerance", "1e-5"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("within the tolerance 1e-5"), "{}", stdout(&o));
    assert!(!stderr(&o).contains("note:"), "{}", stderr(&o));
    let (code, j) = verify(&unmerged, &adapter, &merged, &["--reverse", "--tolerance", "1e-5"]);
    assert_eq!(code, Some(0), "{j}");
    assert_eq!(j["differs"], 0);
    let tolerated: Vec<_> =
        j["tensors"].as_array().unwrap().iter().filter(|t| t["status"] == "within_tolerance").collect();
    assert_eq!(tolerated.len() as u64, j["within_tolerance"].as_u64().unwrap());
    assert!(!tolerated.is_empty());
    for t in &tolerated {
        let (abs, scale, rel) =
            (t["max_abs"].as_f64().unwrap(), t["scale"].as_f64().unwrap(), t["max_rel"].as_f64().unwrap());
        assert!(t["max_ulp"].as_u64().unwrap() > 1 && rel <= 1e-5 && scale > 0.0, "{t}");
        assert!((abs / scale - rel).abs() <= 1e-12, "{t}");
    }
    // a tighter tolerance than the differences: refused again, and no hint once one is given
    let (code, j) = verify(&unmerged, &adapter, &merged, &["--reverse", "--tolerance", "1e-12"]);
    assert_eq!(code, Some(1), "{j}");
    assert!(j["hint"].is_null(), "{j}");
    // the right base with another BAT adapter, or the base itself as the merge: real differences,
    // refused at 1e-5
    let base = fixtures().join("bases/llama-wide-f32");
    let other = fixtures().join("cases/bone-bat-wide-f32/adapter");
    let (code, j) = verify(&base, &other, &merged, &["--tolerance", "1e-5"]);
    assert_eq!(code, Some(1), "{j}");
    assert!(j["hint"].is_null(), "{j}");
    let (code, j) = verify(&base, &adapter, &base, &["--tolerance", "1e-5"]);
    assert_eq!(code, Some(1), "{j}");
    assert_eq!(j["within_tolerance"], 0);
    // a NaN where PEFT has a number is no small difference
    let tmp = tempfile::tempdir().unwrap();
    let mut t = load(&merged.join("model.safetensors"));
    let q = "model.layers.0.self_attn.q_proj.weight";
    let mut tq = t[q].clone();
    tq.data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    t.insert(q.into(), tq);
    let bad = tmp.path().join("nan");
    std::fs::create_dir(&bad).unwrap();
    save(&bad.join("model.safetensors"), &t);
    let (code, j) = verify(&base, &adapter, &bad, &["--tolerance", "0.5"]);
    assert_eq!(code, Some(1), "{j}");
    let status = j["tensors"].as_array().unwrap().iter().find(|x| x["name"] == q).unwrap()["status"].clone();
    assert_eq!(status, "differs", "{j}");
    // bf16 at r = 8: PEFT's unmerge (whose f32 inverse had parted in two values by two units near
    // zero from bone-tool's f64 one) is now bone-tool's bytes; the base given as the merge is not,
    // and gets no note (that of few small differences: verify_s_note_allows_one_percent_off_…)
    let case = fixtures().join("cases/bone-bat-bf16");
    let (unmerged, adapter, merged) = (case.join("unmerged"), case.join("adapter"), case.join("merged"));
    let (code, j) = verify(&unmerged, &adapter, &merged, &["--reverse"]);
    assert_eq!((code, &j["differs"], &j["within_1_ulp"]), (Some(0), &0.into(), &0.into()), "{j}");
    let bf16 = fixtures().join("bases/llama-bf16");
    let (code, j) = verify(&bf16, &adapter, &bf16, &[]);
    assert_eq!(code, Some(1), "{j}");
    assert!(j["hint"].is_null(), "{j}");
    // and a tolerance that is no number is bad usage
    let o = run(&["verify", "--base", "a", "--adapter", "b", "--merged", "c", "--tolerance", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected a relative tolerance"), "{}", stderr(&o));
}

#[test]
fn peft_merges_made_with_mkls_avx2_code_verify_as_its_notes_say() {
    // PEFT run as on a processor without AVX-512 (fixtures/generate.py --foreign): its f32 BAT sums
    // run in another order, so verify exits 1 with a note naming --tolerance 1e-5, which accepts
    // them; in f16 the deltas that round the other way are one ulp off, which verify accepts
    let mut seen = vec![];
    for c in manifest()["cases"].as_array().unwrap() {
        let Some(avx2) = c["merged_avx2"].as_str() else { continue };
        let name = c["name"].as_str().unwrap();
        let base = fixtures().join(c["base"].as_str().unwrap());
        let adapter = fixtures().join(c["adapters"][0].as_str().unwrap());
        let flags: &[&str] = if c["autocast_adapter_dtype"] == false { &["--no-autocast-adapter-dtype"] } else { &[] };
        let (code, j) = verify(&base, &adapter, &fixtures().join(avx2), flags);
        if name.ends_with("f32") {
            assert_eq!(code, Some(1), "{name}: {j}");
            assert!(j["differs"].as_u64().unwrap() > 0, "{name}: {j}");
            assert!(j["hint"].as_str().unwrap().contains("`--tolerance 1e-5`"), "{name}: {j}");
            let (code, j) =
                verify(&base, &adapter, &fixtures().join(avx2), &[flags, &["--tolerance", "1e-5"]].concat());
            assert_eq!(code, Some(0), "{name}: {j}");
            assert_eq!(
                j["within_tolerance"],
                j["tensors"].as_array().unwrap().len() as u64 - j["equal"].as_u64().unwrap()
            );
        } else {
            assert_eq!(code, Some(0), "{name}: {j}");
            assert!(j["within_1_ulp"].as_u64().unwrap() > 0, "{name}: PEFT's AVX2 merge is no different: {j}");
        }
        // and PEFT's own merge on this processor is the bytes bone-tool makes
        let (code, j) = verify(&base, &adapter, &fixtures().join("cases").join(name).join("merged"), flags);
        assert_eq!(code, Some(0), "{name}: {j}");
        assert_eq!(j["equal"].as_u64().unwrap() as usize, j["tensors"].as_array().unwrap().len(), "{name}: {j}");
        seen.push(name.to_string());
    }
    assert_eq!(seen, ["bone-bat-f32", "bone-bat-no-autocast-f16"]);
}

#[test]
fn without_base_the_base_the_adapter_records_is_checked_against() {
    // the fixture records fixtures/bases/llama-bf16, relative to the package root where tests run
    let case = "fixtures/cases/bone-bat-bf16";
    let (adapter, merged) = (format!("{case}/adapter"), format!("{case}/merged"));
    let o = run(&["verify", "--adapter", &adapter, "--merged", &merged, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("base (the adapter's base_model_name_or_path): fixtures/bases/llama-bf16"));
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((j["ok"].clone(), j["equal"].clone(), j["differs"].clone()), (true.into(), 29.into(), 0.into()));
    // against another base's merge it fails: the recorded base is really the one used
    let other = "fixtures/cases/bone-default-lm-head-bf16/merged";
    let o = run(&["verify", "--adapter", &adapter, "--merged", other]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // --reverse checks an unmerged folder, which only --base names
    let o = run(&["verify", "--reverse", "--adapter", &adapter, "--merged", &merged]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--base <MODEL>"), "{}", stderr(&o));
}

/// A model merged with --dtype verifies with the same --dtype (the recomputed merge rounded to
/// it), and without it fails with a note that says so; a value changed in it still fails.
#[test]
fn a_merge_written_with_dtype_verifies_with_the_same_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-bat-f32");
    let (base, adapter) = (fixtures().join("bases/llama-f32"), case.join("adapter"));
    let out = tmp.path().join("bf16");
    ok(&merge_with(&base, &adapter, &out, &["--dtype", "bf16"]));
    let (code, j) = verify(&base, &adapter, &out, &["--dtype", "bf16"]);
    assert_eq!(code, Some(0), "{j}");
    assert_eq!(j["equal"].as_u64().unwrap() as usize, j["tensors"].as_array().unwrap().len());
    let (code, j) = verify(&base, &adapter, &out, &[]);
    assert_eq!(code, Some(1), "{j}");
    let hint = j["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("stored as BF16") && hint.contains("--dtype bf16"), "{j}");
    // one value of a changed tensor off by one unit: found, with the same --dtype
    edit_tensors(&out.join("model.safetensors"), |t| {
        t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap().data[0] ^= 0x01;
    });
    let (code, j) = verify(&base, &adapter, &out, &["--dtype", "bf16"]);
    assert_eq!(code, Some(0), "one unit off is within one ulp: {j}");
    assert_eq!(j["within_1_ulp"], 1, "{j}");
    edit_tensors(&out.join("model.safetensors"), |t| {
        t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap().data[1] ^= 0x40;
    });
    let (code, j) = verify(&base, &adapter, &out, &["--dtype", "bf16"]);
    assert_eq!(code, Some(1), "{j}");
    assert!(j["hint"].is_null(), "{j}");
}

/// PEFT 0.20 and later merge f16/bf16 BAT as W + delta rounded once (PEFT 0.18.1's
/// merge_and_unload(safe_merge=True), the fixtures' merged-safe; checked against PEFT 0.21.2), where
/// PEFT 0.18.1's merge_and_unload() rounds the delta first. verify accepts either, trying the
/// other rounding where only f16/bf16 BAT tensors differ, and says which one matched; a tensor
/// changed on top still fails.
#[test]
fn either_peft_rounding_of_bat_verifies_and_says_which() {
    let case = fixtures().join("cases/miss-bat-bf16");
    let base = fixtures().join("bases/llama-bf16");
    let adapter = case.join("adapter");
    for (merged, flag, rounding) in [
        ("merged-safe", "peft", "once"),
        ("merged", "once", "peft"),
        ("merged-safe", "once", "once"),
        ("merged", "peft", "peft"),
    ] {
        let (code, r) = verify(&base, &adapter, &case.join(merged), &["--rounding", flag]);
        assert_eq!(code, Some(0), "{merged} with --rounding {flag}: {r}");
        assert_eq!(r["rounding"], rounding, "{merged} with --rounding {flag}");
        let hint = r["hint"].as_str().unwrap_or("");
        assert_eq!(flag != rounding, !hint.is_empty(), "{merged} with --rounding {flag}: {hint}");
        if rounding == "once" && flag != rounding {
            assert!(hint.contains("PEFT 0.20 and later") && hint.contains("safe_merge=True"), "{hint}");
        }
    }
    // the text output says it in a note
    let o = verify_run(&base, &adapter, &case.join("merged-safe"), &[]);
    ok(&o);
    assert!(stderr(&o).contains("note:") && stderr(&o).contains("--rounding once"), "{}", stderr(&o));

    // one value of a BAT tensor changed on top of the rounded-once merge: neither rounding matches
    let tmp = tempfile::tempdir().unwrap();
    let tampered = tmp.path().join("m");
    copy_dir(&case.join("merged-safe"), &tampered);
    let file = tampered.join("model.safetensors");
    let mut t = load(&file);
    let w = t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap();
    w.data[0] ^= 0x40;
    save(&file, &t);
    let (code, r) = verify(&base, &adapter, &tampered, &[]);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["rounding"], "peft");
}

#[test]
fn peft_merges_made_on_an_amd_processor_verify_and_say_so() {
    // PEFT's merges from an AMD processor (fixtures/generate.py --amd), whose f32 BAT
    // sums differ from the Intel processor's that bone-tool follows by default: verify finds them
    // different, checks the AMD processor's sums (and, for the f16/bf16 safe merges, the other
    // rounding too), and says which matched; asked for the AMD sums it finds them at once and says
    // nothing. And PEFT's f32 Intel merge checked with --bat-sums amd is found the other way round.
    let verify_all = |c: &serde_json::Value, merged: &str, extra: &[&str]| {
        let mut args = vec!["verify", "--json", "--base", c["base"].as_str().unwrap()];
        for a in c["adapters"].as_array().unwrap() {
            args.extend(["--adapter", a.as_str().unwrap()]);
        }
        args.extend(["--merged", merged]);
        args.extend(extra);
        let paths: Vec<String> = args
            .iter()
            .map(|a| {
                if a.starts_with("cases/") || a.starts_with("bases/") {
                    fixtures().join(a).display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let o = run(&paths.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!stderr(&o).contains("panicked"));
        (o.status.code(), serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap())
    };
    let m = manifest();
    let mut seen = vec![];
    let amd_only = m["amd"].as_array().unwrap();
    for c in m["cases"].as_array().unwrap().iter().chain(amd_only) {
        if SAME_MERGE_AMD.contains(&c["name"].as_str().unwrap()) {
            continue;
        }
        for (key, once) in [("merged_amd", false), ("merged_safe_amd", true)] {
            let Some(amd) = c[key].as_str() else { continue };
            let name = c["name"].as_str().unwrap();
            let (code, j) = verify_all(c, amd, &[]);
            assert_eq!(code, Some(0), "{name} {key}: {j}");
            assert_eq!(j["bat_sums"], "amd", "{name} {key}: {j}");
            assert_eq!(j["rounding"], if once { "once" } else { "peft" }, "{name} {key}: {j}");
            assert_eq!(j["equal"].as_u64().unwrap() as usize, j["tensors"].as_array().unwrap().len(), "{name}: {j}");
            let hint = j["hint"].as_str().unwrap_or_default();
            assert!(hint.contains("--bat-sums amd") && hint.contains(&amd.to_string()), "{name} {key}: {hint}");
            assert_eq!(hint.contains("--rounding once"), once, "{name} {key}: {hint}");
            let rounding: &[&str] = if once { &["--rounding", "once"] } else { &[] };
            let (code, j) = verify_all(c, amd, &[rounding, &["--bat-sums", "amd"]].concat());
            assert_eq!((code, &j["hint"]), (Some(0), &serde_json::Value::Null), "{name} {key}: {j}");
            // (in f16/bf16 the two processors' merges are within one ulp, which verify accepts as is)
            if let Some(intel) = c["merged"].as_str().filter(|_| !once) {
                let (code, j) = verify_all(c, intel, &["--bat-sums", "amd"]);
                assert_eq!((code, &j["bat_sums"]), (Some(0), &"intel".into()), "{name} {key}: {j}");
                assert!(j["hint"].as_str().unwrap().contains("--bat-sums intel"), "{name} {key}: {j}");
            }
            seen.push(format!("{name} {key}"));
        }
    }
    assert_eq!(seen.len(), 14, "{seen:?}");
}

#[test]
fn peft_unmerges_made_on_an_amd_processor_verify_and_say_so() {
    // PEFT's unmerges of the committed merges on an AMD processor (fixtures/generate.py --amd), and
    // of the AMD-only cases' own merges: --reverse finds them different with the Intel processor's
    // GEMMs and inverses, tries the AMD one's and says it matched; value for value at the r where
    // bone-tool inverts as torch does there (up to 149: every case here but miss-bat-r200-f32, the
    // tolerance test's)
    let mut seen = 0;
    let m = manifest();
    for c in m["cases"].as_array().unwrap().iter().chain(m["amd"].as_array().unwrap()) {
        let Some(amd) = c["unmerged_amd"].as_str() else { continue };
        if c["name"] == "miss-bat-r200-f32" {
            continue;
        }
        let adapters = c["adapters"].as_array().unwrap();
        if adapters.len() != 1 || c["autocast_adapter_dtype"] == false {
            continue;
        }
        let name = c["name"].as_str().unwrap();
        let case = fixtures().join("cases").join(name);
        let adapter = fixtures().join(adapters[0].as_str().unwrap());
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
        let r = config["r"].as_u64().unwrap();
        assert!(r <= 149, "{name}: r = {r}, whose AMD inverse bone-tool does not model");
        let merged = if case.join("merged").exists() { case.join("merged") } else { case.join("merged-amd") };
        let expected = fixtures().join(amd);
        let (code, j) = verify(&expected, &adapter, &merged, &["--reverse"]);
        assert_eq!(code, Some(0), "{name}: {j}");
        if name.ends_with("f32") {
            // (in f16/bf16 the two processors' unmerges are within one ulp, which verify accepts as is)
            assert_eq!(j["bat_sums"], "amd", "{name}: {j}");
            assert!(j["hint"].as_str().unwrap().contains("--bat-sums amd"), "{name}: {j}");
            seen += 1;
        }
        let (code, j) = verify(&expected, &adapter, &merged, &["--reverse", "--bat-sums", "amd"]);
        assert_eq!((code, &j["hint"]), (Some(0), &serde_json::Value::Null), "{name}: {j}");
        assert_eq!(j["equal"].as_u64().unwrap() as usize, j["tensors"].as_array().unwrap().len(), "{name}: {j}");
        seen += 1;
    }
    assert!(seen >= 23, "{seen}");
}
