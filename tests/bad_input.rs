//! Bad input, each case end to end: one clear `error:` line naming the file or tensor and what was
//! expected, exit code 2, no panic, no output folder, no temporary folder left, inputs untouched.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { tmp: tempfile::tempdir().unwrap() }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    /// A private copy of a fixture folder.
    fn copy(&self, fixture: &str, name: &str) -> PathBuf {
        let to = self.path(name);
        copy_dir(&fixtures().join(fixture), &to);
        to
    }
}

/// Run a command that must fail with input error `needles` and leave no trace.
fn fails(args: &[&str], out: Option<&Path>, inputs: &[&Path], needles: &[&str]) -> String {
    let before: Vec<_> = inputs.iter().map(|p| digest(p)).collect();
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, got {:?}; stderr:\n{err}", o.status);
    assert!(!err.contains("panicked"), "panic: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "exactly one error line:\n{err}");
    assert!(err.lines().last().unwrap().starts_with("error:"), "the error comes last:\n{err}");
    for n in needles {
        assert!(error_lines[0].contains(n), "error line lacks {n:?}:\n{}", error_lines[0]);
    }
    if let Some(out) = out {
        assert!(!out.exists(), "{} must not exist", out.display());
        let parent = out.parent().unwrap();
        if parent.exists() {
            assert_eq!(leftovers(parent, ".tmp-"), Vec::<String>::new(), "temporary folder left behind");
        }
    }
    for (p, d) in inputs.iter().zip(before) {
        assert!(digest(p) == d, "input {} changed", p.display());
    }
    error_lines[0].to_string()
}

fn merge_args<'a>(base: &'a str, adapter: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["merge", "--base", base, "--adapter", adapter, "--out", out]
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn base_f32() -> PathBuf {
    fixtures().join("bases/llama-f32")
}

#[test]
fn missing_adapter_config() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    std::fs::remove_file(a.join("adapter_config.json")).unwrap();
    let out = e.path("out");
    fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["adapter_config.json", "not a PEFT adapter"],
    );
}

#[test]
fn invalid_adapter_config() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    std::fs::write(a.join("adapter_config.json"), "{\"peft_type\": \"BONE\", \"r\": ").unwrap();
    let out = e.path("out");
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), Some(&out), &[&a], &["adapter_config.json", "not valid JSON"]);
}

#[test]
fn lora_adapter_is_refused() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    std::fs::write(a.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#).unwrap();
    let out = e.path("out");
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), Some(&out), &[&a], &["\"LORA\"", "BONE", "MISS"]);
}

#[test]
fn only_adapter_model_bin() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    std::fs::rename(a.join("adapter_model.safetensors"), a.join("adapter_model.bin")).unwrap();
    let out = e.path("out");
    fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["adapter_model.bin", "save_file", "safetensors"],
    );
}

#[test]
fn truncated_safetensors() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let f = a.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let out = e.path("out");
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), Some(&out), &[&a], &["adapter_model.safetensors", "truncated"]);
    // a header length beyond the file itself
    std::fs::write(&f, &bytes[..100]).unwrap();
    fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["adapter_model.safetensors", "beyond the end of the file"],
    );
}

/// A safetensors file written by hand: header JSON and data bytes.
fn handmade(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_headers() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let f = a.join("adapter_model.safetensors");
    let out = e.path("out");
    let base = base_f32();
    let args = merge_args(s(&base), s(&a), s(&out));
    let key = "base_model.model.model.layers.0.self_attn.q_proj.bone_block";
    let cases: Vec<(String, Vec<u8>, String)> = vec![
        ("this is not json".to_string(), vec![], "not valid safetensors JSON".to_string()),
        (
            format!(r#"{{"{key}":{{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}}}"#),
            vec![0; 8],
            format!(r#"tensor "{key}" (F32 [2]) needs 8 bytes, but its data_offsets [0, 16] span 16 bytes"#),
        ),
        (
            format!(r#"{{"{key}":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}}"#),
            vec![0; 12],
            "does not end at the end of the file".to_string(),
        ),
        (
            format!(
                r#"{{"{key}":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},"b":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}}}"#
            ),
            vec![0; 12],
            "overlap".to_string(),
        ),
        (
            format!(r#"{{"{key}":{{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}}}"#),
            vec![0; 16],
            "overlap".to_string(),
        ),
        // shapes whose product overflows
        (
            format!(r#"{{"{key}":{{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}}}"#),
            vec![0; 8],
            "overflows".to_string(),
        ),
        // the same name twice with different data: one of them leaves a gap
        (
            format!(
                r#"{{"{key}":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},"{key}":{{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}}}"#
            ),
            vec![0; 16],
            "gap".to_string(),
        ),
    ];
    for (header, data, needle) in cases {
        handmade(&f, &header, &data);
        fails(&args, Some(&out), &[&a], &["adapter_model.safetensors", &needle]);
    }
    // a header that is not UTF-8
    let mut bytes = 8u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}', b' ', b' ', b' ', b' ']);
    std::fs::write(&f, bytes).unwrap();
    fails(&args, Some(&out), &[&a], &["adapter_model.safetensors", "not valid UTF-8"]);
}

#[test]
fn block_shape_disagrees_with_r() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let cfg = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"r\": 8", "\"r\": 9");
    std::fs::write(&cfg, text).unwrap();
    let out = e.path("out");
    fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["bone_block", "shape [8, ", "r = 9", "expected [r, out_features] = [9, O]"],
    );
}

#[test]
fn bat_on_weights_not_divisible_by_r() {
    let e = Env::new();
    let a = e.copy("cases/bone-bat-f32/adapter", "a");
    let cfg = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"r\": 8", "\"r\": 7");
    std::fs::write(&cfg, text).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.bone_block".to_string();
    let t = f32_tensor(vec![6, 7, 7], &[0.01; 6 * 49]);
    save(&a.join("adapter_model.safetensors"), &[(key, t)].into_iter().collect());
    let out = e.path("out");
    fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["q_proj.weight", "[48, 48]", "multiples of r = 7"],
    );
}

