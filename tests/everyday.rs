//! Everyday flags: --dry-run shows the plan and writes nothing; --json gives scripts one object.

mod common;
use common::*;
use std::collections::BTreeMap;

#[test]
fn dry_run_lists_the_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = fixtures().join("bases/llama-bf16-sharded");
    let adapter = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    let args = [
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
    ];
    let o = run(&args);
    ok(&o);
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary folder either");
    let text = stdout(&o);
    assert!(
        text.contains("lm_head.weight") && text.contains("replaced by") && text.contains("nothing written"),
        "{text}"
    );
    let mut jargs = args.to_vec();
    jargs.push("--json");
    let o = run(&jargs);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // independent count: blocks and replacements in the adapter file
    let n = load(&adapter.join("adapter_model.safetensors")).len();
    assert_eq!(j["tensors_changed"], n);
    assert_eq!(j["changed"].as_array().unwrap().len(), n);
    assert_eq!(
        j["tensors_changed"].as_u64().unwrap() + j["tensors_copied"].as_u64().unwrap(),
        load(&base).len() as u64
    );
    assert_eq!(j["copied"].as_array().unwrap().len() as u64, j["tensors_copied"].as_u64().unwrap());
    assert_eq!(j["files"].as_array().unwrap().len(), 3);
    assert_eq!(j["index"], "model.safetensors.index.json");
    assert!(!out.exists());
}

#[test]
fn json_summary_after_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = fixtures().join("bases/llama-f32");
    let adapter = fixtures().join("cases/bone-default-f32/adapter");
    let o = merge_with(&base, &adapter, &out, &["-q", "--json"]);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["command"], "merge");
    assert_eq!(j["tensors_changed"], 14);
    assert_eq!(j["bytes_written"], std::fs::metadata(out.join("model.safetensors")).unwrap().len());
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["bytes_read"], load(&base).values().map(|t| t.data.len()).sum::<usize>());
    let t = &j["timings"];
    for k in ["read", "compute", "write", "fsync", "wall"] {
        assert!(t[k].as_f64().unwrap() >= 0.0, "{k}: {t}");
    }
    assert!(t["wall"].as_f64().unwrap() <= j["seconds"].as_f64().unwrap());
    assert!(t.get("h2d").is_none(), "no GPU phases on the CPU");
    // the process's own usage: some CPU time, and the page faults of at least its own start
    // (getrusage; Windows keeps no such counts, and the field is left out there)
    let p = &t["process"];
    if cfg!(unix) {
        assert!(p["user"].as_f64().unwrap() + p["system"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["minor_faults"].as_i64().unwrap() > 0, "{p}");
    } else {
        assert!(p.is_null(), "{p}");
    }

    // --timings: a table on stderr, nothing on stdout
    let o = merge_with(&base, &adapter, &tmp.path().join("t"), &["-q", "--timings"]);
    ok(&o);
    let err = stderr(&o);
    let process = if cfg!(unix) { "process" } else { "pipeline" };
    for stage in ["read", "compute", "write", "fsync", "pipeline", process] {
        assert!(err.lines().any(|l| l.trim_start().starts_with(stage)), "{stage}: {err}");
    }
    assert_eq!(stdout(&o), "");
}

#[test]
fn completions_and_man_page_come_from_the_command_line_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell]);
        ok(&o);
        let text = stdout(&o);
        for sub in ["merge", "unmerge", "inspect", "verify", "convert"] {
            assert!(text.contains(sub), "{shell}: {sub}");
        }
        assert!(text.contains("adapter-prefix"), "{shell}");
    }
    let o = run(&["man"]);
    ok(&o);
    let roff = stdout(&o);
    assert!(roff.contains(".TH bone-tool 1") && roff.contains("merge") && roff.contains("Exit codes"), "{roff}");
}

/// A tensor rounded to another float dtype with the half crate (round to nearest even, as torch's
/// `.to(dtype)`): the expected output of --dtype, computed independently of bone-tool.
fn cast(t: &T, to: safetensors::Dtype) -> T {
    let vals = values(t);
    let data = match to {
        safetensors::Dtype::F32 => vals.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
        safetensors::Dtype::BF16 => vals.iter().flat_map(|v| half::bf16::from_f32(*v as f32).to_le_bytes()).collect(),
        safetensors::Dtype::F16 => vals.iter().flat_map(|v| half::f16::from_f32(*v as f32).to_le_bytes()).collect(),
        d => panic!("{d:?}"),
    };
    T { dtype: to, shape: t.shape.clone(), data }
}

fn config(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn dtype_rounds_peft_merge_once_and_updates_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let case = fixtures().join("cases/bone-default-f32");
    let o =
        merge_with(&fixtures().join("bases/llama-f32"), &case.join("adapter"), &out, &["--dtype", "bf16", "--json"]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("warning:") && err.contains("blocks are F32 and the output is BF16"), "{err}");
    let ours = load(&out);
    let peft = load(&case.join("merged"));
    assert_eq!(ours.len(), peft.len());
    for (name, t) in &peft {
        let want = cast(t, safetensors::Dtype::BF16);
        assert_eq!(ours[name].dtype, safetensors::Dtype::BF16, "{name}");
        assert!(ours[name].data == want.data, "{name}: not PEFT's f32 merge rounded once to bf16");
    }
    assert_eq!(config(&out)["dtype"], "bfloat16");
    let base_cfg = config(&fixtures().join("bases/llama-f32"));
    let mut expected_cfg = base_cfg.clone();
    expected_cfg["dtype"] = "bfloat16".into();
    assert_eq!(config(&out), expected_cfg, "only the dtype changes in config.json");
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["tensors_cast"], peft.len());
}

#[test]
fn dtype_f32_widens_exactly_and_unmerge_can_round_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (wide, back) = (tmp.path().join("wide"), tmp.path().join("back"));
    let case = fixtures().join("cases/bone-default-tail-bf16");
    let adapter = case.join("adapter");
    ok(&merge_with(&fixtures().join("bases/llama-bf16"), &adapter, &wide, &["-q", "--dtype", "f32"]));
    let ours = load(&wide);
    for (name, t) in load(&case.join("merged")) {
        assert!(ours[&name].data == cast(&t, safetensors::Dtype::F32).data, "{name}: widening is exact");
    }
    assert_eq!(config(&wide)["dtype"], "float32");
    // unmerge in f32, then round to bf16: the f32 arithmetic PEFT does on the bf16 weights
    let args = ["-q", "unmerge", "--merged", s(&wide), "--adapter", s(&adapter), "--out", s(&back), "--dtype", "bf16"];
    ok(&run(&args));
    let ours = load(&back);
    for (name, t) in load(&case.join("unmerged")) {
        assert!(ours[&name].data == t.data, "{name}: differs from PEFT's bf16 unmerge");
    }
    assert_eq!(config(&back)["dtype"], "bfloat16");
}

#[test]
fn max_shard_size_reshards_greedily_with_a_fresh_index() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-default-f32");
    // 50 KB: several tensors per file; 10 KB: the embedding, lm_head and the MLP weights (15-18 KB)
    // are bigger than a file may be and get one each
    for (max, size) in [(50_000u64, "50KB"), (10_000, "10KB")] {
        reshard_check(&case, &tmp.path().join(size), max, size);
    }

    // and back into one file: model.safetensors, no index
    let one = tmp.path().join("one");
    let sharded = fixtures().join("cases/miss-default-sharded-bf16");
    let base = fixtures().join("bases/llama-bf16-sharded");
    ok(&merge_with(&base, &sharded.join("adapter"), &one, &["-q", "--max-shard-size", "1GB"]));
    let names: Vec<String> =
        std::fs::read_dir(&one).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"model.safetensors".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("index") || n.contains("-of-")), "{names:?}");
    let (ours, peft) = (load(&one), load(&sharded.join("merged")));
    assert_eq!(ours.len(), peft.len());
    assert!(peft.iter().all(|(k, t)| ours[k].data == t.data));
}

#[test]
fn shards_written_side_by_side_are_the_same_files() {
    // One writer per shard at a time (BONE_TOOL_WRITERS) against one writer for all: the same
    // bytes in every file. The sharded fixtures (3 and 2 files, BAT and default, lm_head replaced),
    // and a re-sharding into 10 KB files, more files than writers, so that they go in groups.
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("bases/llama-bf16-sharded", "cases/miss-default-sharded-bf16/adapter", None),
        ("bases/llama-f32-sharded", "cases/bone-bat-sharded-f32/adapter", None),
        ("bases/llama-f32", "cases/bone-bat-f32/adapter", Some("10KB")),
    ];
    const WRITERS: [&str; 4] = ["1", "2", "3", "8"];
    for (n, (base, adapter, max)) in cases.iter().enumerate() {
        let mut outs = vec![];
        for writers in WRITERS {
            let out = tmp.path().join(format!("{n}-{writers}"));
            let mut command = bin();
            command.args(["-q", "merge", "--base"]).arg(fixtures().join(base));
            command.arg("--adapter").arg(fixtures().join(adapter)).arg("--out").arg(&out);
            if let Some(m) = max {
                command.args(["--max-shard-size", m]);
            }
            ok(&command.env("BONE_TOOL_WRITERS", writers).output().unwrap());
            outs.push(digest_relative(&out));
        }
        let files = outs[0].iter().filter(|(p, _)| p.to_string_lossy().ends_with(".safetensors")).count();
        assert!(files >= 2, "case {n}: {files} files, not sharded");
        for (k, o) in outs.iter().enumerate().skip(1) {
            assert!(o == &outs[0], "case {n}: {} writers wrote other files than one writer", WRITERS[k]);
        }
    }
}

