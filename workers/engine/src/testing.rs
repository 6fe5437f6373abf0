//! Small real-format models for tests, here and in the crates that serve
//! them: the weights cannot be fetched on every machine, the formats can
//! be written.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::t5;
use std::collections::HashMap;
use std::path::Path;

/// A FLAN-T5 config.json as Hugging Face ships it, shrunk.
const TINY_T5_CONFIG: &str = r#"{
  "architectures": ["T5ForConditionalGeneration"],
  "d_ff": 64, "d_kv": 8, "d_model": 32, "decoder_start_token_id": 0,
  "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
  "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
  "is_encoder_decoder": true, "is_gated_act": true, "layer_norm_epsilon": 1e-06,
  "model_type": "t5", "n_positions": 512, "num_decoder_layers": 2, "num_heads": 4,
  "num_layers": 2, "output_past": true, "pad_token_id": 0,
  "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
  "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true,
  "vocab_size": 64
}"#;

/// The tiny tokenizer's words (after T5's three special tokens).
pub const TINY_T5_VOCAB: &str = "summarize the meeting alice bob carol we agreed to ship on friday budget launch list action items decisions one sentence write a summary of this in 3 5 sentences say what was discussed who said that mattered and how it ended use participants names : . , - if there are none no";

/// Writes a tiny FLAN-T5 directory (`config.json`, `model.safetensors`,
/// `tokenizer.json`) with random weights under the real names.
pub fn write_tiny_flan_t5(dir: &Path) -> candle_core::Result<()> {
    std::fs::write(dir.join("config.json"), TINY_T5_CONFIG)?;
    let cfg: t5::Config = serde_json::from_str(TINY_T5_CONFIG).map_err(candle_core::Error::wrap)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    t5::T5ForConditionalGeneration::load(vb, &cfg)?;
    // Hugging Face stores the shared embedding as `shared.weight`; a fresh
    // VarMap names it after the encoder's fallback path. Rename it, so that
    // the loader takes the same path as on real FLAN-T5 weights.
    let mut tensors: HashMap<String, candle_core::Tensor> = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let embed = tensors.keys().find(|k| k.contains("embed_tokens")).cloned();
    let shared = embed
        .and_then(|k| tensors.remove(&k))
        .ok_or_else(|| candle_core::Error::Msg("no embedding in the tiny T5".into()))?;
    tensors.insert("shared.weight".into(), shared);
    // A fresh VarMap's layer norms start at zero, which zeroes every
    // hidden state and so every logit; real weights never do.
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("layer_norm.weight") {
            *t = t.ones_like()?;
        }
    }
    // The special tokens' rows of the output projection are zero: their
    // logit is 0 while the largest of the 61 random others is positive
    // (all but surely), so greedy decoding says words and never stops at
    // once, and an empty output is a failure of the code, not of the draw.
    let head = tensors
        .get("lm_head.weight")
        .ok_or_else(|| candle_core::Error::Msg("no lm_head.weight".into()))?;
    let mut rows: Vec<Vec<f32>> = head.to_vec2()?;
    for row in rows.iter_mut().take(3) {
        row.iter_mut().for_each(|x| *x = 0.0);
    }
    let head = candle_core::Tensor::new(rows, &Device::Cpu)?;
    tensors.insert("lm_head.weight".into(), head);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;

    // A word-level tokenizer.json over a small vocabulary, with T5's
    // special tokens at T5's ids (pad 0, eos 1, unk 2).
    let mut vocab: Vec<String> = vec!["<pad>".into(), "</s>".into(), "<unk>".into()];
    for w in TINY_T5_VOCAB.split_whitespace() {
        if !vocab.iter().any(|v| v == w) && vocab.len() < 64 {
            vocab.push(w.to_string());
        }
    }
    let vocab_json: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab_json, "unk_token": "<unk>"}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer).map_err(candle_core::Error::wrap)?,
    )?;
    Ok(())
}

/// Splits a directory's `model.safetensors` into two shards and the
/// `model.safetensors.index.json` that maps each tensor to its shard, as
/// Hugging Face writes larger checkpoints, then removes the single file.
pub fn shard_safetensors(dir: &Path) -> candle_core::Result<Vec<String>> {
    let single = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let shard: HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(files[i]))?;
        for n in part {
            weight_map.insert((*n).clone(), files[i].into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).map_err(candle_core::Error::wrap)?,
    )?;
    std::fs::remove_file(single)?;
    Ok(files.iter().map(|f| f.to_string()).collect())
}
