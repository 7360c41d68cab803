//! bone-tool against PEFT 0.18.1 on every fixture case (fixtures/manifest.json), and against PEFT
//! 0.21.2 on transformers 5 on those of fixtures/transformers5/manifest.json (adapters keyed by
//! transformers 5's module paths; f16/bf16 BAT merged rounding once): merge, unmerge and inspect
//! --json, end to end through the binary.
//!
//! What is compared, per the spec's dtype policy:
//! - merges: byte for byte, every case (the manifest's `expect`; f32 BAT too since bone-tool sums
//!   BAT's products as torch does: fused from r = 8, rounded one by one below), else every value
//!   within 1e-5 relative (with a floor at 1% of the tensor's largest value);
//! - unmerges: default/mini byte for byte; BAT uses (I + B)^-1, which PEFT takes from LAPACK in f32:
//!   up to r = 128 bone-tool computes it as torch does on the Intel processor the fixtures were
//!   made on (`ops::inverse_as_torch`), byte for byte; at larger r (none here) in f64: f16/bf16 values within one ulp (or, where the result cancels to almost
//!   nothing, within 1e-5 of the tensor's largest value), and at most 0.05% of all values off at
//!   all; f32 within 1e-5 relative as above.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Bytes,
    Close,
    WithinOneUlp,
}

struct Case {
    name: String,
    /// The case's folder (its `merged`, `unmerged`).
    dir: PathBuf,
    /// PEFT merged f16/bf16 BAT rounding once (PEFT 0.20 and later): merge with `--rounding once`.
    rounding_once: bool,
    base: String,
    adapters: Vec<String>,
    exact_merge: bool,
    autocast: bool,
    has_bat: bool,
    /// Every BAT adapter has r = 8, where torch's f32 inverse is the same on both processors.
    bat_r8: bool,
    /// Every BAT adapter has an r where bone-tool inverts `I + B` as PEFT's torch does on the AMD
    /// processor with AVX-512 ([`inverted_as_torch_amd`]): its `--bat-sums amd` unmerges are the
    /// bytes PEFT's make there.
    bat_inverted_amd: bool,
    /// Every BAT adapter has an r where bone-tool inverts `I + B` as PEFT's torch does on the
    /// Intel processor the fixtures were made on ([`INVERTED_AS_TORCH`]).
    bat_inverted: bool,
    /// PEFT's `merge_and_unload(safe_merge=True)`, which rounds BAT's `W + Δ` once (f16/bf16 BAT).
    merged_safe: Option<String>,
    /// PEFT's merge and safe merge made on an AMD processor with AVX-512, where they differ from
    /// `merged` and `merged_safe` (fixtures/generate.py --amd).
    merged_amd: Option<String>,
    merged_safe_amd: Option<String>,
    /// PEFT's unmerge of `merged` on an AMD processor with AVX-512, where it differs from `unmerged`.
    unmerged_amd: Option<String>,
    /// For each adapter, the modules whose blocks are in its file but that PEFT, loading it,
    /// puts no layer on (its config does not target them), as PEFT itself listed them.
    untargeted: Vec<Vec<String>>,
    /// For each adapter, the modules PEFT puts a layer on but finds no block for in the file
    /// ("Found missing adapter keys"; it merges its initial block there, zeros), as PEFT listed them.
    without_blocks: Vec<Vec<String>>,
}

/// A manifest field that holds, for each adapter, a list of module names.
fn lists(v: &serde_json::Value) -> Vec<Vec<String>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect())
        .collect()
}

fn cases() -> Vec<Case> {
    manifests()
        .into_iter()
        .flat_map(|(m, folder)| {
            let once = m["rounding"] == "once";
            let cases = m["cases"].as_array().unwrap().clone();
            cases.into_iter().map(move |c| case(&c, folder, once))
        })
        .collect()
}

/// One case of a manifest (`folder`: where its cases lie, relative to fixtures/). The AMD-only
/// ones ([`amd_only_cases`]) carry no `expect` (their merges are PEFT's bytes), `untargeted` or
/// `without_blocks`.
fn case(c: &serde_json::Value, folder: &str, rounding_once: bool) -> Case {
    let adapters: Vec<String> =
        c["adapters"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let bat_rs: Vec<u64> = adapters
        .iter()
        .filter_map(|a| {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(fixtures().join(a).join("adapter_config.json")).unwrap())
                    .unwrap();
            (cfg["init_weights"] == "bat").then(|| cfg["r"].as_u64().unwrap())
        })
        .collect();
    let has_bat = !bat_rs.is_empty();
    let name = c["name"].as_str().unwrap().to_string();
    Case {
        dir: fixtures().join(folder).join(&name),
        name,
        rounding_once,
        base: c["base"].as_str().unwrap().to_string(),
        adapters,
        exact_merge: c.get("expect").is_none_or(|e| e == "bytes"),
        autocast: c["autocast_adapter_dtype"].as_bool().unwrap(),
        has_bat,
        bat_r8: has_bat && bat_rs.iter().all(|&r| r == 8),
        bat_inverted: has_bat && bat_rs.iter().all(|r| INVERTED_AS_TORCH.contains(r)),
        bat_inverted_amd: has_bat && bat_rs.iter().all(|&r| inverted_as_torch_amd(r)),
        merged_safe: c["merged_safe"].as_str().map(str::to_string),
        merged_amd: c["merged_amd"].as_str().map(str::to_string),
        merged_safe_amd: c["merged_safe_amd"].as_str().map(str::to_string),
        unmerged_amd: c["unmerged_amd"].as_str().map(str::to_string),
        untargeted: c.get("untargeted").map(lists).unwrap_or_default(),
        without_blocks: c.get("without_blocks").map(lists).unwrap_or_default(),
    }
}