fn reshard_check(case: &std::path::Path, out: &std::path::Path, max: u64, size: &str) {
    ok(&merge_with(&fixtures().join("bases/llama-f32"), &case.join("adapter"), out, &["-q", "--max-shard-size", size]));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    let n = files.len();
    assert!(n > 2, "{files:?}");
    for (k, f) in files.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", k + 1));
    }
    assert!(!out.join("model.safetensors").exists());
    // The base's tensor order, as its file stores it (by offset).
    let base_file = std::fs::read(fixtures().join("bases/llama-f32/model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&base_file).unwrap();
    let mut order: Vec<(usize, String, u64)> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (info.data_offsets.0, name, (info.data_offsets.1 - info.data_offsets.0) as u64))
        .collect();
    order.sort();
    // huggingface_hub's split_state_dict_into_shards_factory, as documented there: tensors in
    // order fill the current file until the next would overflow it; a tensor bigger than the
    // maximum is put in a file of its own at once (so it may come before the file being filled).
    let mut expected: Vec<Vec<&str>> = vec![];
    let (mut current, mut current_size) = (vec![], 0);
    for (_, name, bytes) in &order {
        if *bytes > max {
            expected.push(vec![name.as_str()]);
            continue;
        }
        if current_size + bytes > max && !current.is_empty() {
            expected.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(name.as_str());
        current_size += bytes;
    }
    if !current.is_empty() {
        expected.push(current);
    }
    assert_eq!(files.len(), expected.len());
    let size_of: std::collections::HashMap<&str, u64> = order.iter().map(|(_, n, b)| (n.as_str(), *b)).collect();
    let mut total = 0;
    let mut big = 0;
    for (f, want) in files.iter().zip(&expected) {
        let bytes = std::fs::read(out.join(f)).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut names: Vec<(usize, String)> = m.tensors().into_iter().map(|(n, i)| (i.data_offsets.0, n)).collect();
        names.sort();
        let got: Vec<&str> = names.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(&got, want, "{f}");
        let size: u64 = got.iter().map(|n| size_of[n]).sum();
        assert!(size <= max || got.len() == 1, "{f}: {size} bytes");
        big += usize::from(size > max);
        for n in got {
            assert_eq!(map[n], f.as_str(), "index entry of {n}");
        }
        total += size;
    }
    assert_eq!(map.len(), order.len());
    if max == 10_000 {
        assert!(big > 0, "some tensor got a file of its own");
    }
    assert_eq!(index["metadata"]["total_size"], total);
    // values: PEFT's merge
    let (ours, peft) = (load(out), load(&case.join("merged")));
    assert!(peft.iter().all(|(k, t)| ours[k].data == t.data));
}

/// A case's adapter (on lm_head) without the lm_head.base_layer.weight PEFT saved beside it.
fn bare_adapter(case: &std::path::Path, tmp: &std::path::Path) -> std::path::PathBuf {
    let bare = tmp.join("bare");
    if !bare.exists() {
        copy_dir(&case.join("adapter"), &bare);
        edit_tensors(&bare.join("adapter_model.safetensors"), |t| {
            assert!(t.remove("base_model.model.lm_head.base_layer.weight").is_some());
        });
    }
    bare
}

/// A copy of the fixture base `fixture` in `dir/tied` with the output layer `head`'s values as its
/// (only) embedding `embed` and no head stored, as transformers saves a tied model (config.json is
/// the caller's to mark tied).
fn tied_copy(dir: &std::path::Path, fixture: &str, head: &str, embed: &str) -> std::path::PathBuf {
    let base = dir.join("tied");
    copy_dir(&fixtures().join(fixture), &base);
    edit_tensors(&base.join("model.safetensors"), |t| {
        let values = t.remove(head).unwrap();
        t.insert(embed.into(), values);
    });
    base
}

/// The tied base: llama-bf16 with lm_head's values as its (only) embedding, no lm_head stored,
/// tie_word_embeddings true, as transformers saves a tied model.
fn tied_base(dir: &std::path::Path) -> std::path::PathBuf {
    let base = tied_copy(dir, "bases/llama-bf16", "lm_head.weight", "model.embed_tokens.weight");
    let cfg = base.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true")).unwrap();
    base
}

/// Other families name their tied pair otherwise: GPT-2 and MPT `transformer.wte`, Bloom and Falcon
/// `transformer.word_embeddings` (with `lm_head`), GPT-NeoX `gpt_neox.embed_in` with `embed_out`.
/// The same model under those names (PEFT's lm_head case, its tensors renamed) merges to PEFT's
/// bytes under the same names.
#[test]
fn tied_output_layers_are_found_under_each_familys_names() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-default-lm-head-bf16");
    let peft = load(&case.join("merged"));
    for (k, (embed, head)) in [
        ("transformer.wte.weight", "lm_head"),
        ("transformer.word_embeddings.weight", "lm_head"),
        ("gpt_neox.embed_in.weight", "embed_out"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(k.to_string());
        let base = tied_base(&dir);
        edit_tensors(&base.join("model.safetensors"), |t| {
            let values = t.remove("model.embed_tokens.weight").unwrap();
            t.insert(embed.into(), values);
        });
        let adapter = dir.join("adapter");
        copy_dir(&case.join("adapter"), &adapter);
        edit_tensors(&adapter.join("adapter_model.safetensors"), |t| {
            for key in ["bone_block", "base_layer.weight"] {
                let values = t.remove(&format!("base_model.model.lm_head.{key}")).unwrap();
                t.insert(format!("base_model.model.{head}.{key}"), values);
            }
        });
        edit_json(&adapter.join("adapter_config.json"), |c| {
            for m in c["target_modules"].as_array_mut().unwrap() {
                if m == "lm_head" {
                    *m = head.into();
                }
            }
        });
        let out = dir.join("out");
        let o = merge_with(&base, &adapter, &out, &[]);
        ok(&o);
        let err = stderr(&o);
        assert!(err.contains(&format!("ties {head} to \"{embed}\"")) && err.contains("unties them"), "{err}");
        let (ours, before) = (load(&out), load(&base));
        assert!(ours[&format!("{head}.weight")].data == peft["lm_head.weight"].data, "{head}: PEFT's merged head");
        assert!(ours[embed].data == before[embed].data, "{embed} keeps the base's values");
        assert_eq!(ours.len(), peft.len(), "{:?}", ours.keys().collect::<Vec<_>>());
        for (name, t) in peft.iter().filter(|(n, _)| !n.contains("lm_head") && !n.contains("embed_tokens")) {
            assert!(ours[name].data == t.data, "{name}");
        }
        assert_eq!(config(&out)["tie_word_embeddings"], false);
        ok(&run(&["verify", "--base", s(&base), "--adapter", s(&adapter), "--merged", s(&out)]));
    }
}

/// A classifier trained on a tied causal LM (AutoModelForSequenceClassification on a checkpoint
/// that ties lm_head to embed_tokens) has no output layer: the merge writes no lm_head, even where
/// the adapter also replaces the embedding, and the tie stays as config.json has it. The PEFT case
/// is the same classifier made from the untied llama-bf16, whose decoder layers the tied copy
/// shares; only the embedding differs between the two bases.
#[test]
fn a_classifier_on_a_tied_causal_lm_merges_without_an_output_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tied_base(tmp.path());
    let case = fixtures().join("cases/miss-bat-seqcls-from-causal-bf16");
    let adapter = tmp.path().join("adapter");
    copy_dir(&case.join("adapter"), &adapter);
    let mut t = load(&adapter.join("adapter_model.safetensors"));
    let mut embed = load(&base)["model.embed_tokens.weight"].clone();
    embed.data[0] ^= 0x01; // differs from the tied weights in one bit
    t.insert("base_model.model.model.embed_tokens.weight".into(), embed.clone());
    save(&adapter.join("adapter_model.safetensors"), &t);
    let out = tmp.path().join("out");
    let o = merge_with(&base, &adapter, &out, &[]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("the output is a LlamaForSequenceClassification") && !err.contains("untie"), "{err}");
    // (a tied base stores no output layer to leave out)
    assert!(err.contains(", 1 added, ") && !err.contains("dropped"), "{err}");
    let (ours, peft) = (load(&out), load(&case.join("merged")));
    assert!(!ours.contains_key("lm_head.weight"), "{:?}", ours.keys().collect::<Vec<_>>());
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>());
    assert!(ours["model.embed_tokens.weight"].data == embed.data, "the embedding is the adapter's");
    for (name, t) in peft.iter().filter(|(n, _)| *n != "model.embed_tokens.weight") {
        assert!(ours[name].data == t.data, "{name}: PEFT's");
    }
    let (cfg, peft_cfg) = (config(&out), config(&case.join("merged")));
    assert_eq!(cfg["architectures"], peft_cfg["architectures"]);
    assert_eq!(cfg["id2label"], peft_cfg["id2label"]);
    assert_eq!(cfg["tie_word_embeddings"], true, "a classifier has no output layer to untie");
    // the tokenizer's files come along, the generation config does not (as transformers saves it)
    assert!(out.join("tokenizer_config.json").exists() && !out.join("generation_config.json").exists());
    assert!(base.join("generation_config.json").exists());
    ok(&run(&["verify", "--base", s(&base), "--adapter", s(&adapter), "--merged", s(&out)]));
    // inspect says what the adapter was trained as and what the merge makes
    let o = run(&["inspect", "adapter", s(&case.join("adapter")), "--base", s(&fixtures().join("bases/llama-bf16"))]);
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains("task          SEQ_CLS (sequence classification)"), "{text}");
    assert!(text.contains("adds          score.weight (the merge is a LlamaForSequenceClassification)"), "{text}");
    // a sharded base: the head goes into the last shard, the index maps it and not lm_head, and
    // counts the parameters written
    let sharded = tmp.path().join("sharded");
    ok(&merge_with(&fixtures().join("bases/llama-bf16-sharded"), &case.join("adapter"), &sharded, &[]));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
    let files: Vec<String> = index["weight_map"].as_object().unwrap().values().map(|f| f.to_string()).collect();
    assert_eq!(index["weight_map"]["score.weight"].to_string(), *files.iter().max().unwrap());
    assert!(index["weight_map"].get("lm_head.weight").is_none());
    let written = load(&sharded);
    let params: usize = written.values().map(|t| t.shape.iter().product::<usize>()).sum();
    assert_eq!(index["metadata"]["total_parameters"], params);
    assert_eq!(written.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>());
    // a base whose config.json names no class: which task model is unknown, so it is refused
    edit_json(&base.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("architectures");
    });
    let o = merge_with(&base, &adapter, &tmp.path().join("refused"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("\"score.weight\"") && err.contains("ForCausalLM class in \"architectures\""), "{err}");
    assert!(!tmp.path().join("refused").exists());
}

