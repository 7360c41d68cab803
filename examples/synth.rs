//! Synthetic Llama-shaped checkpoints for benchmarks: a base model sharded like Hugging Face
//! does (~1 GB files plus an index), a Bone default adapter, a BAT adapter and a MiSS mini
//! adapter (mini_r = 16 unless --mini-r says otherwise) with r = 64 on all seven linear kinds.
//! Values are random normal (seeded; no NaN or Inf; each adapter's values do not depend on the
//! ones written after it, so adding one leaves the others as they were).
//!
//!   cargo run --release --example synth -- --shape 1b --out /tmp/synth-1b
//!
//! writes /tmp/synth-1b/{base,default,bat,mini}.

use bone_tool::model::file::build_header;
use rayon::prelude::*;
use safetensors::Dtype;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

struct Shape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

fn shape(name: &str) -> Shape {
    match name {
        // TinyLlama-1.1B: about 2.2 GB in bf16
        "1b" => Shape { hidden: 2048, intermediate: 5632, layers: 22, heads: 32, kv_heads: 4, vocab: 32000 },
        // Llama-3.2-3B-like
        "3b" => Shape { hidden: 3072, intermediate: 8192, layers: 28, heads: 24, kv_heads: 8, vocab: 32000 },
        // Llama-2-7B
        "7b" => Shape { hidden: 4096, intermediate: 11008, layers: 32, heads: 32, kv_heads: 32, vocab: 32000 },
        // a quick one for smoke tests
        "tiny" => Shape { hidden: 256, intermediate: 512, layers: 2, heads: 4, kv_heads: 2, vocab: 1000 },
        other => panic!("unknown shape {other:?}: 1b, 3b, 7b or tiny"),
    }
}

const LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn linear_shape(s: &Shape, kind: &str) -> (usize, usize) {
    let kv = s.hidden / s.heads * s.kv_heads;
    match kind {
        "q_proj" | "o_proj" => (s.hidden, s.hidden),
        "k_proj" | "v_proj" => (kv, s.hidden),
        "gate_proj" | "up_proj" => (s.intermediate, s.hidden),
        "down_proj" => (s.hidden, s.intermediate),
        _ => unreachable!(),
    }
}

fn module(layer: usize, kind: &str) -> String {
    let part = if kind.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(&kind) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{part}.{kind}")
}

/// Seeded normal values, generated in parallel chunks.
fn normal(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut x = seed ^ (c as u64).wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        for pair in chunk.chunks_mut(2) {
            let (u1, u2) = (next(), next());
            let rad = (-2.0 * u1.ln()).sqrt();
            let th = std::f64::consts::TAU * u2;
            pair[0] = (rad * th.cos()) as f32 * std;
            if pair.len() > 1 {
                pair[1] = (rad * th.sin()) as f32 * std;
            }
        }
    });
    v
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

type Spec = (String, Vec<usize>, f32);

fn write_file(path: &Path, tensors: &[Spec], dtype: Dtype, seed: &mut u64) {
    let layout: Vec<_> = tensors.iter().map(|(n, s, _)| (n.clone(), dtype, s.clone())).collect();
    let header = build_header(&layout).unwrap();
    let mut w = BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    w.write_all(&header).unwrap();
    for (_, shape, std) in tensors {
        *seed += 1;
        let n = shape.iter().product();
        w.write_all(&encode(&normal(n, *seed, *std), dtype)).unwrap();
    }
    w.flush().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let s = shape(&get("--shape", "1b"));
    let out = PathBuf::from(get("--out", "/tmp/synth-1b"));
    let dtype = match get("--dtype", "bf16").as_str() {
        "bf16" => Dtype::BF16,
        "f16" => Dtype::F16,
        "f32" => Dtype::F32,
        d => panic!("dtype {d}"),
    };
    let r: usize = get("--r", "64").parse().unwrap();
    let mini_r: usize = get("--mini-r", "16").parse().unwrap();
    let max_shard: usize = get("--max-shard-bytes", "1000000000").parse().unwrap();
    let esize = dtype.bitsize() / 8;

    // Base tensors in Hugging Face's order (sorted by name within a dtype).
    let mut tensors: Vec<Spec> = vec![
        ("model.embed_tokens.weight".into(), vec![s.vocab, s.hidden], 0.02),
        ("model.norm.weight".into(), vec![s.hidden], 0.02),
        ("lm_head.weight".into(), vec![s.vocab, s.hidden], 0.02),
    ];
    for l in 0..s.layers {
        for kind in LINEAR {
            let (o, i) = linear_shape(&s, kind);
            tensors.push((format!("{}.weight", module(l, kind)), vec![o, i], 0.02));
        }
        tensors.push((format!("model.layers.{l}.input_layernorm.weight"), vec![s.hidden], 0.02));
        tensors.push((format!("model.layers.{l}.post_attention_layernorm.weight"), vec![s.hidden], 0.02));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    // Greedy sharding, as transformers does.
    let mut shards: Vec<Vec<Spec>> = vec![vec![]];
    let mut size = 0;
    for t in tensors {
        let bytes = t.1.iter().product::<usize>() * esize;
        if size + bytes > max_shard && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push(t);
    }
    let base = out.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    let mut seed = 1;
    for (k, shard) in shards.iter().enumerate() {
        let name =
            if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
        for (t, sh, _) in shard {
            weight_map.insert(t.clone(), name.clone().into());
            total += sh.iter().product::<usize>() * esize;
        }
        write_file(&base.join(&name), shard, dtype, &mut seed);
        eprintln!("wrote {}", base.join(&name).display());
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(base.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap() + "\n")
            .unwrap();
    }
    let torch_dtype = match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
        "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab, "tie_word_embeddings": false, "torch_dtype": torch_dtype,
    });
    std::fs::write(base.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    // Adapters: Bone default and BAT, MiSS mini; r on all seven linear kinds, f32 blocks.
    let variants = [
        ("default", "BONE", serde_json::json!(true)),
        ("bat", "BONE", serde_json::json!("bat")),
        ("mini", "MISS", serde_json::json!("mini")),
    ];
    for (variant, peft_type, init) in variants {
        let dir = out.join(variant);
        std::fs::create_dir_all(&dir).unwrap();
        let mut blocks: Vec<Spec> = vec![];
        for l in 0..s.layers {
            for kind in LINEAR {
                let (o, _) = linear_shape(&s, kind);
                let shape = match variant {
                    "bat" => vec![o / r, r, r],
                    "mini" => vec![r, mini_r],
                    _ => vec![r, o],
                };
                // BAT blocks stay small so that I + B is well conditioned (unmerge is exact-ish).
                let std = if variant == "bat" { 0.2 / r as f32 } else { 0.01 };
                let key = if peft_type == "MISS" { "miss_block" } else { "bone_block" };
                blocks.push((format!("base_model.model.{}.{key}", module(l, kind)), shape, std));
            }
        }
        blocks.sort_by(|a, b| a.0.cmp(&b.0));
        write_file(&dir.join("adapter_model.safetensors"), &blocks, Dtype::F32, &mut seed);
        let mut cfg = serde_json::json!({
            "peft_type": peft_type, "r": r, "init_weights": init, "target_modules": LINEAR,
            "base_model_name_or_path": "synthetic", "bias": "none", "task_type": "CAUSAL_LM",
        });
        if variant == "mini" {
            cfg["mini_r"] = mini_r.into();
        }
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        eprintln!("wrote {}", dir.display());
    }
}