fn apply(cmd: &str, model: &Path, c: &Case, out: &Path) {
    apply_env(cmd, model, c, out, None, false, &[])
}

/// Run merge or unmerge; `piece_bytes` forces the pipeline to cut tensors into pieces that small,
/// and `pread` reads them into pooled buffers rather than mapping them.
fn apply_env(cmd: &str, model: &Path, c: &Case, out: &Path, piece_bytes: Option<usize>, pread: bool, extra: &[&str]) {
    let mut args: Vec<String> = vec!["--quiet".into(), cmd.into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    if cmd == "merge" && c.rounding_once && !extra.contains(&"--rounding") {
        args.extend(["--rounding".into(), "once".into()]);
    }
    args.push(if cmd == "merge" { "--base" } else { "--merged" }.into());
    args.push(model.display().to_string());
    for a in &c.adapters {
        args.push("--adapter".into());
        args.push(fixtures().join(a).display().to_string());
    }
    args.push("--out".into());
    args.push(out.display().to_string());
    if !c.autocast {
        args.push("--no-autocast-adapter-dtype".into());
    }
    let mut command = bin();
    command.args(&args);
    if let Some(n) = piece_bytes {
        command.env("BONE_TOOL_PIECE_BYTES", n.to_string());
        // and several pieces in flight at once, as on a GPU: they must still land in order
        command.env("BONE_TOOL_CPU_IN_FLIGHT", "3");
        // and the device opening late, beside the pipeline: the CPU computes meanwhile (the adds,
        // and BAT where its GEMMs sum in the GPU kernel's order)
        command.env("BONE_TOOL_OPEN_DELAY_MS", "30");
    }
    if pread {
        command.env("BONE_TOOL_READ", "pread");
    } else if piece_bytes.is_some() {
        // and the shards written side by side, each by a writer of its own
        command.env("BONE_TOOL_WRITERS", "3");
    }
    let o = command.output().expect("bone-tool runs");
    ok(&o);
    // warned exactly where PEFT found modules its config targets but no block for them
    let missing = c.without_blocks.iter().any(|m| !m.is_empty());
    assert_eq!(stderr(&o).contains("no block for"), missing, "{}: {}", c.name, stderr(&o));
}

/// Compare every tensor; returns a description of each mismatch.
fn compare(ours: &BTreeMap<String, T>, peft: &BTreeMap<String, T>, expect: Expect) -> Vec<String> {
    let mut bad = vec![];
    let (mut total, mut off_total) = (0usize, 0usize);
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>(), "tensor names");
    for (name, p) in peft {
        let o = &ours[name];
        assert_eq!((o.dtype, &o.shape), (p.dtype, &p.shape), "{name}: dtype and shape");
        if o.data == p.data {
            continue;
        }
        match expect {
            Expect::Bytes => {
                let n = bits(o).iter().zip(bits(p)).filter(|(a, b)| *a != b).count();
                bad.push(format!("{name}: {n} values differ from PEFT's bytes"));
            }
            Expect::Close => {
                let (ov, pv) = (values(o), values(p));
                let scale = pv.iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst =
                    ov.iter().zip(&pv).map(|(a, b)| (a - b).abs() / (b.abs() + 0.01 * scale)).fold(0f64, f64::max);
                if worst > 1e-5 {
                    bad.push(format!("{name}: relative error {worst:.3e} > 1e-5"));
                }
            }
            Expect::WithinOneUlp => {
                let (ob, pb) = (bits(o), bits(p));
                let (ov, pv) = (values(o), values(p));
                let scale = pv.iter().fold(0f64, |m, v| m.max(v.abs()));
                let far = (0..ob.len())
                    .filter(|&k| (ob[k] - pb[k]).abs() > 1 && (ov[k] - pv[k]).abs() > 1e-5 * scale)
                    .count();
                off_total += ob.iter().zip(&pb).filter(|(a, b)| a != b).count();
                if far > 0 {
                    bad.push(format!("{name}: {far} values more than one ulp off"));
                }
            }
        }
    }
    if expect == Expect::WithinOneUlp {
        total += ours.values().filter(|t| t.dtype != safetensors::Dtype::I64).map(|t| values(t).len()).sum::<usize>();
        if off_total * 2000 > total {
            bad.push(format!("{off_total} of {total} values differ from PEFT (more than 0.05%)"));
        }
    }
    bad
}