/// An adapter trained after resize_token_embeddings (tokens added) holds copies of the embedding
/// and the output layer with more rows: the merge takes them (PEFT's case), next to other outputs
/// of one --each run that keep the base's rows; where a copy of either is missing (PEFT's merge
/// would hold resize_token_embeddings' random rows) or the base ties them, it is refused.
#[test]
fn a_resized_vocabulary_is_merged_from_the_adapters_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bases/llama-bf16");
    let case = fixtures().join("cases/bone-default-resized-vocab-bf16");
    // --each: the resized output and one at the base's size, the base read once
    let (resized, other) = (tmp.path().join("in/resized"), tmp.path().join("in/other"));
    copy_dir(&case.join("adapter"), &resized);
    copy_dir(&fixtures().join("cases/bone-bat-bf16/adapter"), &other);
    let pattern = tmp.path().join("each/{name}");
    ok(&run(&["merge", "--base", s(&base), "--each", s(&resized), s(&other), "--out-pattern", s(&pattern)]));
    let peft = load(&case.join("merged"));
    let ours = load(&tmp.path().join("each/resized"));
    assert_eq!(ours.keys().collect::<Vec<_>>(), peft.keys().collect::<Vec<_>>());
    for (name, t) in &peft {
        assert!(ours[name].data == t.data && ours[name].shape == t.shape, "{name}: PEFT's");
    }
    assert_eq!(ours["lm_head.weight"].shape, [100, 48]);
    assert_eq!(config(&tmp.path().join("each/resized"))["vocab_size"], 100);
    let bat = load(&tmp.path().join("each/other"));
    for (name, t) in &load(&fixtures().join("cases/bone-bat-bf16/merged")) {
        assert!(bat[name].data == t.data && bat[name].shape == t.shape, "{name}: the other output, PEFT's");
    }
    assert_eq!(config(&tmp.path().join("each/other"))["vocab_size"], 96);
    // without the copy of lm_head: its new rows would be random in PEFT's merge
    let half = tmp.path().join("half");
    copy_dir(&case.join("adapter"), &half);
    edit_tensors(&half.join("adapter_model.safetensors"), |t| {
        t.retain(|k, _| !k.starts_with("base_model.model.lm_head."));
    });
    let o = merge_with(&base, &half, &tmp.path().join("refused"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("100 rows") && err.contains("no copy of \"lm_head.weight\""), "{err}");
    assert!(!tmp.path().join("refused").exists());
    // a tied base stays tied, as PEFT saves it: the embedding takes the copy, and a copy of the
    // head (PEFT saves the one shared weight under both names) must be the same values
    let tied = tied_base(tmp.path());
    let same = tmp.path().join("same");
    copy_dir(&case.join("adapter"), &same);
    edit_tensors(&same.join("adapter_model.safetensors"), |t| {
        let embed = t["base_model.model.model.embed_tokens.weight"].clone();
        t.retain(|k, _| !k.contains(".modules_to_save.") && !k.contains(".original_module."));
        t.insert("base_model.model.lm_head.weight".into(), embed);
    });
    for adapter in [&half, &same] {
        let out = tmp.path().join("tied-out");
        let o = merge_with(&tied, adapter, &out, &["--force"]);
        ok(&o);
        assert!(stderr(&o).contains("still tied") && !stderr(&o).contains("untie"), "{}", stderr(&o));
        let ours = load(&out);
        assert!(!ours.contains_key("lm_head.weight"), "{:?}", ours.keys().collect::<Vec<_>>());
        let embed = &peft["model.embed_tokens.weight"];
        assert!(ours["model.embed_tokens.weight"].data == embed.data, "the adapter's copy");
        for (name, t) in peft.iter().filter(|(n, _)| !n.contains("embed_tokens") && !n.contains("lm_head")) {
            assert!(ours[name].data == t.data, "{name}: PEFT's");
        }
        assert_eq!(
            (config(&out)["tie_word_embeddings"].clone(), config(&out)["vocab_size"].clone()),
            (true.into(), 100.into())
        );
        ok(&run(&["verify", "--base", s(&tied), "--adapter", s(adapter), "--merged", s(&out)]));
    }
    // copies that differ (modules_to_save on both sides of a tied pair): refused, with the way round
    let o = merge_with(&tied, &case.join("adapter"), &tmp.path().join("refused"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("differ, but the base ties them") && stderr(&o).contains("resize_token_embeddings(100)")
    );
    assert!(!tmp.path().join("refused").exists());
}

#[test]
fn tied_embeddings_are_untied_when_an_adapter_changes_one_side() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tied_base(tmp.path());
    let case = fixtures().join("cases/bone-default-lm-head-bf16");
    // PEFT saved lm_head's base weight with the adapter (lm_head.base_layer.weight); without it, the
    // untied lm_head must start from the tied embedding's bytes.
    let bare = bare_adapter(&case, tmp.path());
    for (k, adapter) in [case.join("adapter"), bare].iter().enumerate() {
        let out = tmp.path().join(format!("out{k}"));
        let o = merge_with(&base, adapter, &out, &[]);
        ok(&o);
        let err = stderr(&o);
        assert!(err.contains("warning:") && err.contains("unties them"), "{err}");
        let ours = load(&out);
        let peft = load(&case.join("merged")); // PEFT's merge into the untied base with the same lm_head
        let before = load(&base);
        assert!(ours["lm_head.weight"].data == peft["lm_head.weight"].data, "lm_head: PEFT's merged head");
        assert!(
            ours["model.embed_tokens.weight"].data == before["model.embed_tokens.weight"].data,
            "the embedding keeps the base's values"
        );
        for (k, t) in &peft {
            if k != "model.embed_tokens.weight" {
                assert!(ours[k].data == t.data, "{k}");
            }
        }
        assert_eq!(config(&out)["tie_word_embeddings"], false);
        // verify agrees, recomputing from the tied base
        ok(&run(&["verify", "--base", s(&base), "--adapter", s(adapter), "--merged", s(&out)]));
    }
    // the other side: an adapter that replaces the embedding (modules_to_save) and leaves lm_head
    // alone gets lm_head written with the tied weights' old values
    let emb = tmp.path().join("emb");
    copy_dir(&case.join("adapter"), &emb);
    let mut t = load(&emb.join("adapter_model.safetensors"));
    t.remove("base_model.model.lm_head.bone_block").unwrap();
    let mut changed = t.remove("base_model.model.lm_head.base_layer.weight").unwrap();
    changed.data[0] ^= 0x01; // differs from the tied weights in one bit
    t.insert("base_model.model.model.embed_tokens.weight".into(), changed.clone());
    save(&emb.join("adapter_model.safetensors"), &t);
    let out = tmp.path().join("out-emb");
    let o = merge_with(&base, &emb, &out, &[]);
    ok(&o);
    assert!(stderr(&o).contains("unties them"), "{}", stderr(&o));
    let (ours, before) = (load(&out), load(&base));
    assert!(ours["model.embed_tokens.weight"].data == changed.data, "the embedding is the adapter's");
    assert!(ours["lm_head.weight"].data == before["model.embed_tokens.weight"].data, "lm_head keeps the tied values");
    assert_eq!(config(&out)["tie_word_embeddings"], false);
    // --each on the tied base: one adapter unties (an lm_head only its output has), the other keeps
    // the tie; one read of the base gives each output what a run of its own gives
    let (a1, a2) = (tmp.path().join("each-in/head"), tmp.path().join("each-in/bat"));
    copy_dir(&bare_adapter(&case, tmp.path()), &a1);
    copy_dir(&fixtures().join("cases/bone-bat-bf16/adapter"), &a2);
    let pattern = tmp.path().join("each-out/{name}");
    ok(&run(&["-q", "merge", "--base", s(&base), "--each", s(&a1), s(&a2), "--out-pattern", s(&pattern)]));
    for a in [&a1, &a2] {
        let alone = tmp.path().join("alone");
        let _ = std::fs::remove_dir_all(&alone);
        ok(&merge_with(&base, a, &alone, &["-q"]));
        let each = tmp.path().join("each-out").join(a.file_name().unwrap());
        assert!(
            digest_relative(&each) == digest_relative(&alone),
            "{}: --each differs from a run of its own",
            a.display()
        );
        assert_eq!(load(&each).contains_key("lm_head.weight"), a == &a1, "only the first unties");
    }
    // --keep-tied refuses, leaving nothing
    let refused = tmp.path().join("refused");
    let o = merge_with(&base, &case.join("adapter"), &refused, &["--keep-tied"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--keep-tied") && !refused.exists());
    // --untie spells out the default (the same files); with --keep-tied it is a usage error
    let spelled = tmp.path().join("spelled");
    ok(&merge_with(&base, &emb, &spelled, &["-q", "--untie"]));
    assert!(digest_relative(&spelled) == digest_relative(&out), "--untie differs from the default");
    let o = merge_with(&base, &emb, &refused, &["--untie", "--keep-tied"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot be used with") && !refused.exists(), "{}", stderr(&o));
    // an adapter that leaves both sides alone keeps the model tied
    let other = tmp.path().join("other");
    ok(&merge_with(&base, &fixtures().join("cases/bone-bat-bf16/adapter"), &other, &["-q"]));
    assert_eq!(config(&other)["tie_word_embeddings"], true);
    assert!(!load(&other).contains_key("lm_head.weight"));
    // inspect --base tells which: merge's warning, and unties_embeddings
    for (adapter, unties) in [(case.join("adapter"), true), (fixtures().join("cases/bone-bat-bf16/adapter"), false)] {
        let o = run(&["inspect", "adapter", s(&adapter), "--base", s(&base), "--json"]);
        ok(&o);
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(r["unties_embeddings"], unties, "{}", adapter.display());
        let warned = r["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("unties them"));
        assert_eq!(warned, unties, "{r}");
    }
}

/// A config set to "all-linear" by hand on a MiSS mini adapter (blocks on k_proj and v_proj,
/// mini_r = 24): PEFT would put its layer on every linear layer, but gate_proj and up_proj have
/// 80 outputs, no multiple of 24, where PEFT cannot build a mini layer and refuses the adapter
/// (PEFT 0.18.1: "mini_r is divided along the out_features dimension"). bone-tool merges the
/// blocks as PEFT merges them under the original config, gives the layers that fit PEFT's zero
/// block, leaves those four alone, and says so.
#[test]
fn layers_peft_cannot_build_are_left_alone_and_warned_of() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/miss-mini-f32");
    let adapter = tmp.path().join("adapter");
    copy_dir(&case.join("adapter"), &adapter);
    edit_json(&adapter.join("adapter_config.json"), |c| c["target_modules"] = "all-linear".into());
    let base = fixtures().join("bases/llama-f32");
    let out = tmp.path().join("out");
    let o = merge_with(&base, &adapter, &out, &[]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("targets 10 modules of the base that the adapter has no block for"), "{err}");
    assert!(err.contains("PEFT cannot build its layer on 4 of the modules without a block"), "{err}");
    assert!(err.contains("out_features 80 is not a multiple of mini_r 24") && err.contains("refuses"), "{err}");
    let (ours, peft, before) = (load(&out), load(&case.join("merged")), load(&base));
    for (k, t) in &ours {
        // PEFT's merge under the original config (k_proj, v_proj); elsewhere the base's values
        let expected = if k.contains("k_proj") || k.contains("v_proj") { &peft[k] } else { &before[k] };
        assert_eq!(values(t), values(expected), "{k}");
    }
}

/// An adapter whose config targets a tied lm_head but whose file has no block for it (PEFT's
/// "missing adapter keys"): PEFT puts its layer on the weight the head shares with the embedding
/// all the same, loads the saved base layer into it when the file has one, and merges the
/// layer's initial block, zeros, which turn -0 into +0 and change nothing else. So the model stays
/// tied, the embedding gets what PEFT's shared weight gets, and bone-tool warns of the block.
#[test]
fn a_tied_head_without_its_block_stays_tied_and_is_warned_of() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tied_base(tmp.path());
    let embed = "model.embed_tokens.weight";
    edit_tensors(&base.join("model.safetensors"), |t| {
        let e = t.get_mut(embed).unwrap();
        e.data[..4].copy_from_slice(&[0x00, 0x80, 0x00, 0x80]); // two bf16 -0s
    });
    let before = load(&base);
    let case = fixtures().join("cases/bone-default-lm-head-bf16");
    let saved =
        load(&case.join("adapter/adapter_model.safetensors"))["base_model.model.lm_head.base_layer.weight"].clone();
    assert!(saved.data[..4] != [0x00, 0x80, 0x00, 0x80], "the saved base layer differs from the edited embedding");
    let peft = load(&case.join("merged"));
    // -0 + 0 = +0 (bf16, little-endian)
    let plus_zero = |data: &[u8]| -> Vec<u8> {
        data.chunks_exact(2).flat_map(|v| if v == [0x00, 0x80] { [0x00, 0x00] } else { [v[0], v[1]] }).collect()
    };
    let with_layer = tmp.path().join("with-layer");
    copy_dir(&case.join("adapter"), &with_layer);
    edit_tensors(&with_layer.join("adapter_model.safetensors"), |t| {
        assert!(t.remove("base_model.model.lm_head.bone_block").is_some());
    });
    let zeros_only = tmp.path().join("zeros-only");
    copy_dir(&with_layer, &zeros_only);
    edit_tensors(&zeros_only.join("adapter_model.safetensors"), |t| {
        assert!(t.remove("base_model.model.lm_head.base_layer.weight").is_some());
    });
    for (adapter, shared) in [(&with_layer, &saved.data), (&zeros_only, &before[embed].data)] {
        let name = adapter.file_name().unwrap().to_str().unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        let o = merge_with(&base, adapter, &out, &[]);
        ok(&o);
        let err = stderr(&o);
        assert!(err.contains("targets \"lm_head\"") && err.contains("no block for it"), "{name}: {err}");
        assert!(!err.contains("unties"), "{name}: {err}");
        let ours = load(&out);
        assert!(!ours.contains_key("lm_head.weight"), "{name}: still tied, no head stored");
        assert_eq!(config(&out)["tie_word_embeddings"], true, "{name}");
        assert!(ours[embed].data == plus_zero(shared), "{name}: the embedding is PEFT's shared weight");
        for (k, t) in &peft {
            if k != embed && k != "lm_head.weight" {
                assert!(ours[k].data == t.data, "{name}: {k}");
            }
        }
        ok(&run(&["verify", "--base", s(&base), "--adapter", s(adapter), "--merged", s(&out)]));
        let o = run(&["inspect", "adapter", s(adapter), "--base", s(&base), "--json"]);
        let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(r["modules_without_blocks"], serde_json::json!(["lm_head"]), "{name}");
        assert_eq!(r["unties_embeddings"], false, "{name}");
        // unmerge: the saved base layer restores the weight; else the zero block comes off again
        let back = tmp.path().join(format!("back-{name}"));
        ok(&run(&["-q", "unmerge", "--merged", s(&out), "--adapter", s(adapter), "--out", s(&back)]));
        let restored = load(&back);
        assert!(!restored.contains_key("lm_head.weight"), "{name}: unmerged, still tied");
        let expected = if adapter == &with_layer { saved.data.clone() } else { plus_zero(shared) };
        assert!(restored[embed].data == expected, "{name}: unmerged embedding");
    }
}

/// A tied model that PEFT merged in place: the head's block went into the weight the head shares
/// with the embedding, so both sides carry it. Unmerge takes it out of that shared weight, as
/// PEFT's unmerge does (before, it untied the pair and left the embedding merged), and the model
/// stays tied; with the adapter's saved base layer, that layer comes back.
#[test]
fn unmerging_a_tied_model_merged_in_place_keeps_it_tied() {
    let tmp = tempfile::tempdir().unwrap();
    let embed = "model.embed_tokens.weight";
    let case = fixtures().join("cases/bone-default-lm-head-bf16");
    // PEFT's merge into the tied base (whose embedding is llama-bf16's lm_head): the case's merged
    // head, stored as the embedding
    let tied_merged =
        tied_copy(&tmp.path().join("m"), "cases/bone-default-lm-head-bf16/merged", "lm_head.weight", embed);
    edit_json(&tied_merged.join("config.json"), |c| c["tie_word_embeddings"] = true.into());
    let bare = bare_adapter(&case, tmp.path());
    // the head unmerged untied (the case's merged model stores lm_head): what the shared weight gets
    let untied = tmp.path().join("untied");
    ok(&run(&["-q", "unmerge", "--merged", s(&case.join("merged")), "--adapter", s(&bare), "--out", s(&untied)]));
    let untied = load(&untied);
    let saved =
        load(&case.join("adapter/adapter_model.safetensors"))["base_model.model.lm_head.base_layer.weight"].clone();
    assert!(untied["lm_head.weight"].data != saved.data, "the saved layer differs from the computed unmerge");
    for (adapter, shared) in [(&bare, &untied["lm_head.weight"]), (&case.join("adapter"), &saved)] {
        let out = tmp.path().join(format!("out-{}", adapter.file_name().unwrap().to_str().unwrap()));
        let o = run(&["unmerge", "--merged", s(&tied_merged), "--adapter", s(adapter), "--out", s(&out)]);
        ok(&o);
        assert!(!stderr(&o).contains("unties"), "{}", stderr(&o));
        let ours = load(&out);
        assert!(!ours.contains_key("lm_head.weight"), "still tied, no head stored");
        assert!(ours[embed].data == shared.data, "{}: the shared weight", adapter.display());
        for (k, t) in &untied {
            if k != embed && k != "lm_head.weight" {
                assert!(ours[k].data == t.data, "{k}");
            }
        }
    }
    // verify recomputes the tied merge in place too, and says so; the untied merge stays an error
    let base = tied_base(tmp.path());
    for adapter in [&bare, &case.join("adapter")] {
        let o = run(&["verify", "--base", s(&base), "--adapter", s(adapter), "--merged", s(&tied_merged)]);
        ok(&o);
        assert!(stderr(&o).contains("merged in place"), "{}", stderr(&o));
    }
    let mut broken = load(&tied_merged.join("model.safetensors"));
    broken.get_mut(embed).unwrap().data = load(&base)[embed].data.clone(); // the head's blocks left out
    save(&tied_merged.join("model.safetensors"), &broken);
    let o = run(&["verify", "--base", s(&base), "--adapter", s(&bare), "--merged", s(&tied_merged)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// Unmerging a stack where the later adapter restores lm_head from its saved base layer and the
/// earlier one has a block there but no saved layer: the earlier block comes out of the restored
/// layer (right when the later adapter was trained on the earlier one's merge), with a warning
/// that names both, since for adapters trained on the same base the saved layer alone is the base.
#[test]
fn a_block_unmerged_from_a_later_adapters_saved_layer_is_warned_of() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-default-lm-head-bf16");
    let (earlier, later) = (bare_adapter(&case, tmp.path()), case.join("adapter"));
    let (merged, out) = (case.join("merged"), tmp.path().join("out"));
    let o =
        run(&["unmerge", "--merged", s(&merged), "--adapter", s(&earlier), "--adapter", s(&later), "--out", s(&out)]);
    ok(&o);
    let err = stderr(&o);
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("saved (restored first")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains(s(&earlier)) && warned[0].contains(s(&later)) && warned[0].contains("\"lm_head.weight\"")
    );
    // lm_head: the earlier block unmerged from the later adapter's saved layer
    let saved = load(&later.join("adapter_model.safetensors"))["base_model.model.lm_head.base_layer.weight"].clone();
    let restored = tmp.path().join("restored");
    copy_dir(&case.join("merged"), &restored);
    edit_tensors(&restored.join("model.safetensors"), |t| {
        t.get_mut("lm_head.weight").unwrap().data = saved.data.clone();
    });
    let alone = tmp.path().join("alone");
    ok(&run(&["-q", "unmerge", "--merged", s(&restored), "--adapter", s(&earlier), "--out", s(&alone)]));
    assert!(load(&out)["lm_head.weight"].data == load(&alone)["lm_head.weight"].data);
    // the other order (the saved layer restored last) is not ambiguous: no warning
    let o = run(&[
        "unmerge",
        "--merged",
        s(&case.join("merged")),
        "--adapter",
        s(&later),
        "--adapter",
        s(&earlier),
        "--out",
        s(&tmp.path().join("other")),
    ]);
    ok(&o);
    assert!(!stderr(&o).contains("restored first"), "{}", stderr(&o));
}

#[test]
fn a_tied_vision_language_model_is_untied_in_its_own_layout() {
    // A tied LLaVA (Gemma 3 and PaliGemma are tied) stores no lm_head, and transformers ties it by
    // text_config.tie_word_embeddings. An adapter on lm_head unties it: the head is written as
    // `language_model.lm_head.weight`, beside `language_model.model.embed_tokens.weight` as the
    // checkpoint names it, and text_config's flag is cleared too, else transformers would tie
    // the merged head back to the embedding when it loads the model.
    let tmp = tempfile::tempdir().unwrap();
    let (head, embed) = ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight");
    let base = tied_copy(tmp.path(), "bases/llava-bf16", head, embed);
    edit_json(&base.join("config.json"), |c| c["text_config"]["tie_word_embeddings"] = true.into());
    let case = fixtures().join("cases/miss-bat-llava-bf16");
    let bare = bare_adapter(&case, tmp.path()); // the head then starts from the embedding
    for (k, adapter) in [case.join("adapter"), bare].iter().enumerate() {
        let out = tmp.path().join(format!("out{k}"));
        let o = merge_with(&base, adapter, &out, &[]);
        ok(&o);
        assert!(stderr(&o).contains("unties them"), "{}", stderr(&o));
        let (ours, peft, before) = (load(&out), load(&case.join("merged")), load(&base));
        assert_eq!(ours.len(), peft.len(), "the head is written once, under the checkpoint's name");
        assert!(ours[head].data == peft[head].data);
        assert!(ours[embed].data == before[embed].data, "the embedding keeps the base's values");
        assert!(peft.iter().filter(|(k, _)| *k != embed).all(|(k, t)| ours[k].data == t.data));
        let c = config(&out);
        assert_eq!(
            (&c["tie_word_embeddings"], &c["text_config"]["tie_word_embeddings"]),
            (&false.into(), &false.into())
        );
        ok(&run(&["verify", "--base", s(&base), "--adapter", s(adapter), "--merged", s(&out)]));
    }
}

#[test]
fn an_old_style_vision_language_adapter_finds_a_new_layout_checkpoint() {
    // The other way round: an adapter saved before transformers 4.52 names Qwen2.5-VL's modules
    // as its checkpoints did (`model.layers.…`, `visual.…`), and a checkpoint saved in the new
    // layout names them `model.language_model.…`, `model.visual.…`. The merge is the same, under
    // the checkpoint's names.
    let tmp = tempfile::tempdir().unwrap();
    let new_layout = |k: &str| -> String {
        match k.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => k.strip_prefix("visual.").map_or(k.to_string(), |rest| format!("model.visual.{rest}")),
        }
    };
    let base = tmp.path().join("base");
    copy_dir(&fixtures().join("bases/qwen2vl-bf16"), &base);
    let f = base.join("model.safetensors");
    let t: BTreeMap<String, T> = load(&f).into_iter().map(|(k, v)| (new_layout(&k), v)).collect();
    save(&f, &t);
    let adapter = tmp.path().join("old-style");
    copy_dir(&fixtures().join("cases/bone-default-qwen2vl-bf16/adapter"), &adapter);
    let f = adapter.join("adapter_model.safetensors");
    let old = |k: &str| k.replace(".model.language_model.", ".model.").replace(".model.visual.", ".visual.");
    let t: BTreeMap<String, T> = load(&f).into_iter().map(|(k, v)| (old(&k), v)).collect();
    assert!(t.keys().all(|k| !k.contains("language_model")), "{:?}", t.keys());
    save(&f, &t);
    let out = tmp.path().join("out");
    ok(&merge_with(&base, &adapter, &out, &[]));
    let peft = load(&fixtures().join("cases/bone-default-qwen2vl-bf16/merged"));
    let ours = load(&out);
    assert_eq!(ours.len(), peft.len());
    assert!(peft.iter().all(|(k, t)| ours[&new_layout(k)].data == t.data));
    let o = run(&["inspect", "adapter", s(&adapter), "--base", s(&base), "--json"]);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["modules_without_blocks"], serde_json::json!([]), "{j}");
}

#[test]
fn a_vision_language_adapter_that_tells_no_layout_targets_by_new_module_paths() {
    // An adapter whose only block is on `lm_head` (named alike in both layouts) says nothing of
    // the transformers it was made under; on Qwen2.5-VL's checkpoint in the older layout, PEFT
    // under transformers 4.52 and later matches target_modules against `model.visual.…`, so
    // bone-tool takes those paths: the vision tower's qkv, which a regex on its new path targets
    // and which has no block, gets PEFT's zero block and the warning names it (the sweep's seed
    // 24040, trial 277, found the warning naming the stored `visual.…` instead).
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bases/qwen2vl-bf16");
    let adapter = tmp.path().join("head-only");
    copy_dir(&fixtures().join("cases/bone-default-qwen2vl-bf16/adapter"), &adapter);
    let block = T {
        dtype: safetensors::Dtype::F32,
        shape: vec![8, 64],
        data: (0..8 * 64).flat_map(|_| 0.01f32.to_le_bytes()).collect(),
    };
    save(
        &adapter.join("adapter_model.safetensors"),
        &BTreeMap::from([("base_model.model.lm_head.bone_block".to_string(), block)]),
    );
    edit_json(&adapter.join("adapter_config.json"), |c| {
        c["target_modules"] = r"model\.visual\.blocks\.0\.attn\.qkv|lm_head".into()
    });
    let out = tmp.path().join("out");
    let o = merge_with(&base, &adapter, &out, &[]);
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains(r#"targets "model.visual.blocks.0.attn.qkv" (stored as "visual.blocks.0.attn.qkv")"#)
            && err.contains("no block for it"),
        "{err}"
    );
    let o = run(&["inspect", "adapter", s(&adapter), "--base", s(&base), "--json"]);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["modules_without_blocks"], serde_json::json!(["visual.blocks.0.attn.qkv"]), "{j}");
    // an adapter whose blocks are found under the older names (made before 4.52) keeps them
    let old = tmp.path().join("old-style");
    copy_dir(&fixtures().join("cases/bone-default-qwen2vl-bf16/adapter"), &old);
    let f = old.join("adapter_model.safetensors");
    let t: BTreeMap<String, T> = load(&f)
        .into_iter()
        .map(|(k, v)| (k.replace(".model.language_model.", ".model.").replace(".model.visual.", ".visual."), v))
        .collect();
    save(&f, &t);
    edit_json(&old.join("adapter_config.json"), |c| {
        c["target_modules"] = r"model\.visual\.blocks\.0\.attn\.qkv|.*q_proj".into()
    });
    let o = merge_with(&base, &old, &tmp.path().join("old-out"), &[]);
    ok(&o);
    assert!(!stderr(&o).contains("no block for"), "{}", stderr(&o));
}

#[test]
fn each_writes_one_merged_model_per_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let names = ["bone-bat-bf16", "miss-mini-bf16", "bone-default-lm-head-bf16"];
    let mut adapters = vec![];
    for n in names {
        let a = tmp.path().join("adapters").join(n);
        copy_dir(&fixtures().join("cases").join(n).join("adapter"), &a);
        adapters.push(a);
    }
    let pattern = tmp.path().join("merged/{name}");
    let base = fixtures().join("bases/llama-bf16");
    let mut argv: Vec<String> = ["merge", "--base", s(&base), "--each"].iter().map(|a| a.to_string()).collect();
    argv.extend(adapters.iter().map(|a| s(a).to_string()));
    // an adapter given by its weights file is named after its folder
    argv[5] = s(&adapters[1].join("adapter_model.safetensors")).to_string();
    argv.extend(["--out-pattern".to_string(), s(&pattern).to_string(), "--json".to_string()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let o = run(&argv);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["outputs"].as_array().unwrap().len(), 3);
    let base_bytes: u64 = load(&fixtures().join("bases/llama-bf16")).values().map(|t| t.data.len() as u64).sum();
    assert_eq!(j["bytes_read"], base_bytes, "the base is read once for all three");
    for n in names {
        let out = tmp.path().join("merged").join(n);
        let (ours, peft) = (load(&out), load(&fixtures().join("cases").join(n).join("merged")));
        assert_eq!(ours.len(), peft.len(), "{n}");
        for (k, t) in &peft {
            assert!(ours[k].data == t.data, "{n}: {k}");
        }
        assert!(out.join("config.json").exists());
    }
    // a pattern without {name}, and two adapters with one name, are refused before any work
    let o = run(&[
        "merge",
        "--base",
        s(&fixtures().join("bases/llama-bf16")),
        "--each",
        s(&adapters[0]),
        "--out-pattern",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("{name}"), "{}", stderr(&o));
    let twin = tmp.path().join("twin").join(names[0]);
    copy_dir(&adapters[0], &twin);
    let o = run(&[
        "merge",
        "--base",
        s(&fixtures().join("bases/llama-bf16")),
        "--each",
        s(&adapters[0]),
        s(&twin),
        "--out-pattern",
        s(&tmp.path().join("x/{name}")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("same name"), "{}", stderr(&o));
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn convert_dry_run_shows_the_tensors_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let case = fixtures().join("cases/miss-mini-bf16");
    let adapter = case.join("adapter");
    let args = ["convert", s(&adapter), "--to", "bone", "--out", s(&out), "--base"];
    let base = fixtures().join("bases/llama-bf16");
    let mut dry = args.to_vec();
    dry.extend([s(&base), "--dry-run", "--json"]);
    let o = run(&dry);
    ok(&o);
    assert!(!out.exists() && std::fs::read_dir(tmp.path()).unwrap().count() == 0);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // the real conversion writes exactly the tensors, shapes and dtypes the dry run listed
    let mut real = args.to_vec();
    real.extend([s(&base), "-q", "--json"]);
    let o = run(&real);
    ok(&o);
    let summary: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(summary["bytes_written"], std::fs::metadata(out.join("adapter_model.safetensors")).unwrap().len());
    assert!(summary["seconds"].as_f64().unwrap() >= 0.0);
    let written = load(&out.join("adapter_model.safetensors"));
    let listed = plan["tensors"].as_array().unwrap();
    assert_eq!(listed.len(), written.len());
    for t in listed {
        let w = &written[t["name"].as_str().unwrap()];
        assert_eq!(t["shape"], serde_json::json!(w.shape));
        assert_eq!(t["dtype"], format!("{:?}", w.dtype));
        assert_eq!(t["bytes"], w.data.len());
    }
    // BAT -> LoRA by energy: the ranks are unknown until the SVDs run
    let bat = fixtures().join("cases/miss-bat-bf16/adapter");
    let o = run(&[
        "convert",
        s(&bat),
        "--to",
        "lora",
        "--out",
        s(&tmp.path().join("l")),
        "--base",
        s(&base),
        "--energy",
        "0.9",
        "--dry-run",
    ]);
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains("chosen by --energy") && text.contains("nothing written"), "{text}");
    assert!(!tmp.path().join("l").exists());
}

#[test]
fn colour_only_when_asked_or_on_a_terminal() {
    let args = ["merge", "--base", "/nonexistent-base", "--adapter", "/nonexistent", "--out", "/tmp/x"];
    let plain = run(&args);
    assert!(stderr(&plain).starts_with("error: "), "{}", stderr(&plain));
    assert!(!stderr(&plain).contains('\x1b'), "no escape codes into a pipe");
    let mut coloured = args.to_vec();
    coloured.extend(["--color", "always"]);
    let o = run(&coloured);
    assert!(stderr(&o).starts_with("\x1b[1;31merror:\x1b[0m "), "{:?}", stderr(&o));
    assert_eq!(o.status.code(), plain.status.code());
}

#[test]
fn the_same_adapter_twice_is_applied_twice_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bases/llama-bf16");
    let a = fixtures().join("cases/bone-bat-bf16/adapter");
    let twice = tmp.path().join("twice");
    let dotted = format!("{}/.", a.display());
    let o = run(&["merge", "--base", s(&base), "--adapter", s(&a), "--adapter", &dotted, "--out", s(&twice)]);
    ok(&o);
    assert!(stderr(&o).contains("given more than once"), "{}", stderr(&o));
    // independent: two runs, the second on the first's output, give the same tensors
    let (once, again) = (tmp.path().join("once"), tmp.path().join("again"));
    ok(&merge_with(&base, &a, &once, &["-q"]));
    ok(&merge_with(&once, &a, &again, &["-q"]));
    let (t, g, o1) = (load(&twice), load(&again), load(&once));
    assert!(t.iter().all(|(k, v)| g[k].data == v.data), "stacked twice differs from two runs");
    assert!(t.iter().any(|(k, v)| o1[k].data != v.data), "the second mention changed nothing");
    // one mention: no such warning
    let o = merge_with(&base, &a, &tmp.path().join("single"), &[]);
    assert!(!stderr(&o).contains("more than once"), "{}", stderr(&o));
}

/// Paths given relative to the working folder, as bare file names: a lone weights file's folder is
/// then the empty path, which every path "starts with" and no file-system call accepts; it must
/// read as `.`. Output beside a lone weights file is fine; output that holds it is refused.
#[test]
fn bare_file_names_in_the_working_folder_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let case = fixtures().join("cases/bone-default-f32/adapter");
    std::fs::copy(fixtures().join("bases/llama-f32/model.safetensors"), dir.join("model.safetensors")).unwrap();
    copy_dir(&case, &dir.join("adapter"));
    let in_dir = |args: &[&str], at: &std::path::Path| bin().current_dir(at).args(args).output().unwrap();

    let o = in_dir(&["merge", "-q", "--base", "model.safetensors", "--adapter", "adapter", "--out", "merged"], dir);
    ok(&o);
    let expected = tmp.path().join("expected");
    merge(&fixtures().join("bases/llama-f32"), &case, &expected);
    assert!(
        std::fs::read(dir.join("merged/model.safetensors")).unwrap()
            == std::fs::read(expected.join("model.safetensors")).unwrap()
    );
    // the adapter's weights file names its folder, also as a bare name
    let o = in_dir(&["inspect", "adapter", "adapter_model.safetensors"], &dir.join("adapter"));
    ok(&o);
    assert!(stdout(&o).contains("BONE"), "{}", stdout(&o));

    // --force on the folder that holds the lone base file would delete it
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let o =
        in_dir(&["merge", "-q", "--base", "model.safetensors", "--adapter", "adapter", "--out", ".", "--force"], dir);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("overlaps the input model.safetensors"), "{}", stderr(&o));
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), before);
    // output inside the adapter folder, named by its weights file, is refused as inside a folder
    let o = in_dir(
        &["merge", "--base", "../model.safetensors", "--adapter", "adapter_model.safetensors", "--out", "m"],
        &dir.join("adapter"),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("overlaps the input ."), "{}", stderr(&o));

    // an index file given by its bare name stands for its folder
    let sharded = dir.join("sharded");
    copy_dir(&fixtures().join("bases/llama-f32-sharded"), &sharded);
    let o = in_dir(
        &["merge", "-q", "--base", "model.safetensors.index.json", "--adapter", "../adapter", "--out", "../m2"],
        &sharded,
    );
    ok(&o);
    let o = in_dir(
        &["merge", "--base", "model.safetensors.index.json", "--adapter", "../adapter", "--out", "inside"],
        &sharded,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("overlaps the input ."), "{}", stderr(&o));
}