#[test]
fn missing_base_tensor_suggests_a_prefix_that_works() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let f = a.join("adapter_model.safetensors");
    let renamed = load(&f)
        .into_iter()
        .map(|(k, v)| (k.replace("base_model.model.", "base_model.model.transformer."), v))
        .collect();
    save(&f, &renamed);
    let out = e.path("out");
    let line = fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["base has no tensor", "--adapter-prefix \"base_model.model.transformer.\""],
    );
    assert!(line.contains("transformer.model.layers."), "{line}");
    // Following the advice works, and gives PEFT's bytes.
    let o = run(&[
        "-q",
        "merge",
        "--base",
        s(&base_f32()),
        "--adapter",
        s(&a),
        "--out",
        s(&out),
        "--adapter-prefix",
        "base_model.model.transformer.",
    ]);
    ok(&o);
    let (x, y) = (load(&out), load(&fixtures().join("cases/bone-default-f32/merged")));
    assert_eq!(x.len(), y.len());
    assert!(x.iter().all(|(k, t)| y[k].data == t.data));
}

#[test]
fn block_for_a_layer_the_base_lacks() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        let v = t["base_model.model.model.layers.0.self_attn.q_proj.bone_block"].clone();
        t.insert("base_model.model.model.layers.9.self_attn.q_proj.bone_block".into(), v);
    });
    let out = e.path("out");
    fails(
        &merge_args(s(&base_f32()), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["model.layers.9.self_attn.q_proj.weight", "another base model"],
    );
}

#[test]
fn conv1d_layers_of_gpt2_are_refused() {
    // GPT-2 stores c_attn/c_fc/c_proj as Conv1D, [in_features, out_features]: a square c_proj passes
    // every shape check, and a block added along out_features would silently land on the wrong axis.
    let e = Env::new();
    let base = e.path("gpt2");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("config.json"), r#"{"model_type": "gpt2", "n_embd": 8}"#).unwrap();
    let w = f32_tensor(vec![8, 8], &[0.5; 64]);
    save(&base.join("model.safetensors"), &[("h.0.attn.c_proj.weight".to_string(), w)].into_iter().collect());
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    edit_json(&a.join("adapter_config.json"), |c| {
        (c["r"], c["target_modules"]) = (4.into(), serde_json::json!(["c_proj"]));
    });
    let block = f32_tensor(vec![4, 8], &[0.01; 32]);
    let key = "base_model.model.h.0.attn.c_proj.bone_block".to_string();
    save(&a.join("adapter_model.safetensors"), &[(key, block)].into_iter().collect());
    let out = e.path("out");
    fails(
        &merge_args(s(&base), s(&a), s(&out)),
        Some(&out),
        &[&a, &base],
        &["h.0.attn.c_proj.weight", "Conv1D", "gpt2", "nn.Linear"],
    );
    // the same tensor in a model whose layers are Linear merges
    std::fs::write(base.join("config.json"), r#"{"model_type": "gpt_bigcode", "n_embd": 8}"#).unwrap();
    ok(&run(&merge_args(s(&base), s(&a), s(&out))));
}

/// A block on an embedding (its weight [vocab, hidden] is 2-D like a Linear one): PEFT 0.18.1
/// refuses such an adapter ("Target module Embedding(96, 48) is not supported"), and bone-tool too,
/// rather than adding a block PEFT never trained. The lm_head block of bone-default-lm-head-bf16
/// moved onto embed_tokens, whose shape is the same.
#[test]
fn blocks_on_embeddings_are_refused() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-lm-head-bf16/adapter", "a");
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        *t = std::mem::take(t).into_iter().map(|(k, v)| (k.replace("lm_head", "model.embed_tokens"), v)).collect();
    });
    edit_json(&a.join("adapter_config.json"), |c| {
        for m in c["target_modules"].as_array_mut().unwrap() {
            if m == "lm_head" {
                *m = "embed_tokens".into();
            }
        }
    });
    let base = fixtures().join("bases/llama-bf16");
    let out = e.path("out");
    fails(
        &merge_args(s(&base), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["\"model.embed_tokens.weight\" is an embedding", "nn.Linear layers only"],
    );
}

#[test]
fn missing_shard_named_in_the_index() {
    let e = Env::new();
    let b = e.copy("bases/llama-bf16-sharded", "base");
    std::fs::remove_file(b.join("model-00002-of-00003.safetensors")).unwrap();
    let a = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    let out = e.path("out");
    fails(
        &merge_args(s(&b), s(&a), s(&out)),
        Some(&out),
        &[&b],
        &["model.safetensors.index.json", "model-00002-of-00003.safetensors", "missing"],
    );
}