#[test]
fn merge_matches_peft_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = vec![];
    let cases = cases();
    assert!(cases.len() >= 15, "the manifest lists every case");
    for c in &cases {
        let out = tmp.path().join(format!("{}-merged", c.name));
        apply("merge", &fixtures().join(&c.base), c, &out);
        let expect = if c.exact_merge { Expect::Bytes } else { Expect::Close };
        let peft = c.dir.join("merged");
        for f in compare(&load(&out), &load(&peft), expect) {
            failures.push(format!("{}: {f}", c.name));
        }
        // what config.json says of the model's class, labels and tie, as transformers saved it
        let config = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
        };
        let (ours, peft) = (config(&out), config(&peft));
        let transformers5 = c.dir.starts_with(fixtures().join("transformers5"));
        for key in ["architectures", "id2label", "label2id", "tie_word_embeddings", "model_type", "vocab_size"] {
            // transformers 5 writes out the tie that 4.57's config of the base left to its default
            // (false, as the tensors show: the head is stored and merged as PEFT's)
            if transformers5 && key == "tie_word_embeddings" && ours[key].is_null() && peft[key] == false {
                continue;
            }
            if ours[key] != peft[key] {
                failures.push(format!("{}: config.json {key}: {} where PEFT's has {}", c.name, ours[key], peft[key]));
            }
        }
    }
    assert!(failures.is_empty(), "merge differs from PEFT:\n{}", failures.join("\n"));
}

#[test]
fn rounding_once_matches_peft_safe_merge() {
    // PEFT's safe_merge adds BAT's f32 delta to a copy of the weight and rounds once: `--rounding
    // once`. (The default merge rounds the delta first and differs from it in some values.)
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Case> = cases().into_iter().filter(|c| c.merged_safe.is_some()).collect();
    assert!(cases.len() >= 4, "the manifest has safe merges of the f16/bf16 BAT cases");
    let mut differ_from_default = 0;
    for c in &cases {
        let out = tmp.path().join(&c.name);
        apply_env("merge", &fixtures().join(&c.base), c, &out, None, false, &["--rounding", "once"]);
        let safe = load(&fixtures().join(c.merged_safe.as_ref().unwrap()));
        let bad = compare(&load(&out), &safe, Expect::Bytes);
        assert!(bad.is_empty(), "{}: --rounding once differs from PEFT's safe_merge:\n{}", c.name, bad.join("\n"));
        let default = load(&c.dir.join("merged"));
        differ_from_default += compare(&default, &safe, Expect::Bytes).len();
    }
    assert!(differ_from_default > 0, "the two roundings differ somewhere, or this test shows nothing");
}

#[test]
fn bat_sums_amd_matches_peft_on_an_amd_processor() {
    // PEFT's merges made on an AMD processor (fixtures/generate.py --amd), where torch
    // sums f32 BAT GEMMs otherwise than on the Intel processor the other fixtures come from (r = 8:
    // each product rounded and then added; r = 200, the wide case: k in two blocks of 100; r = 9,
    // 10 and 11: the elements of a row before its first 16-byte boundary in chunks of four).
    // `--bat-sums amd` gives their bytes; the default, Intel's sums, does not.
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = vec![];
    for c in cases().into_iter().chain(amd_only_cases()) {
        for (peft, once) in [(&c.merged_amd, false), (&c.merged_safe_amd, true)] {
            let Some(peft) = peft else { continue };
            let peft = load(&fixtures().join(peft));
            let rounding: &[&str] = if once { &["--rounding", "once"] } else { &[] };
            let out = tmp.path().join(format!("{}-{once}-amd", c.name));
            apply_env(
                "merge",
                &fixtures().join(&c.base),
                &c,
                &out,
                None,
                false,
                &[rounding, &["--bat-sums", "amd"]].concat(),
            );
            let bad = compare(&load(&out), &peft, Expect::Bytes);
            assert!(
                bad.is_empty(),
                "{} (once: {once}): --bat-sums amd differs from PEFT's:\n{}",
                c.name,
                bad.join("\n")
            );
            checked.push(c.name.clone());
            if SAME_MERGE_AMD.contains(&c.name.as_str()) {
                continue;
            }
            let out = tmp.path().join(format!("{}-{once}-intel", c.name));
            apply_env("merge", &fixtures().join(&c.base), &c, &out, None, false, rounding);
            assert!(!compare(&load(&out), &peft, Expect::Bytes).is_empty(), "{}: Intel's sums give the same", c.name);
        }
    }
    let amd_only = ["bone-bat-wide-f32", "bone-bat-r9-f32", "miss-bat-r10-f32", "bone-bat-r11-f32"];
    assert!(checked.len() >= 8 && amd_only.iter().all(|a| checked.iter().any(|n| n == a)), "{checked:?}");
}