#[test]
fn a_base_saved_without_its_model_wrapper_is_found_and_keeps_the_layer_rule() {
    // A base saved as LlamaModel names its tensors "layers.0.…", not "model.layers.0.…"; the
    // adapter was made on LlamaForCausalLM with layers_to_transform [0]. --adapter-prefix
    // "base_model.model.model." finds the base tensors, while PEFT's rule still looks for the layer
    // in PEFT's own name, "model.layers.0.mlp.down_proj" (in "layers.0.mlp.down_proj" its
    // pattern finds no layer, and nothing would be targeted). Without the flag bone-tool reads the
    // keys so by itself, as transformers loads such a checkpoint under "model.", and says so.
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-bat-sharded-f32");
    let base = tmp.path().join("headless");
    std::fs::create_dir_all(&base).unwrap();
    save(&base.join("model.safetensors"), &bare_backbone(load(&fixtures().join("bases/llama-f32-sharded"))));
    let cfg = std::fs::read_to_string(case.join("adapter/adapter_config.json")).unwrap();
    assert!(cfg.contains("\"layers_to_transform\": [\n    0\n  ]"), "{cfg}");
    let out = tmp.path().join("out");
    let o = merge_with(&base, &case.join("adapter"), &out, &["--adapter-prefix", "base_model.model.model."]);
    ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let (x, y) = (load(&out), bare_backbone(load(&case.join("merged"))));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    assert!(x.iter().all(|(k, t)| y[k].data == t.data), "PEFT's merged bytes");

    let found = tmp.path().join("found");
    let o = merge_with(&base, &case.join("adapter"), &found, &[]);
    ok(&o);
    let err = stderr(&o);
    let warned = err.lines().filter(|l| l.starts_with("warning:")).collect::<Vec<_>>().join("\n");
    assert!(
        warned.lines().count() == 1
            && warned.contains("without the outer module \"model.\"")
            && warned.contains("--adapter-prefix \"base_model.model.model.\""),
        "{warned}"
    );
    assert_eq!(digest_relative(&found), digest_relative(&out), "the same folder as with the flag");
    // unmerge, verify and inspect find it too
    let restored = tmp.path().join("restored");
    let adapter = case.join("adapter");
    ok(&run(&["-q", "unmerge", "--merged", s(&found), "--adapter", s(&adapter), "--out", s(&restored)]));
    let flagged = tmp.path().join("restored-flag");
    let prefix = ["--adapter-prefix", "base_model.model.model."];
    ok(&run(&[&["-q", "unmerge", "--merged", s(&found), "--adapter", s(&adapter), "--out", s(&flagged)][..], &prefix]
        .concat()));
    assert_eq!(digest_relative(&restored), digest_relative(&flagged));
    ok(&run(&["verify", "--base", s(&base), "--adapter", s(&adapter), "--merged", s(&found)]));
    let o = run(&["inspect", "adapter", s(&adapter), "--base", s(&base), "--json"]);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["compatible"], true, "{j}");
    // a base that stores its tensors under "model." is no bare backbone: an adapter whose keys
    // lie under another outer module still fails there (bad_input.rs)
}