#[test]
fn singular_block_on_unmerge() {
    let e = Env::new();
    let a = e.copy("cases/bone-bat-f32/adapter", "a");
    let f = a.join("adapter_model.safetensors");
    edit_tensors(&f, |t| {
        let key = "base_model.model.model.layers.1.mlp.up_proj.bone_block";
        let mut vals = values(&t[key]).into_iter().map(|v| v as f32).collect::<Vec<_>>();
        // block 3 becomes -I: I + B_3 = 0
        for x in 0..8 {
            for y in 0..8 {
                vals[3 * 64 + x * 8 + y] = if x == y { -1.0 } else { 0.0 };
            }
        }
        t.insert(key.into(), f32_tensor(t[key].shape.clone(), &vals));
    });
    let merged = fixtures().join("cases/bone-bat-f32/merged");
    let out = e.path("out");
    fails(
        &["unmerge", "--merged", s(&merged), "--adapter", s(&a), "--out", s(&out)],
        Some(&out),
        &[&a],
        &["model.layers.1.mlp.up_proj", "block 3", "singular"],
    );
}

#[test]
fn existing_out_needs_force() {
    let e = Env::new();
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let out = e.path("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let o = run(&merge_args(s(&base_f32()), s(&a), s(&out)));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists") && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "old", "untouched without --force");
    let base = base_f32();
    let mut args = merge_args(s(&base), s(&a), s(&out));
    args.extend(["--force", "-q"]);
    ok(&run(&args));
    assert!(!out.join("keep.txt").exists(), "replaced with --force");
    assert!(out.join("model.safetensors").exists());
    assert_eq!(leftovers(e.tmp.path(), ".tmp-"), Vec::<String>::new());
    assert_eq!(leftovers(e.tmp.path(), ".old-"), Vec::<String>::new());
}

#[test]
fn unwritable_output_folder() {
    let e = Env::new();
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let file = e.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("out");
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), None, &[], &["cannot create", "a-file"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

#[test]
fn output_inside_an_input_is_refused() {
    let e = Env::new();
    let b = e.copy("bases/llama-f32", "base");
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let out = b.join("merged");
    fails(&merge_args(s(&b), s(&a), s(&out)), Some(&out), &[&b], &["overlaps the input"]);
    // --force on the base folder itself would destroy it
    let mut args = merge_args(s(&b), s(&a), s(&b));
    args.push("--force");
    fails(&args, None, &[&b], &["overlaps the input"]);
}

#[test]
fn hub_ids_get_a_download_hint() {
    // relative to the package root, where cargo runs the tests: neither exists there
    let e = Env::new();
    let out = e.path("out");
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let line = fails(
        &merge_args("meta-llama/Llama-3.2-1B", s(&a), s(&out)),
        Some(&out),
        &[],
        &["meta-llama/Llama-3.2-1B: no such file or folder", "hf download meta-llama/Llama-3.2-1B"],
    );
    assert!(line.contains("not in the local Hugging Face cache"), "{line}");
    fails(
        &merge_args(s(&base_f32()), "someone/bone-adapter", s(&out)),
        Some(&out),
        &[],
        &["someone/bone-adapter: no such adapter folder", "huggingface-cli download someone/bone-adapter"],
    );
    // a plain missing folder gets no such hint
    let line = fails(&merge_args("no-such-base", s(&a), s(&out)), Some(&out), &[], &["no-such-base: no such file"]);
    assert!(!line.contains("huggingface-cli"), "{line}");
}

#[test]
fn adapter_folder_passed_as_base() {
    let e = Env::new();
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let out = e.path("out");
    fails(&merge_args(s(&a), s(&a), s(&out)), Some(&out), &[], &["adapter folder", "--adapter"]);
}

#[test]
fn bone_block_in_a_miss_adapter() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let cfg = a.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"BONE\"", "\"MISS\"");
    std::fs::write(&cfg, text).unwrap();
    let out = e.path("out");
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), Some(&out), &[&a], &["BONE block", "\"MISS\""]);
}

#[test]
fn tied_embeddings_stay_tied_only_when_asked() {
    let e = Env::new();
    let b = e.copy("bases/llama-bf16-sharded", "base");
    let cfg = b.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
    std::fs::write(&cfg, text).unwrap();
    let a = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    let out = e.path("out");
    let mut args = merge_args(s(&b), s(&a), s(&out));
    args.push("--keep-tied");
    fails(&args, Some(&out), &[&b], &["ties lm_head", "lm_head.weight", "--keep-tied"]);
}

/// T5 ties lm_head to `shared` and scales the decoder's output by d_model^-0.5 only while tied, so
/// untying it would change the model: an adapter on its lm_head is refused, saying so.
#[test]
fn a_t5_style_tied_head_is_refused_with_the_reason() {
    let e = Env::new();
    let b = e.copy("bases/llama-bf16", "base");
    edit_tensors(&b.join("model.safetensors"), |t| {
        let head = t.remove("lm_head.weight").unwrap();
        t.remove("model.embed_tokens.weight").unwrap();
        t.insert("shared.weight".into(), head);
    });
    edit_json(&b.join("config.json"), |c| c["tie_word_embeddings"] = true.into());
    let a = fixtures().join("cases/bone-default-lm-head-bf16/adapter");
    let out = e.path("out");
    fails(
        &merge_args(s(&b), s(&a), s(&out)),
        Some(&out),
        &[&b],
        &["\"lm_head.weight\"", "\"shared.weight\"", "d_model^-0.5"],
    );
}