/// The AMD-only cases (the manifest's `amd`: PEFT's merges and unmerges on an AMD processor, of
/// adapters made for them, fixtures/generate.py --amd), whose `merged-amd` an unmerge starts from.
fn amd_only_cases() -> Vec<Case> {
    let m = manifest();
    m["amd"].as_array().expect("the manifest's AMD-only cases").iter().map(|c| case(c, "cases", false)).collect()
}

#[test]
fn bat_sums_auto_follows_the_processor_it_runs_on() {
    // --bat-sums auto: this machine's sums, the processor told here from /proc/cpuinfo (apart from
    // bone-tool's CPUID): on an AMD processor (with AVX2 and FMA, AVX-512 or not) PEFT's merge and
    // unmerge made on one (`merged-amd`, `unmerged-amd`), on an Intel one with AVX-512 the
    // fixtures' own; elsewhere Intel's, with a warning
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        not_checked("--bat-sums auto: no /proc/cpuinfo to tell the processor by");
        return;
    };
    let flag = |name: &str| {
        cfg!(target_arch = "x86_64")
            && info.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == name))
    };
    let vendor = |v: &str| info.lines().any(|l| l.starts_with("vendor_id") && l.trim_end().ends_with(v));
    let amd = flag("avx2") && flag("fma") && vendor("AuthenticAMD");
    let modelled = amd || (flag("avx512f") && vendor("GenuineIntel"));
    let tmp = tempfile::tempdir().unwrap();
    for (cmd, name, amd_ref, own) in
        [("merge", "bone-bat-f32", "merged-amd", "merged"), ("unmerge", "miss-bat-r16-f32", "unmerged-amd", "unmerged")]
    {
        let case = fixtures().join("cases").join(name);
        let (amd_ref, own) = (load(&case.join(amd_ref)), load(&case.join(own)));
        assert!(!compare(&amd_ref, &own, Expect::Bytes).is_empty(), "{name}: the processors' outputs are the same");
        let from = if cmd == "merge" { fixtures().join("bases/llama-f32") } else { case.join("merged") };
        let out = tmp.path().join(name);
        let adapter = case.join("adapter");
        let flag = if cmd == "merge" { "--base" } else { "--merged" };
        let o = run(&[
            cmd,
            flag,
            from.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--bat-sums",
            "auto",
        ]);
        ok(&o);
        let want = if amd { &amd_ref } else { &own };
        let bad = compare(&load(&out), want, Expect::Bytes);
        assert!(bad.is_empty(), "{name} (AMD: {amd}): {cmd} --bat-sums auto:\n{}", bad.join("\n"));
        assert_eq!(stderr(&o).contains("--bat-sums auto:"), !modelled, "{}", stderr(&o));
    }
}

/// The r at which bone-tool takes BAT's `(I + B)⁻¹` as torch does on the Intel processor (MKL's
/// `getrf`/`getrs` in f32, measured: README), so that its unmerges are PEFT's bytes.
const INVERTED_AS_TORCH: std::ops::RangeInclusive<u64> = 1..=128;
/// And on the AMD processor (`--bat-sums amd`): up to 149.
fn inverted_as_torch_amd(r: u64) -> bool {
    (1..=149).contains(&r)
}

/// How an unmerge is held to PEFT's: bytes, but where BAT's `(I + B)⁻¹` is bone-tool's f64 one
/// (`exact` false: an r where PEFT's, LAPACK's in f32, is not modelled), f16/bf16 within one ulp
/// and f32 close.
fn unmerge_expect(c: &Case, exact: bool, is_f32: bool) -> Expect {
    match (c.has_bat && !exact, is_f32) {
        (false, _) => Expect::Bytes,
        (true, false) => Expect::WithinOneUlp,
        (true, true) => Expect::Close,
    }
}

#[test]
fn unmerge_matches_peft_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = vec![];
    for c in &cases() {
        let case_dir = &c.dir;
        let out = tmp.path().join(format!("{}-unmerged", c.name));
        apply("unmerge", &case_dir.join("merged"), c, &out);
        let mut peft = load(&case_dir.join("unmerged"));
        // A saved base layer (PEFT saves lm_head's) is the exact original, which bone-tool restores.
        // PEFT's own "unmerged" lm_head is not: from_pretrained loads that saved weight over the
        // merged one before unmerge() subtracts the block again.
        for a in c.adapters.iter().rev() {
            for (k, t) in load(&fixtures().join(a).join("adapter_model.safetensors")) {
                if let Some(m) = k.strip_suffix(".base_layer.weight") {
                    peft.insert(stored_tensor(&peft, m.trim_start_matches("base_model.model.")), t);
                }
            }
        }
        let is_f32 = peft.values().any(|t| t.dtype == safetensors::Dtype::F32);
        let expect = unmerge_expect(c, c.bat_inverted, is_f32);
        for f in compare(&load(&out), &peft, expect) {
            failures.push(format!("{}: {f}", c.name));
        }
    }
    assert!(failures.is_empty(), "unmerge differs from PEFT:\n{}", failures.join("\n"));
    // the f32 BAT cases at r = 4, 12, 16, 48 and 100 (where torch's inverse works otherwise than at
    // r = 8; from 17 its LU recursive, ops/panels.rs) are held to bytes, and so is bf16 at r = 24
    let exact: Vec<String> = cases().into_iter().filter(|c| c.bat_inverted && !c.bat_r8).map(|c| c.name).collect();
    let f32s = exact.iter().filter(|n| n.ends_with("-f32")).count();
    let beyond_16 = ["miss-bat-r24-bf16", "bone-bat-r48-f32", "miss-bat-r100-f32"];
    assert!(f32s >= 5 && beyond_16.iter().all(|n| exact.iter().any(|e| e == n)), "{exact:?}");
}