/// LLaVA's checkpoint stores no tensor under `model.` (`language_model.model.…`, `vision_tower.…`)
/// while the adapter's keys all lie under `model.` once its lm_head block is gone; some of them
/// (`model.vision_tower.…`) even name a stored tensor without `model.`. It is no bare backbone:
/// its blocks are found by the vision-language renames, and the merge is PEFT's for every tensor
/// but the head.
#[test]
fn a_vision_language_checkpoint_is_not_taken_for_a_bare_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/miss-bat-llava-bf16");
    let a = tmp.path().join("adapter");
    copy_dir(&case.join("adapter"), &a);
    edit_tensors(&a.join("adapter_model.safetensors"), |t| t.retain(|k, _| !k.contains("lm_head")));
    edit_json(&a.join("adapter_config.json"), |c| {
        c["target_modules"] = serde_json::json!(["linear_1", "q_proj", "v_proj"]);
    });
    let keys = load(&a.join("adapter_model.safetensors"));
    assert!(keys.keys().any(|k| k.starts_with("base_model.model.model.vision_tower.")), "{:?}", keys.keys());
    assert!(keys.keys().all(|k| k.starts_with("base_model.model.model.")), "{:?}", keys.keys());
    let out = tmp.path().join("out");
    let o = merge_with(&fixtures().join("bases/llava-bf16"), &a, &out, &[]);
    ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let (x, y) = (load(&out), load(&case.join("merged")));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    let head = stored_tensor(&x, "lm_head");
    assert!(x.iter().filter(|(k, _)| **k != head).all(|(k, t)| y[k].data == t.data), "PEFT's merged bytes");
    assert_ne!(x[&head].data, y[&head].data, "the head's block was left out");
}