/// A base saved as the bare backbone (LlamaModel: `embed_tokens.weight`, `layers.0.…`, no
/// `lm_head`) has no output layer: an adapter on lm_head is refused, saying so, whether the base
/// is untied (no tensor to merge into) or tied (untying would put an output layer beside the
/// backbone's tensors, which transformers refuses to load).
#[test]
fn an_adapter_on_lm_head_does_not_fit_a_bare_backbone() {
    let e = Env::new();
    let b = e.copy("bases/llama-bf16", "base");
    edit_tensors(&b.join("model.safetensors"), |t| {
        t.remove("lm_head.weight").unwrap();
        *t = bare_backbone(std::mem::take(t));
    });
    let a = e.copy("cases/bone-default-lm-head-bf16/adapter", "a");
    edit_tensors(&a.join("adapter_model.safetensors"), |t| t.retain(|k, _| k.contains("lm_head")));
    edit_json(&a.join("adapter_config.json"), |c| c["target_modules"] = serde_json::json!(["lm_head"]));
    let out = e.path("out");
    fails(
        &merge_args(s(&b), s(&a), s(&out)),
        Some(&out),
        &[&b, &a],
        &["\"lm_head.weight\"", "bare backbone", "ForCausalLM"],
    );
    edit_json(&b.join("config.json"), |c| c["tie_word_embeddings"] = true.into());
    fails(
        &merge_args(s(&b), s(&a), s(&out)),
        Some(&out),
        &[&b, &a],
        &["ties lm_head to \"embed_tokens.weight\"", "bare backbone", "transformers refuses an output layer"],
    );
}

/// A config without target_modules (written by hand; PEFT saves the modules it chose) on a model
/// type PEFT has no default targets for: PEFT refuses it ("Please specify `target_modules` in
/// `peft_config`"), and so does bone-tool, naming the file and the model type; and a string
/// target_modules beside layers_to_transform, which PEFT's config refuses.
#[test]
fn configs_peft_refuses_to_load_are_refused() {
    let e = Env::new();
    let a = e.copy("cases/miss-bat-llava-bf16/adapter", "a");
    edit_json(&a.join("adapter_config.json"), |c| c["target_modules"] = serde_json::Value::Null);
    let base = fixtures().join("bases/llava-bf16");
    let out = e.path("out");
    fails(
        &merge_args(s(&base), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["adapter_config.json", "names no target_modules", "model_type \"llava\"", "PEFT", "refuses"],
    );
    edit_json(&a.join("adapter_config.json"), |c| {
        (c["target_modules"], c["layers_to_transform"]) = (".*q_proj".into(), serde_json::json!([0]));
    });
    fails(
        &merge_args(s(&base), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["adapter_config.json", "layers_to_transform is [0]", "\".*q_proj\"", "PEFT refuses"],
    );
}

#[test]
fn foreign_keys_are_ignored_with_a_warning() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        let v = t["base_model.model.model.layers.0.self_attn.q_proj.bone_block"].clone();
        t.insert("base_model.model.model.layers.0.self_attn.q_proj.bone_block.other".into(), v);
    });
    let out = e.path("out");
    let o = run(&merge_args(s(&base_f32()), s(&a), s(&out)));
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("warning:") && err.contains("bone_block.other") && err.contains("another adapter"), "{err}");
    let (ours, peft) = (load(&out), load(&fixtures().join("cases/bone-default-f32/merged")));
    assert!(ours.iter().all(|(k, t)| peft[k].data == t.data), "the foreign block changed nothing");
}

#[test]
fn a_merge_that_overflows_stops_unless_allowed() {
    let e = Env::new();
    let a = e.copy("cases/bone-default-f16-blocks-f16/adapter", "a");
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        let key = "base_model.model.model.layers.1.self_attn.v_proj.bone_block";
        let shape = t[key].shape.clone();
        let n: usize = shape.iter().product();
        // 70000 is beyond f16's largest finite value (65504): the merged weight becomes inf
        t.insert(key.into(), f32_tensor(shape, &vec![70000.0; n]));
    });
    let base = fixtures().join("bases/llama-f16");
    let out = e.path("out");
    fails(
        &merge_args(s(&base), s(&a), s(&out)),
        Some(&out),
        &[&a],
        &["model.layers.1.self_attn.v_proj.weight", "not finite", "--allow-non-finite"],
    );
    let mut args = merge_args(s(&base), s(&a), s(&out));
    args.extend(["--allow-non-finite", "-q"]);
    ok(&run(&args));
    let v = values(&load(&out)["model.layers.1.self_attn.v_proj.weight"]);
    assert!(v.iter().all(|x| x.is_infinite()), "written as asked");
}

#[test]
#[cfg(unix)] // making a symbolic link on Windows needs a privilege
fn symlinks_out_of_the_folder_are_refused_but_the_hf_cache_layout_works() {
    let e = Env::new();
    let a = fixtures().join("cases/bone-default-f32/adapter");
    // a model folder whose weights are a link to a file elsewhere
    let elsewhere = e.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::copy(base_f32().join("model.safetensors"), elsewhere.join("weights.bin")).unwrap();
    let linked = e.path("linked");
    std::fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("weights.bin"), linked.join("model.safetensors")).unwrap();
    let out = e.path("out");
    fails(&merge_args(s(&linked), s(&a), s(&out)), Some(&out), &[&elsewhere], &["symbolic link", "outside its folder"]);
    // a Hugging Face cache snapshot: models--org--name/snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
    let repo = e.path("hub/models--org--tiny");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
    std::fs::copy(base_f32().join("model.safetensors"), repo.join("blobs/0123abcd")).unwrap();
    std::os::unix::fs::symlink("../../blobs/0123abcd", repo.join("snapshots/abc123/model.safetensors")).unwrap();
    let snapshot = repo.join("snapshots/abc123");
    ok(&run(&["-q", "merge", "--base", s(&snapshot), "--adapter", s(&a), "--out", s(&out)]));
    let (ours, peft) = (load(&out), load(&fixtures().join("cases/bone-default-f32/merged")));
    assert!(ours.iter().all(|(k, t)| peft[k].data == t.data));
}