#[test]
fn tensors_cut_into_small_pieces_give_the_same_bytes() {
    // The pipeline streams big tensors in row pieces (whole BAT strips); force pieces of a few rows
    // so that the tiny fixtures take that path too, with three pieces in flight (a GPU's lanes),
    // mapped and the shards written side by side, or (every other case) read into buffers that the
    // pieces give back as they finish.
    let tmp = tempfile::tempdir().unwrap();
    let mut pieces_used = 0;
    for (k, c) in cases().iter().enumerate() {
        for (cmd, model) in [("merge", fixtures().join(&c.base)), ("unmerge", c.dir.join("merged"))] {
            let (whole, cut) =
                (tmp.path().join(format!("{}-{cmd}-whole", c.name)), tmp.path().join(format!("{}-{cmd}-cut", c.name)));
            apply_env(cmd, &model, c, &whole, None, false, &[]);
            // every other case reads its pieces with pread into recycled buffers
            apply_env(cmd, &model, c, &cut, Some(700), k % 2 == 1, &[]);
            let (a, b) = (load(&whole), load(&cut));
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (k, t) in &a {
                assert!(t.data == b[k].data, "{} {cmd}: {k} differs when cut into pieces", c.name);
                pieces_used += usize::from(t.data.len() > 700);
            }
        }
    }
    assert!(pieces_used > 100, "tensors larger than one piece: {pieces_used}");
}

#[test]
fn merged_folder_keeps_the_base_layout_and_side_files() {
    let tmp = tempfile::tempdir().unwrap();
    for c in cases().iter().filter(|c| c.name == "miss-default-sharded-bf16" || c.name == "bone-default-f32") {
        let base = fixtures().join(&c.base);
        let out = tmp.path().join(&c.name);
        apply("merge", &base, c, &out);
        let names = |d: &Path| {
            let mut v: Vec<String> =
                std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&out), names(&base), "{}: same files as the base", c.name);
        for side in ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"] {
            assert_eq!(
                std::fs::read(out.join(side)).unwrap(),
                std::fs::read(base.join(side)).unwrap(),
                "{side} copied"
            );
        }
        // every shard holds the same tensors as the base's shard of the same name, with HF metadata
        for f in names(&base).iter().filter(|n| n.ends_with(".safetensors")) {
            let (b, o) = (load(&base.join(f)), load(&out.join(f)));
            assert_eq!(b.keys().collect::<Vec<_>>(), o.keys().collect::<Vec<_>>(), "{f}");
            assert_eq!(file_metadata(&out.join(f)).get("format").map(String::as_str), Some("pt"));
        }
        if base.join("model.safetensors.index.json").exists() {
            let read = |d: &Path| -> serde_json::Value {
                serde_json::from_str(&std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap()).unwrap()
            };
            let (bi, oi) = (read(&base), read(&out));
            assert_eq!(bi["weight_map"], oi["weight_map"]);
            assert_eq!(bi["metadata"]["total_size"], oi["metadata"]["total_size"]);
        }
        // Bytes that no adapter touches are copied exactly: the embedding and the norms.
        let (b, o) = (load(&base), load(&out));
        for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"] {
            assert_eq!(b[name].data, o[name].data, "{name} untouched");
        }
    }
}