/// Weight files of other formats in the base's folder still hold the unmerged weights: a merge
/// leaves them out, with a warning naming each, whatever the case of their extension, and copies the
/// other side files.
#[test]
fn weights_of_other_formats_beside_the_base_are_not_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(&fixtures().join("bases/llama-f32"), &base);
    let stale = [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model-Q4_K_M.GGUF",
        "consolidated.safetensors",
        "flax.msgpack",
    ];
    for f in stale.iter().chain(&["notes.txt"]) {
        std::fs::write(base.join(f), b"x").unwrap();
    }
    let out = tmp.path().join("out");
    let o = merge_with(&base, &fixtures().join("cases/bone-default-f32/adapter"), &out, &[]);
    ok(&o);
    let err = stderr(&o);
    for f in stale {
        assert!(!out.join(f).exists(), "{f} copied");
        assert!(err.lines().any(|l| l.starts_with("warning: not copied:") && l.contains(f)), "{f}: {err}");
    }
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"x");
    assert!(!err.contains("notes.txt"), "{err}");
}

/// Put a folder into a Hugging Face cache as huggingface_hub does: each file once in `blobs/`, the
/// snapshot `snapshots/<hash>/` of links to them, and (when `main`) `refs/main` naming the hash.
fn into_hub_cache(
    cache: &std::path::Path,
    id: &str,
    from: &std::path::Path,
    hash: &str,
    main: bool,
) -> std::path::PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let blob = format!("{hash}-{name}");
        std::fs::copy(from.join(&name), repo.join("blobs").join(&blob)).unwrap();
        // huggingface_hub links each file to its blob, or copies it where it cannot link (Windows
        // without developer mode)
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(&name)).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(repo.join("blobs").join(&blob), snap.join(&name)).unwrap();
    }
    if main {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), hash).unwrap();
    }
    snap
}