#[test]
fn huge_headers_and_shards_listed_twice_are_refused() {
    let e = Env::new();
    // a header length of 200 MB: refused before anything is allocated
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let mut bytes = 200_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    std::fs::write(a.join("adapter_model.safetensors"), bytes).unwrap();
    let out = e.path("out");
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), Some(&out), &[&a], &["adapter_model.safetensors", "100 MB"]);
    // the same shard under two names in the index: its tensors would be stored twice
    let b = e.copy("bases/llama-bf16-sharded", "base");
    std::fs::copy(b.join("model-00001-of-00003.safetensors"), b.join("copy.safetensors")).unwrap();
    edit_json(&b.join("model.safetensors.index.json"), |index| {
        let first = index["weight_map"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, v)| *v == "model-00001-of-00003.safetensors")
            .unwrap()
            .0
            .clone();
        index["weight_map"][&first] = "copy.safetensors".into();
    });
    let adapter = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    fails(&merge_args(s(&b), s(&adapter), s(&out)), Some(&out), &[&b], &["stored twice", "copy.safetensors"]);
}

#[test]
fn index_entries_naming_files_outside_the_model_folder_are_refused() {
    let e = Env::new();
    let b = e.copy("bases/llama-bf16-sharded", "base");
    let adapter = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    let out = e.path("out");
    let idx = b.join("model.safetensors.index.json");
    // each would be read from (and written to) a path beside or above the folder; `C:x` on Windows
    // is a file in drive C's working folder
    let mut outside = vec!["../model-00001-of-00003.safetensors", "sub/x.safetensors", "..", ""];
    if cfg!(windows) {
        outside.push("C:model-00001-of-00003.safetensors");
    }
    for name in outside {
        // (the same entry each time: its key keeps its place)
        edit_json(&idx, |index| {
            let first = index["weight_map"].as_object().unwrap().keys().next().unwrap().clone();
            index["weight_map"][&first] = name.into();
        });
        let shown = serde_json::Value::from(name).to_string();
        fails(&merge_args(s(&b), s(&adapter), s(&out)), Some(&out), &[&b], &[&shown, "is not a plain file name"]);
    }
}

#[test]
fn a_dtype_that_cannot_hold_a_value_stops_unless_allowed() {
    let e = Env::new();
    let b = e.copy("bases/llama-f32", "base");
    let key = "model.norm.weight";
    edit_tensors(&b.join("model.safetensors"), |t| {
        let mut vals = values(&t[key]).iter().map(|v| *v as f32).collect::<Vec<_>>();
        vals[5] = 1e5; // beyond f16's largest finite value (65504), fine in bf16
        t.insert(key.into(), f32_tensor(t[key].shape.clone(), &vals));
    });
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let out = e.path("out");
    let mut args = merge_args(s(&b), s(&a), s(&out));
    args.extend(["--dtype", "f16"]);
    fails(&args, Some(&out), &[&b], &["model.norm.weight", "element 5", "does not fit in F16", "--allow-non-finite"]);
    args.push("--allow-non-finite");
    ok(&run(&args));
    assert!(values(&load(&out)[key])[5].is_infinite());
}

/// `--device cuda` where no GPU can be used fails cleanly: at once, and also when the device opens
/// late, beside the pipeline (BONE_TOOL_OPEN_DELAY_MS), after the CPU has computed the adds.
#[test]
fn cuda_without_a_usable_gpu_fails_cleanly_even_when_found_out_late() {
    let env = Env::new();
    let base = fixtures().join("bases/llama-bf16");
    let adapter = fixtures().join("cases/bone-default-tail-bf16/adapter");
    let out = env.path("out");
    let mut args = merge_args(s(&base), s(&adapter), s(&out));
    args.extend(["--device", "cuda"]);
    let probe = run(&args);
    if probe.status.success() {
        eprintln!("a GPU is usable here: this test checks the machines without one");
        return;
    }
    fails(&args, Some(&out), &[&base, &adapter], &["--device cuda: no usable GPU"]);
    for delay in ["0", "40"] {
        let o = bin().args(&args).env("BONE_TOOL_OPEN_DELAY_MS", delay).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "delay {delay}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].contains("--device cuda: no usable GPU"), "{err}");
        assert!(!out.exists(), "delay {delay}: {} must not exist", out.display());
        assert_eq!(leftovers(env.tmp.path(), ".tmp-"), Vec::<String>::new(), "temporary folder left behind");
    }
}