/// transformers 5's renames for an architecture that no fixture has: HunYuanVL keeps its vision
/// tower under `vit.`, its MLP's `fc1`/`fc2` as `dense_h_to_4h`/`dense_4h_to_h` and without
/// `encoder.` (src/model/transformers5-renames.json). The transformers 5 LLaVA case, its base's
/// tensors and its adapter's keys moved to that layout and its config naming HunYuanVL, must merge
/// to PEFT's bytes under the moved names; named as a LLaVA, the same base is refused.
#[test]
fn transformers5_renames_of_another_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cases().into_iter().find(|c| c.name == "miss-default-llava-tf5-bf16").expect("the fixture case");
    // a LLaVA checkpoint key (a module path of the adapter) as HunYuanVL stores (names) it
    let stored = |k: &str| match k.strip_prefix("vision_tower.vision_model.") {
        Some(rest) if rest.contains(".mlp.fc") => format!(
            "vit.{}",
            rest.strip_prefix("encoder.")
                .unwrap()
                .replace(".mlp.fc1.", ".mlp.dense_h_to_4h.")
                .replace(".mlp.fc2.", ".mlp.dense_4h_to_h.")
        ),
        Some(rest) => format!("vit.{rest}"),
        None => k.to_string(),
    };
    let module = |k: &str| k.replace("model.vision_tower.encoder.layers.", "model.vision_tower.layers.");
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
    copy_dir(&fixtures().join(&c.base), &base);
    copy_dir(&fixtures().join(&c.adapters[0]), &adapter);
    let moved = |t: &mut BTreeMap<String, T>, f: &dyn Fn(&str) -> String| {
        *t = std::mem::take(t).into_iter().map(|(k, v)| (f(&k), v)).collect();
    };
    edit_tensors(&base.join("model.safetensors"), |t| moved(t, &stored));
    edit_tensors(&adapter.join("adapter_model.safetensors"), |t| {
        let before = t.len();
        moved(t, &|k: &str| if k.contains(".mlp.") { module(k) } else { k.to_string() });
        assert!(t.keys().any(|k| k.contains("model.vision_tower.layers.0.mlp.fc2.")) && t.len() == before);
    });
    let llava = merge_with(&base, &adapter, &tmp.path().join("refused"), &[]);
    assert!(!llava.status.success() && stderr(&llava).contains("vision_tower"), "{}", stderr(&llava));
    edit_json(&base.join("config.json"), |v| {
        v["architectures"] = serde_json::json!(["HunYuanVLForConditionalGeneration"])
    });
    let out = tmp.path().join("merged");
    merge(&base, &adapter, &out);
    let mut peft = load(&c.dir.join("merged"));
    moved(&mut peft, &stored);
    assert!(peft.contains_key("vit.layers.0.mlp.dense_4h_to_h.weight"));
    let (ours, base_tensors) = (load(&out), load(&base));
    // the adapter changes the moved tensors: not a comparison that the base would pass
    assert!(
        base_tensors["vit.layers.0.mlp.dense_4h_to_h.weight"].data
            != peft["vit.layers.0.mlp.dense_4h_to_h.weight"].data
    );
    let diff = compare(&ours, &peft, Expect::Bytes);
    assert!(diff.is_empty(), "{}", diff.join("\n"));
}