#[test]
fn hub_ids_are_found_in_the_local_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let case = fixtures().join("cases/bone-bat-bf16");
    let base_snap = into_hub_cache(&cache, "org/base", &fixtures().join("bases/llama-bf16"), "aaaa1111", true);
    // an adapter fetched by commit, so no refs/main: its only snapshot is taken
    let adapter_snap = into_hub_cache(&cache, "someone/bat", &case.join("adapter"), "bbbb2222", false);
    let with_cache = |args: &[&str]| bin().env("HF_HUB_CACHE", &cache).args(args).output().unwrap();

    let local = tmp.path().join("local");
    merge(&fixtures().join("bases/llama-bf16"), &case.join("adapter"), &local);
    let out = tmp.path().join("out");
    let o = with_cache(&["merge", "--base", "org/base", "--adapter", "someone/bat", "--out", s(&out)]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains(&format!("base org/base: the Hugging Face cache's {}", base_snap.display())), "{err}");
    assert!(
        err.contains(&format!("adapter someone/bat: the Hugging Face cache's {}", adapter_snap.display())),
        "{err}"
    );
    assert_eq!(digest_relative(&out), digest_relative(&local), "the same files as from local folders");
    for e in std::fs::read_dir(&out).unwrap() {
        assert!(!e.unwrap().file_type().unwrap().is_symlink(), "the output holds files, not links into the cache");
    }

    // the cache's repository folders themselves stand for their snapshots too
    let by_folder = tmp.path().join("by-folder");
    let base_repo = cache.join("models--org--base");
    let adapter_repo = cache.join("models--someone--bat");
    let o = with_cache(&["merge", "--base", s(&base_repo), "--adapter", s(&adapter_repo), "--out", s(&by_folder)]);
    ok(&o);
    assert!(stderr(&o).contains(&format!("the Hugging Face cache's {}", base_snap.display())), "{}", stderr(&o));
    assert_eq!(digest_relative(&by_folder), digest_relative(&local));

    // a revision by commit prefix; -q says nothing; an unknown revision lists the snapshots
    let again = tmp.path().join("again");
    let o = with_cache(&["-q", "merge", "--base", "org/base@aaaa111", "--adapter", "someone/bat", "--out", s(&again)]);
    ok(&o);
    assert_eq!(stderr(&o), "");
    assert_eq!(digest_relative(&again), digest_relative(&local));
    let gone = tmp.path().join("gone");
    let o = with_cache(&["merge", "--base", "org/base@v2", "--adapter", "someone/bat", "--out", s(&gone)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no revision \"v2\"") && stderr(&o).contains("aaaa1111"), "{}", stderr(&o));
    // an id the cache lacks: the usual error, with where bone-tool looked
    let o = with_cache(&["merge", "--base", "org/other", "--adapter", "someone/bat", "--out", s(&gone)]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains(&format!("not in the local Hugging Face cache {}", cache.display())), "{err}");
    assert!(!gone.exists());
    // --each names each output after the id's last part, not the snapshot's hash
    let pattern = tmp.path().join("each/{name}");
    ok(&with_cache(&["-q", "merge", "--base", "org/base", "--each", "someone/bat", "--out-pattern", s(&pattern)]));
    assert_eq!(digest_relative(&tmp.path().join("each/bat")), digest_relative(&local));

    // merge without --base finds the base the adapter records, by its Hub id
    let recorded = tmp.path().join("recorded");
    let adapter_config = std::fs::canonicalize(adapter_snap.join("adapter_config.json")).unwrap();
    edit_json(&adapter_config, |c| c["base_model_name_or_path"] = "org/base".into());
    let o = with_cache(&["merge", "--adapter", "someone/bat", "--out", s(&recorded)]);
    ok(&o);
    assert!(stderr(&o).contains("base (the adapter's base_model_name_or_path) org/base: the Hugging Face cache's"));
    assert_eq!(digest_relative(&recorded), digest_relative(&local));
    let o = with_cache(&["inspect", "adapter", "someone/bat"]);
    let cached = format!("org/base (in the local Hugging Face cache, {}: merge finds it", base_snap.display());
    assert!(stdout(&o).contains(&cached), "{}", stdout(&o));

    // convert finds the base that adapter_config.json names by its Hub id
    let lora = tmp.path().join("lora");
    let o = with_cache(&["convert", "someone/bat", "--to", "lora", "--rank", "4", "--out", s(&lora)]);
    ok(&o);
    assert!(stderr(&o).contains("base (the adapter's base_model_name_or_path) org/base: the Hugging Face cache's"));
    let lora_local = tmp.path().join("lora-local");
    let base = fixtures().join("bases/llama-bf16");
    ok(&run(&[
        "convert",
        s(&adapter_snap),
        "--to",
        "lora",
        "--rank",
        "4",
        "--out",
        s(&lora_local),
        "--base",
        s(&base),
    ]));
    assert_eq!(digest_relative(&lora), digest_relative(&lora_local));
}