#[test]
fn a_folder_of_adapters_names_them() {
    let e = Env::new();
    let b = base_f32();
    let runs = e.path("runs");
    let out = e.path("out");
    // a trainer's output folder: one checkpoint folder
    e.copy("cases/bone-default-f32/adapter", "runs/checkpoint-500");
    let line = fails(&merge_args(s(&b), s(&runs), s(&out)), Some(&out), &[&runs], &["no adapter_config.json"]);
    assert!(line.contains(&format!("subfolder {} is one: pass it", runs.join("checkpoint-500").display())), "{line}");
    // PEFT's save_pretrained of several named adapters: a folder each; plain folders are not named
    e.copy("cases/bone-bat-f32/adapter", "runs/checkpoint-1000");
    std::fs::create_dir_all(runs.join("logs")).unwrap();
    let line = fails(&["inspect", "adapter", s(&runs)], None, &[&runs], &["no adapter_config.json"]);
    let names = format!("{}, {}", runs.join("checkpoint-1000").display(), runs.join("checkpoint-500").display());
    assert!(line.contains(&format!("subfolders {names} are adapters: pass one of them")), "{line}");
    assert!(!line.contains("logs"), "{line}");
    // a model folder keeps its own hint
    let line = fails(&merge_args(s(&b), s(&b), s(&out)), Some(&out), &[], &["no adapter_config.json"]);
    assert!(line.contains("looks like a model folder: pass it with --base"), "{line}");
}