#[test]
fn inspect_json_describes_every_fixture_adapter() {
    for c in &cases() {
        for ((a, untargeted), without_blocks) in c.adapters.iter().zip(&c.untargeted).zip(&c.without_blocks) {
            let dir = fixtures().join(a);
            let o = run(&[
                "inspect",
                "adapter",
                dir.to_str().unwrap(),
                "--json",
                "--base",
                fixtures().join(&c.base).to_str().unwrap(),
            ]);
            ok(&o);
            let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
            // independent reading of the adapter file
            let tensors = load(&dir.join("adapter_model.safetensors"));
            let base = load(&fixtures().join(&c.base));
            let blocks: Vec<(&String, &T)> =
                tensors.iter().filter(|(k, _)| k.ends_with(".bone_block") || k.ends_with(".miss_block")).collect();
            assert_eq!(j["peft_type"], cfg["peft_type"], "{a}");
            assert_eq!(j["exclude_modules"], cfg["exclude_modules"], "{a}");
            assert_eq!(j["modules_without_blocks"], serde_json::json!(without_blocks), "{a}: as PEFT found them");
            let variant = match &cfg["init_weights"] {
                serde_json::Value::String(s) => s.clone(),
                _ => "default".into(),
            };
            assert_eq!(j["variant"], variant.as_str(), "{a}");
            assert_eq!(j["r"], cfg["r"], "{a}");
            if variant == "mini" {
                assert_eq!(j["mini_r"], cfg["mini_r"]);
            } else {
                assert!(j["mini_r"].is_null());
            }
            let module =
                |key: &str| key.trim_start_matches("base_model.model.").rsplit_once('.').unwrap().0.to_string();
            // the blocks PEFT loads: its parameters; the others are listed, not counted
            let numel: usize = blocks
                .iter()
                .filter(|(k, _)| !untargeted.contains(&module(k)))
                .map(|(_, t)| t.shape.iter().product::<usize>())
                .sum();
            assert_eq!(j["num_parameters"], numel, "{a}");
            let layers = j["layers"].as_array().unwrap();
            // the vision-language fixtures store their tensors under transformers' saved names
            let renamed = layers.iter().any(|l| {
                l["targeted"] == true && l["base_tensor"] != format!("{}.weight", l["module"].as_str().unwrap())
            });
            // (and transformers 5's GPT-NeoX: lm_head, stored as embed_out)
            assert_eq!(renamed, ["qwen2vl", "llava", "neox"].iter().any(|b| c.base.contains(b)), "{a}");
            assert_eq!(j["base_renames"].as_array().unwrap().is_empty(), !renamed, "{a}: {}", j["base_renames"]);
            assert_eq!(layers.len(), blocks.len());
            assert_eq!(j["num_layers"], blocks.len() - untargeted.len(), "{a}");
            assert_eq!(j["num_untargeted"], untargeted.len(), "{a}");
            for l in layers {
                let key = l["key"].as_str().unwrap();
                let t = &tensors[key];
                assert_eq!(l["block_shape"], serde_json::json!(t.shape));
                assert_eq!(l["module"].as_str().unwrap(), module(key));
                let targeted = !untargeted.contains(&module(key));
                assert_eq!(l["targeted"], targeted, "{a}: {key}");
                if targeted {
                    assert_eq!(l["ok"], true);
                    let t = l["base_tensor"].as_str().unwrap();
                    assert!(base.contains_key(t), "{a}: {key}: the base has no {t}");
                }
            }
            // the base weights PEFT saved beside blocks (`<module>.base_layer.weight`) are loaded
            // only for modules it targets
            let unloaded_base = |k: &str| {
                let k = k.trim_start_matches("base_model.model.");
                k.split_once(".base_layer.").is_some_and(|(m, _)| untargeted.iter().any(|u| u == m))
            };
            // with a resized vocabulary PEFT also saves its modules_to_save wrappers' insides
            let wrapper = |k: &str| k.contains(".original_module.") || k.contains(".modules_to_save.");
            let mts: Vec<String> = tensors
                .keys()
                .filter(|k| !k.contains("_block") && !unloaded_base(k) && !wrapper(k))
                .map(|k| {
                    let target = k.trim_start_matches("base_model.model.").replace(".base_layer.", ".");
                    // the module's stored name (found by its weight), with the tensor's own name
                    let (module, tensor) = target.rsplit_once('.').unwrap();
                    format!("{}.{tensor}", stored_tensor(&base, module).strip_suffix(".weight").unwrap())
                })
                .collect();
            assert_eq!(j["modules_to_save"], serde_json::json!(mts), "{a}");
            let ignored: Vec<&String> = tensors.keys().filter(|k| unloaded_base(k) || wrapper(k)).collect();
            let mut ignored_keys: Vec<&str> =
                j["ignored_keys"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
            ignored_keys.sort();
            assert_eq!(ignored_keys, ignored, "{a}");
            assert_eq!(j["compatible"], true);
            let mut warnings: Vec<&str> =
                j["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
            // a classifier trained on the causal LM: PEFT's merge saved another class, which
            // inspect names, with the head it adds
            let config = |dir: &Path| -> serde_json::Value {
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
            };
            let peft_class = config(&c.dir.join("merged"))["architectures"][0].clone();
            let made = warnings.iter().position(|w| w.contains("the output is a"));
            if peft_class != config(&fixtures().join(&c.base))["architectures"][0] {
                let class = peft_class.as_str().unwrap();
                let w = warnings.remove(made.unwrap_or_else(|| panic!("{a}: no warning that the merge is a {class}")));
                assert!(w.contains(&format!("the output is a {class}")), "{w}");
                let added: Vec<&serde_json::Value> =
                    j["replacements"].as_array().unwrap().iter().filter(|r| r["new_in"] == class).collect();
                assert!(!added.is_empty(), "{a}: {}", j["replacements"]);
                for r in added {
                    assert!(!base.contains_key(r["target"].as_str().unwrap()), "{a}: {r}");
                }
            } else {
                assert_eq!(made, None, "{a}: {warnings:?}");
            }
            if c.rounding_once && c.has_bat {
                // saved by a PEFT that merges BAT rounding once: said first
                let w = warnings.remove(0);
                assert!(w.contains("rounds BAT's W + delta once") && w.contains("--rounding once"), "{w}");
            }
            if cfg["target_modules"].is_null() {
                // PEFT's default for the base's model type, said first
                let w = warnings.remove(0);
                assert!(w.contains("names no target_modules") && w.contains("model_type \"llama\""), "{w}");
            }
            if cfg["target_modules"].as_array().is_some_and(|t| t.len() >= 20) && !cfg["layers_to_transform"].is_null()
            {
                // the list PEFT makes of it, said first
                let w = warnings.remove(0);
                assert!(
                    w.contains(&format!(
                        "lists {} modules, which PEFT shortens",
                        cfg["target_modules"].as_array().unwrap().len()
                    )),
                    "{w}"
                );
            }
            if let Some(first) = without_blocks.first() {
                let w = warnings.pop().unwrap();
                assert!(w.contains(&format!("targets {} modules", without_blocks.len())), "{w}");
                assert!(w.contains(&format!("{first:?}")) && w.contains("initial blocks"), "{w}");
                // and says why, where that is "all-linear"
                assert_eq!(
                    w.contains("\"all-linear\" takes every linear layer"),
                    cfg["target_modules"] == "all-linear",
                    "{w}"
                );
            }
            if untargeted.is_empty() {
                assert!(warnings.is_empty(), "{a}: {warnings:?}");
            } else {
                assert_eq!(warnings.len(), 1 + ignored.len(), "{a}: {warnings:?}");
                let w = warnings.last().unwrap();
                assert!(w.contains(&format!("{} of its {} blocks", untargeted.len(), blocks.len())), "{w}");
                assert!(w.contains(&format!("{:?}", untargeted[0])), "{w}");
            }
        }
    }
}

#[test]
fn inspect_text_is_readable() {
    let dir = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    let o = run(&["inspect", "adapter", dir.to_str().unwrap()]);
    ok(&o);
    let text = stdout(&o);
    for needle in
        ["MISS", "default", "r 8", "7 adapted", "lm_head.weight", "model.layers.1.self_attn.q_proj", "PEFT 0.18.1"]
    {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // `--adapter DIR`, as merge spells it, prints the same; both at once, or neither, is a usage error
    let flag = run(&["inspect", "adapter", "--adapter", dir.to_str().unwrap()]);
    ok(&flag);
    assert_eq!(stdout(&flag), text);
    for args in [
        vec!["inspect", "adapter", dir.to_str().unwrap(), "--adapter", dir.to_str().unwrap()],
        vec!["inspect", "adapter"],
    ] {
        assert_eq!(run(&args).status.code(), Some(2), "{args:?}");
    }
    // the rules that leave blocks out are shown with the targets
    let narrowed = fixtures().join("cases/bone-default-retargeted-bf16/adapter");
    let o = run(&["inspect", "adapter", narrowed.to_str().unwrap()]);
    ok(&o);
    let text = stdout(&o);
    for needle in ["layer subset  [1]", "excludes      [model.layers.1.self_attn.k_proj]", "13 more blocks"] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!stdout(&run(&["inspect", "adapter", dir.to_str().unwrap()])).contains("excludes"));
    // "all-linear" with what PEFT makes of it
    let all_linear = fixtures().join("cases/bone-default-all-linear-bf16/adapter");
    let o = run(&["inspect", "adapter", all_linear.to_str().unwrap()]);
    ok(&o);
    let text = stdout(&o);
    for needle in
        ["targets       all-linear (as PEFT resolves it: every linear layer but the output layer)", "1 more blocks"]
    {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn bat_sums_amd_unmerges_match_peft_on_an_amd_processor() {
    // PEFT's unmerges of the committed merges made on an AMD processor (fixtures/generate.py
    // --amd), and of the AMD-only cases' own merges: with --bat-sums amd, bone-tool inverts I + B
    // as torch does there up to r = 149 (each a − l·u rounded twice, where the Intel processor
    // fuses it; from r = 9 the solves in blocks of 4 rows, ops/fours.rs; from 17 the LU's panels in
    // Crout's order, ops/crout.rs, some sums by where each block starts in torch's batch) and sums
    // the GEMM as MKL there does: PEFT's bytes, which the Intel processor's differ from. Above 149
    // (the wide case, r = 200) f64's inverse, close.
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = vec![];
    for c in cases().into_iter().chain(amd_only_cases()) {
        let Some(peft) = &c.unmerged_amd else { continue };
        let peft = load(&fixtures().join(peft));
        let is_f32 = peft.values().any(|t| t.dtype == safetensors::Dtype::F32);
        let merged = if c.dir.join("merged").exists() { c.dir.join("merged") } else { c.dir.join("merged-amd") };
        let out = tmp.path().join(format!("{}-amd", c.name));
        apply_env("unmerge", &merged, &c, &out, None, false, &["--bat-sums", "amd"]);
        let bad = compare(&load(&out), &peft, unmerge_expect(&c, c.bat_inverted_amd, is_f32));
        assert!(bad.is_empty(), "{}: --bat-sums amd unmerge differs from PEFT's:\n{}", c.name, bad.join("\n"));
        if c.bat_inverted_amd {
            let out = tmp.path().join(format!("{}-intel", c.name));
            apply_env("unmerge", &merged, &c, &out, None, false, &[]);
            assert!(!compare(&load(&out), &peft, Expect::Bytes).is_empty(), "{}: Intel's give the same", c.name);
        }
        checked.push((c.name.clone(), c.bat_inverted_amd));
    }
    // every one but the wide case in bytes: r = 4, 8 (six cases), 12, 16, 18, 19 (four blocks, one
    // at each alignment), 24, 45, 48 and 100, and r = 8 to 11 on weights of a single block row or
    // column (MKL's dot products there, or its in-order sums where PEFT holds the weight
    // column-major after a BAT unmerge at r = 1), whose Intel unmerge differs too
    let exact: Vec<&str> = checked.iter().filter(|c| c.1).map(|c| c.0.as_str()).collect();
    let wanted = [
        "miss-bat-f32",
        "bone-bat-r12-f32",
        "miss-bat-r16-f32",
        "bone-bat-r18-f32",
        "bone-bat-r19-f32",
        "miss-bat-r24-bf16",
        "miss-bat-r45-f32",
        "bone-bat-r48-f32",
        "bone-bat-r8-single-f32",
        "miss-bat-r9-single-f32",
        "bone-bat-r10-single-f32",
        "miss-bat-r11-single-f32",
        "miss-bat-r10-transposed-f32",
        "miss-bat-r136-f32",
    ];
    assert!(
        checked.len() >= 16 && exact.len() + 1 == checked.len() && wanted.iter().all(|n| exact.contains(n)),
        "{checked:?}"
    );
}