#[test]
fn merge_without_base_uses_the_base_the_adapters_record() {
    // the fixtures record their base as a path relative to the package root, where the tests run
    let tmp = tempfile::tempdir().unwrap();
    let case = fixtures().join("cases/bone-bat-bf16");
    let text = std::fs::read_to_string(case.join("adapter/adapter_config.json")).unwrap();
    let recorded = serde_json::from_str::<serde_json::Value>(&text).unwrap()["base_model_name_or_path"].clone();
    assert_eq!(recorded, "fixtures/bases/llama-bf16", "as generate.py writes it");
    let out = tmp.path().join("out");
    let o = run(&["merge", "--adapter", "fixtures/cases/bone-bat-bf16/adapter", "--out", s(&out)]);
    ok(&o);
    assert!(stderr(&o).contains("base (the adapter's base_model_name_or_path): fixtures/bases/llama-bf16"));
    // inspect says so beforehand
    let o = run(&["inspect", "adapter", "fixtures/cases/bone-bat-bf16/adapter"]);
    assert!(stdout(&o).contains("fixtures/bases/llama-bf16 (a folder here: merge finds it without --base)"));
    let o = run(&["inspect", "adapter", "fixtures/cases/bone-bat-bf16/adapter", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["base_model_found"], "fixtures/bases/llama-bf16");
    let peft = std::fs::read(case.join("merged/model.safetensors")).unwrap();
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == peft, "PEFT's merge, byte for byte");

    // adapters that record different bases, none, or one that is not there: exit 2, nothing written
    let other = fixtures().join("cases/bone-default-f32/adapter");
    let o = run(&["merge", "--adapter", s(&case.join("adapter")), "--adapter", s(&other), "--out", s(&out), "--force"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("the adapters record different bases"), "{}", stderr(&o));
    let bare = tmp.path().join("bare");
    copy_dir(&case.join("adapter"), &bare);
    edit_json(&bare.join("adapter_config.json"), |c| {
        c.as_object_mut().unwrap().remove("base_model_name_or_path");
    });
    let gone = tmp.path().join("gone");
    let o = run(&["merge", "--adapter", s(&bare), "--out", s(&gone)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("records no base_model_name_or_path: pass --base MODEL"), "{}", stderr(&o));
    // an absolute path (on Windows one with a drive), on the machine it was trained on
    let elsewhere = if cfg!(windows) { r"C:\trainer\models\llama" } else { "/trainer/models/llama" };
    edit_json(&bare.join("adapter_config.json"), |c| c["base_model_name_or_path"] = elsewhere.into());
    let o = run(&["merge", "--adapter", s(&bare), "--out", s(&gone)]);
    assert_eq!(o.status.code(), Some(2));
    let expected = format!("{} is not a folder: pass --base MODEL", serde_json::Value::from(elsewhere));
    assert!(stderr(&o).contains(&expected), "{}", stderr(&o));
    let o = run(&["inspect", "adapter", s(&bare), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["base_model_found"], serde_json::Value::Null);
    let o = run(&["inspect", "adapter", s(&bare)]);
    assert!(stdout(&o).contains("(not here, nor in the local Hugging Face cache: merge needs --base)"));
    assert!(!gone.exists());
}

/// A replacement stored in another float dtype than the base tensor (modules_to_save trained with
/// the model in f32, merged into the bf16 checkpoint) is cast to it, round to nearest even as
/// torch's `.to()`, a piece at a time (small pieces here: many of them), and the resized
/// vocabulary's copies the same way.
#[test]
fn a_replacement_in_another_dtype_is_cast_piece_by_piece() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, key) in [
        ("miss-default-sharded-bf16", "base_model.model.lm_head.weight"),
        ("bone-default-resized-vocab-bf16", "base_model.model.model.embed_tokens.weight"),
    ] {
        let case = fixtures().join("cases").join(case);
        let adapter = tmp.path().join(format!("{}-f32", case.file_name().unwrap().to_str().unwrap()));
        copy_dir(&case.join("adapter"), &adapter);
        // the copy in f32, each value moved off the bf16 grid (ties and both directions)
        let mut copy = None;
        edit_tensors(&adapter.join("adapter_model.safetensors"), |t| {
            let vals: Vec<f32> = values(&t[key])
                .iter()
                .enumerate()
                .map(|(k, v)| *v as f32 * (1.0 + [0.0, 1.0 / 512.0, -3.0 / 1024.0, 5e-4][k % 4]))
                .collect();
            let f32_copy = f32_tensor(t[key].shape.clone(), &vals);
            copy = Some(f32_copy.clone());
            t.insert(key.into(), f32_copy);
        });
        let base = fixtures().join(
            manifest()["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| case.ends_with(c["name"].as_str().unwrap()))
                .unwrap()["base"]
                .as_str()
                .unwrap(),
        );
        // (pieces of 4 KB: before the fix, the copy's pieces were written from buffers recycled
        // from earlier tensors, silently; of 64 bytes and the default size: a panic)
        for piece_bytes in ["64", "4096", ""] {
            let out = tmp.path().join("out");
            let mut command = bin();
            command.args(["merge", "--base", s(&base), "--adapter", s(&adapter), "--out", s(&out), "--force"]);
            if !piece_bytes.is_empty() {
                command.env("BONE_TOOL_PIECE_BYTES", piece_bytes);
            }
            ok(&command.output().unwrap());
            let target = key.trim_start_matches("base_model.model.");
            let ours = &load(&out)[target];
            assert_eq!(ours.dtype, safetensors::Dtype::BF16);
            let want = cast(copy.as_ref().unwrap(), safetensors::Dtype::BF16);
            assert!(ours.shape == want.shape && ours.data == want.data, "{target} ({piece_bytes})");
            ok(&run(&["verify", "--base", s(&base), "--adapter", s(&adapter), "--merged", s(&out)]));
        }
    }
}

/// PEFT's Bone/MiSS trains the biases with `bias: "all"` (or `"bone_only"`/`"MiSS_only"`) but saves
/// only the blocks, so the adapter holds no trained bias and PEFT's merge keeps the base's: the
/// merge is the same bytes as with `"none"`, and says why. A tensor of a targeted module saved
/// without `.base_layer.` (`q_proj.weight`, as hand-made files hold) is not loaded by PEFT, which
/// wraps that module and loads only `q_proj.base_layer.weight` (checked against PEFT 0.18.1 with
/// OPT's biases; the sweep's SWEEP_STRAY): ignored with a warning; the same tensor of a module
/// PEFT does not wrap replaces the base's, as PEFT loads it. With "all-linear" the wrapped modules
/// are the Linear layers (a norm is not one).
#[test]
fn biases_and_tensors_of_targeted_modules_load_as_peft_loads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bases/llama-bf16");
    let before = load(&base.join("model.safetensors"));
    for case in ["bone-bat-bf16", "bone-default-all-linear-bf16"] {
        let dir = tmp.path().join(case);
        let case = fixtures().join("cases").join(case);
        let plain = dir.join("plain");
        merge(&base, &case.join("adapter"), &plain);
        let adapter = dir.join("adapter");
        copy_dir(&case.join("adapter"), &adapter);
        edit_json(&adapter.join("adapter_config.json"), |c| c["bias"] = "all".into());
        let out = dir.join("bias-all");
        let o = merge_with(&base, &adapter, &out, &[]);
        ok(&o);
        let err = stderr(&o);
        assert!(err.contains("bias \"all\"") && err.contains("no trained bias"), "{err}");
        assert_eq!(digest_relative(&out), digest_relative(&plain));

        // a targeted module's weight without .base_layer.: not loaded; an untargeted one's: loaded
        let q = "model.layers.0.self_attn.q_proj.weight";
        let norm = "model.layers.0.input_layernorm.weight";
        let (mut q_t, mut norm_t) = (before[q].clone(), before[norm].clone());
        q_t.data.iter_mut().for_each(|b| *b = 0x3f);
        norm_t.data.iter_mut().for_each(|b| *b = 0x3f);
        edit_tensors(&adapter.join("adapter_model.safetensors"), |t| {
            t.insert(format!("base_model.model.{q}"), q_t);
            t.insert(format!("base_model.model.{norm}"), norm_t.clone());
        });
        let out = dir.join("stray");
        let o = merge_with(&base, &adapter, &out, &[]);
        ok(&o);
        let err = stderr(&o);
        assert!(err.contains(&format!("ignored \"base_model.model.{q}\"")), "{err}");
        assert!(err.contains("q_proj.base_layer.weight") && !err.contains("input_layernorm.base_layer"), "{err}");
        let (ours, theirs) = (load(&out.join("model.safetensors")), load(&plain.join("model.safetensors")));
        assert!(ours[q].data == theirs[q].data, "q_proj: the merge without the stray key");
        assert!(ours[norm].data == norm_t.data, "the untargeted module takes the saved tensor");
        for (name, t) in theirs.iter().filter(|(n, _)| *n != norm) {
            assert!(ours[name].data == t.data, "{name}");
        }
    }
}

/// Blocks saved without PeftModel's `base_model.model.` (as a state dict taken from the bare model
/// holds them) are read as the module paths they name, as transformers' `load_adapter` reads them,
/// with a warning that `PeftModel.from_pretrained` would not load them (checked: it merges its
/// initial blocks, leaving the weights unchanged).
#[test]
fn blocks_without_peft_prefix_are_applied_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bases/llama-bf16");
    let case = fixtures().join("cases/bone-bat-bf16");
    let adapter = tmp.path().join("adapter");
    copy_dir(&case.join("adapter"), &adapter);
    edit_tensors(&adapter.join("adapter_model.safetensors"), |t| {
        *t = std::mem::take(t).into_iter().map(|(k, v)| (k.replace("base_model.model.", ""), v)).collect();
    });
    let out = tmp.path().join("out");
    let o = merge_with(&base, &adapter, &out, &[]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("14 of its 14 blocks lack PeftModel's prefix") && err.contains("load_adapter"), "{err}");
    let plain = tmp.path().join("plain");
    merge(&base, &case.join("adapter"), &plain);
    assert_eq!(digest_relative(&out), digest_relative(&plain));
}

/// An f16/bf16 BAT adapter saved by PEFT 0.20 or later (its adapter_config.json's peft_version):
/// that PEFT merges it as W + delta rounded once, so the default merge (PEFT 0.18.1's rounding)
/// says to pass --rounding once, which gives the bytes PEFT 0.21.2 wrote for this fixture
/// (scripts/peft-newer.sh: the same as merged-safe). Not for 0.19 or f32 weights.
#[test]
fn an_adapter_from_peft_0_20_on_is_told_about_its_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bases/llama-bf16");
    let case = fixtures().join("cases/miss-bat-bf16");
    for (version, warned) in [("0.21.2", true), ("0.20.0.dev0", true), ("0.19.1", false), ("0.18.1", false)] {
        let adapter = tmp.path().join(format!("adapter-{version}"));
        copy_dir(&case.join("adapter"), &adapter);
        edit_json(&adapter.join("adapter_config.json"), |c| c["peft_version"] = version.into());
        let out = tmp.path().join(format!("out-{version}"));
        let o = merge_with(&base, &adapter, &out, &[]);
        ok(&o);
        let err = stderr(&o);
        assert_eq!(err.contains("pass it for the newer PEFT's bytes"), warned, "{version}: {err}");
        let o = run(&["inspect", "adapter", s(&adapter), "--json"]);
        ok(&o);
        assert_eq!(stdout(&o).contains("--rounding once"), warned, "{version}: inspect {}", stdout(&o));
        let same = |ours: &std::path::Path, peft: &str| {
            let (ours, peft) =
                (load(&ours.join("model.safetensors")), load(&case.join(peft).join("model.safetensors")));
            peft.iter().all(|(k, t)| ours[k].data == t.data) && ours.len() == peft.len()
        };
        assert!(same(&out, "merged"), "{version}: the default is PEFT 0.18.1's merge");
        let once = tmp.path().join(format!("once-{version}"));
        let o = merge_with(&base, &adapter, &once, &["--rounding", "once"]);
        ok(&o);
        assert!(!stderr(&o).contains("--rounding once"), "{}", stderr(&o));
        assert!(same(&once, "merged-safe"), "{version}: --rounding once is PEFT 0.21.2's merge");
    }
    // f32 weights round the same either way: no warning
    let adapter = tmp.path().join("f32");
    copy_dir(&fixtures().join("cases/miss-bat-f32/adapter"), &adapter);
    edit_json(&adapter.join("adapter_config.json"), |c| c["peft_version"] = "0.21.2".into());
    let o = merge_with(&fixtures().join("bases/llama-f32"), &adapter, &tmp.path().join("out-f32"), &[]);
    ok(&o);
    assert!(!stderr(&o).contains("--rounding once"), "{}", stderr(&o));
}