#[test]
fn targeted_modules_without_a_block_get_peft_s_zero_block_with_a_warning() {
    // PEFT builds a layer on every module the config targets; where the file has no block it warns
    // "Found missing adapter keys" and merges the layer's initial block: zeros unless init_weights
    // is false (checked with PEFT 0.18.1 on this fixture: the layer stays as it was; and in the
    // sweep, where an f16 weight's -0 became +0 in W + 0, as here)
    let e = Env::new();
    let a = e.copy("cases/bone-default-f32/adapter", "a");
    let dropped = "model.layers.1.self_attn.q_proj";
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        assert!(t.remove(&format!("base_model.model.{dropped}.bone_block")).is_some());
    });
    let weight = format!("{dropped}.weight");
    // a private base whose dropped module holds a -0 and a +0
    let b = e.copy("bases/llama-f32", "base");
    let mut bt = load(&b.join("model.safetensors"));
    let w = bt.get_mut(&weight).unwrap();
    w.data[..8].copy_from_slice(&[0, 0, 0, 0x80, 0, 0, 0, 0]);
    save(&b.join("model.safetensors"), &bt);
    let out = e.path("out");
    let o = run(&merge_args(s(&b), s(&a), s(&out)));
    ok(&o);
    let warnings: Vec<String> = stderr(&o).lines().filter(|l| l.starts_with("warning:")).map(String::from).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for needle in [&format!("{dropped:?}"), "no block", "zeros: no change but -0 becoming +0", "made for this base"] {
        assert!(warnings[0].contains(needle), "{needle}: {}", warnings[0]);
    }
    let (merged, peft) = (load(&out), load(&fixtures().join("cases/bone-default-f32/merged")));
    // W + 0 in f32: every value as it was, but -0 is +0
    let want: Vec<u8> = bt[&weight]
        .data
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) + 0.0).to_le_bytes())
        .collect();
    assert_eq!(&want[..8], &[0u8; 8], "-0 + 0 is +0");
    assert_eq!(merged[&weight].data, want);
    assert_ne!(peft[&weight].data, merged[&weight].data, "the block would have changed it");
    assert!(merged.iter().filter(|(k, _)| **k != weight).all(|(k, v)| peft[k].data == v.data));
    // --dry-run lists the zero block
    let o = run(&[&merge_args(s(&b), s(&a), s(&e.path("dry")))[..], &["--dry-run"]].concat());
    ok(&o);
    assert!(stdout(&o).contains(&format!("(PEFT's initial block of {dropped}: zeros)")), "{}", stdout(&o));
    // inspect tells with --base (only a base shows which modules the config targets)
    let j = |extra: &[&str]| -> serde_json::Value {
        let o = run(&[&["inspect", "adapter", s(&a), "--json"], extra].concat());
        ok(&o);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let with_base = j(&["--base", s(&base_f32())]);
    assert_eq!(with_base["modules_without_blocks"], serde_json::json!([dropped]));
    assert_eq!(with_base["warnings"][0].as_str(), Some(warnings[0].trim_start_matches("warning: ")));
    assert_eq!(j(&[])["modules_without_blocks"], serde_json::Value::Null);

    // two missing, and init_weights false: PEFT's initial blocks are random
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        assert!(t.remove("base_model.model.model.layers.0.mlp.up_proj.bone_block").is_some());
    });
    let cfg = a.join("adapter_config.json");
    edit_json(&cfg, |c| c["init_weights"] = false.into());
    let o = run(&merge_args(s(&b), s(&a), s(&e.path("out2"))));
    ok(&o);
    let err = stderr(&o);
    for needle in ["targets 2 modules", "\"model.layers.0.mlp.up_proj\"", "random values", "leaves them unchanged"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // (PEFT's random values cannot be reproduced: the modules are left as they were, -0 and all)
    let out2 = load(&e.path("out2"));
    assert_eq!(out2[&weight].data, bt[&weight].data);
    assert_eq!(out2["model.layers.0.mlp.up_proj.weight"].data, bt["model.layers.0.mlp.up_proj.weight"].data);
    // modules the config does not target need no block: narrowed to what the file holds, no warning
    edit_json(&cfg, |c| {
        c["target_modules"] = serde_json::json!(["k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]);
        c["layers_to_transform"] = serde_json::json!([0]);
    });
    let o = run(&merge_args(s(&base_f32()), s(&a), s(&e.path("out3"))));
    ok(&o);
    assert!(!stderr(&o).contains("no block"), "{}", stderr(&o));
}

#[test]
fn a_vision_language_model_s_module_without_a_block_is_found_by_its_module_path() {
    // The Qwen2.5-VL checkpoint stores the language model under `model.` and the vision blocks
    // under `visual.`; PEFT wraps them as `model.language_model.` and `model.visual.`. A regex
    // target that names the latter must still find the modules whose blocks were taken out (the
    // vision tower's all of them, so no block shows its rename), which get PEFT's zero block (-0
    // becomes +0), and the warning names them both ways. Checked with PEFT 0.18.1 on this input:
    // the same bytes.
    let e = Env::new();
    let a = e.copy("cases/bone-default-qwen2vl-bf16/adapter", "a");
    let dropped = ["model.layers.1.self_attn.q_proj", "visual.blocks.0.mlp.down_proj", "visual.blocks.0.mlp.gate_proj"];
    edit_tensors(&a.join("adapter_model.safetensors"), |t| {
        for module in [
            "language_model.layers.1.self_attn.q_proj",
            "visual.blocks.0.mlp.down_proj",
            "visual.blocks.0.mlp.gate_proj",
        ] {
            assert!(t.remove(&format!("base_model.model.model.{module}.bone_block")).is_some(), "{module}");
        }
    });
    edit_json(&a.join("adapter_config.json"), |c| {
        c["target_modules"] = r".*(language_model|model\.visual).*\.(q_proj|v_proj|gate_proj|down_proj)".into();
    });
    let b = e.copy("bases/qwen2vl-bf16", "base");
    let mut bt = load(&b.join("model.safetensors"));
    for m in dropped {
        bt.get_mut(&format!("{m}.weight")).unwrap().data[..2].copy_from_slice(&[0, 0x80]);
        // bf16 -0
    }
    save(&b.join("model.safetensors"), &bt);
    let o = run(&merge_args(s(&b), s(&a), s(&e.path("out"))));
    ok(&o);
    let err = stderr(&o);
    let named = "\"model.language_model.layers.1.self_attn.q_proj\" (stored as \"model.layers.1.self_attn.q_proj\")";
    assert!(err.contains("targets 3 modules") && err.contains(named) && err.contains("zeros"), "{err}");
    let (merged, peft) = (load(&e.path("out")), load(&fixtures().join("cases/bone-default-qwen2vl-bf16/merged")));
    for m in dropped {
        let name = format!("{m}.weight");
        let mut want = bt[&name].data.clone();
        want[..2].copy_from_slice(&[0, 0]); // W + 0: +0, every other value as it was
        assert_eq!(merged[&name].data, want, "{name}");
        assert_ne!(peft[&name].data, want, "{name}: the block would have changed it");
    }
    let kept = |k: &str| !dropped.iter().any(|m| k == format!("{m}.weight"));
    assert!(merged.iter().filter(|(k, _)| kept(k)).all(|(k, v)| peft[k].data == v.data));
    // inspect --base lists them by the base's names, and the renames the layout implies
    let o = run(&["inspect", "adapter", s(&a), "--base", s(&b), "--json"]);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["modules_without_blocks"], serde_json::json!(dropped));
    let renames = j["base_renames"].to_string();
    assert!(renames.contains("\"model.visual.\"") && renames.contains("\"model.language_model.\""), "{renames}");
}

#[test]
fn layers_transformers_never_loads_get_no_initial_block() {
    // DeepSeek-V3 and GLM-4.5 store a multi-token-prediction layer after their num_hidden_layers
    // decoder layers, Qwen3-Next one under `mtp.`; transformers does not load them, so PEFT has no
    // layer there to give an initial block, and bone-tool copies them untouched, without the
    // missing-block warning. A -0 in each shows that no W + 0 ran over them.
    let e = Env::new();
    let b = e.copy("bases/llama-f32", "base");
    let mut bt = load(&b.join("model.safetensors"));
    let mut extra = bt["model.layers.1.self_attn.q_proj.weight"].clone();
    extra.data[..4].copy_from_slice(&[0, 0, 0, 0x80]);
    let after = "model.layers.2.self_attn.q_proj.weight"; // config.json: num_hidden_layers 2
    let mtp = "mtp.layers.0.self_attn.q_proj.weight";
    bt.insert(after.to_string(), extra.clone());
    bt.insert(mtp.to_string(), extra.clone());
    save(&b.join("model.safetensors"), &bt);
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let o = run(&merge_args(s(&b), s(&a), s(&e.path("out"))));
    ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let (merged, peft) = (load(&e.path("out")), load(&fixtures().join("cases/bone-default-f32/merged")));
    assert_eq!(merged[after].data, extra.data);
    assert_eq!(merged[mtp].data, extra.data);
    assert!(peft.iter().all(|(k, v)| merged[k].data == v.data), "the decoder layers are PEFT's merge");
    // with a third decoder layer in config.json, PEFT would build one there: warned, and W + 0
    edit_json(&b.join("config.json"), |c| c["num_hidden_layers"] = 3.into());
    let o = run(&merge_args(s(&b), s(&a), s(&e.path("out2"))));
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("\"model.layers.2.self_attn.q_proj\"") && err.contains("no block"), "{err}");
    assert!(!err.contains("mtp."), "{err}");
    let merged = load(&e.path("out2"));
    assert_eq!(&merged[after].data[..4], &[0u8; 4], "-0 + 0 is +0");
    assert_eq!(merged[mtp].data, extra.data);
}

#[test]
fn quantized_bases_are_refused_with_what_to_do_instead() {
    let e = Env::new();
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let layer = "model.layers.0.self_attn.q_proj";
    let quantize = |name: &str, method: &str, edit: &dyn Fn(&mut BTreeMap<String, T>)| -> PathBuf {
        let b = e.copy("bases/llama-f32", name);
        edit_tensors(&b.join("model.safetensors"), edit);
        edit_json(&b.join("config.json"), |c| {
            c["quantization_config"] = serde_json::json!({"quant_method": method, "bits": 4});
        });
        b
    };
    // GPTQ keeps the layer as qweight/qzeros/scales: no "<module>.weight" at all
    let gptq = quantize("gptq", "gptq", &|t| {
        let w = t.remove(&format!("{layer}.weight")).unwrap();
        let packed = T {
            dtype: safetensors::Dtype::I32,
            shape: vec![w.shape[1] / 8, w.shape[0]],
            data: vec![0; w.data.len() / 8],
        };
        t.insert(format!("{layer}.qweight"), packed.clone());
        t.insert(format!("{layer}.qzeros"), packed);
    });
    let out = e.path("out");
    fails(
        &merge_args(s(&gptq), s(&a), s(&out)),
        Some(&out),
        &[&gptq],
        &[&format!("{layer}.weight"), "quantized", "\"gptq\"", &format!("{layer}.qweight"), "original model"],
    );
    // FP8 keeps "<module>.weight", in a float type bone-tool does not merge into
    let fp8 = quantize("fp8", "fp8", &|t| {
        let w = t.get_mut(&format!("{layer}.weight")).unwrap();
        (w.dtype, w.data) = (safetensors::Dtype::F8_E4M3, vec![0; w.data.len() / 4]);
    });
    fails(&merge_args(s(&fp8), s(&a), s(&out)), Some(&out), &[&fp8], &["F8_E4M3", "quantized", "\"fp8\""]);
    // inspect --base says the same, and exits 2
    let o = run(&["inspect", "adapter", s(&a), "--base", s(&gptq)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stdout(&o).contains("quantized"), "{}", stdout(&o));
}

#[test]
fn bases_in_other_formats_are_refused_with_what_to_do() {
    let e = Env::new();
    let a = fixtures().join("cases/bone-default-f32/adapter");
    let out = e.path("out");
    let folder = |name: &str, files: &[&str]| -> PathBuf {
        let b = e.path(name);
        std::fs::create_dir_all(&b).unwrap();
        std::fs::copy(base_f32().join("config.json"), b.join("config.json")).unwrap();
        for f in files {
            std::fs::write(b.join(f), b"not safetensors").unwrap();
        }
        b
    };
    let bin = folder("bin", &["pytorch_model.bin"]);
    fails(&merge_args(s(&bin), s(&a), s(&out)), Some(&out), &[&bin], &["PyTorch", "safe_serialization=True"]);
    let gguf = folder("gguf", &["model-Q4_K_M.gguf"]);
    fails(&merge_args(s(&gguf), s(&a), s(&out)), Some(&out), &[&gguf], &["\"model-Q4_K_M.gguf\"", "GGUF", "convert"]);
    let file = gguf.join("model-Q4_K_M.gguf");
    fails(&merge_args(s(&file), s(&a), s(&out)), Some(&out), &[&gguf], &["model-Q4_K_M.gguf: a GGUF file"]);
    let pt = folder("pt", &["consolidated.00.pth"]);
    fails(&merge_args(s(&pt), s(&a), s(&out)), Some(&out), &[&pt], &["\"consolidated.00.pth\"", "pickle"]);
    // a trainer's pickles are not a model in another format
    let trainer = folder("trainer", &["training_args.bin", "optimizer.pt"]);
    let line = fails(&merge_args(s(&trainer), s(&a), s(&out)), Some(&out), &[&trainer], &["no model.safetensors"]);
    assert!(!line.contains("pickle"), "{line}");
    // shards without their index: which tensors each holds is unknown
    let shards = e.copy("bases/llama-bf16-sharded", "shards");
    std::fs::remove_file(shards.join("model.safetensors.index.json")).unwrap();
    fails(
        &merge_args(s(&shards), s(&a), s(&out)),
        Some(&out),
        &[&shards],
        &["3 .safetensors files", "model-00001-of-00003.safetensors", "no model.safetensors.index.json"],
    );
}

/// An adapter saved under DeepSpeed ZeRO-3 without gathering its weights: a 40-byte file with no
/// tensors (transformers 4.x's Trainer), or blocks of shape [0] (save_pretrained on each process).
/// The error says so and how to save it again, rather than "holds no blocks" or a shape rule.
#[test]
fn adapter_saved_without_its_weights() {
    let e = Env::new();
    let a = e.copy("cases/bone-bat-f32/adapter", "a");
    let file = a.join("adapter_model.safetensors");
    save(&file, &BTreeMap::new());
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 40, "the size such a file has");
    let out = e.path("out");
    let ways = ["stage3_gather_16bit_weights_on_model_save", "GatheredParameters"];
    let needles = [&["holds no tensors at all", "ZeRO-3"][..], &ways].concat();
    fails(&merge_args(s(&base_f32()), s(&a), s(&out)), Some(&out), &[&a], &needles);
    fails(&["inspect", "adapter", s(&a)], None, &[&a], &needles);

    let b = e.copy("cases/bone-bat-f32/adapter", "b");
    let file = b.join("adapter_model.safetensors");
    let mut t = load(&file);
    for v in t.values_mut() {
        *v = f32_tensor(vec![0], &[]);
    }
    save(&file, &t);
    let needles = [&["is empty (shape [0])", "ZeRO-3"][..], &ways].concat();
    fails(&merge_args(s(&base_f32()), s(&b), s(&out)), Some(&out), &[&b], &needles);
}
