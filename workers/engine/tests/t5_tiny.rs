//! FLAN-T5's code path on tiny weights this test writes itself, with the
//! real Hugging Face tensor names and config keys (the real weights cannot
//! be fetched on these machines).

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::t5;
use recap_engine::t5::{T5Options, T5Summarizer};
use recap_engine::{Cancel, EngineError, SummarizeRequest, Summarizer};
use recap_job::{utterances_from_text, SummaryKind};
use std::collections::HashMap;
use std::path::Path;

/// A FLAN-T5 config.json as Hugging Face ships it, shrunk.
const CONFIG: &str = r#"{
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
const VOCAB: &str = "summarize the meeting alice bob carol we agreed to ship on friday budget launch list action items decisions one sentence write a summary of this in 3 5 sentences say what was discussed who said that mattered and how it ended use participants names : . , - if there are none no";

fn write_tiny_flan_t5(dir: &Path) {
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let cfg: t5::Config = serde_json::from_str(CONFIG).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    t5::T5ForConditionalGeneration::load(vb, &cfg).unwrap();
    // Hugging Face stores the shared embedding as `shared.weight`; a fresh
    // VarMap names it after the encoder's fallback path. Rename it, so that
    // the loader takes the same path as on real FLAN-T5 weights.
    let mut tensors: HashMap<String, candle_core::Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let embed = tensors.keys().find(|k| k.contains("embed_tokens")).cloned();
    let shared = tensors
        .remove(embed.as_deref().unwrap_or_default())
        .unwrap_or_else(|| {
            panic!(
                "no embedding among {:?}",
                tensors.keys().collect::<Vec<_>>()
            )
        });
    tensors.insert("shared.weight".into(), shared);
    // A fresh VarMap's layer norms start at zero, which zeroes every
    // hidden state and so every logit; real weights never do.
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("layer_norm.weight") {
            *t = t.ones_like().unwrap();
        }
    }
    // The special tokens' rows of the output projection are zero: their
    // logit is 0 while the largest of the 61 random others is positive
    // (all but surely), so greedy decoding says words and never stops at
    // once, and an empty output is a failure of the code, not of the draw.
    let head = tensors.get("lm_head.weight").expect("lm_head.weight");
    let mut rows: Vec<Vec<f32>> = head.to_vec2().unwrap();
    for row in rows.iter_mut().take(3) {
        row.iter_mut().for_each(|x| *x = 0.0);
    }
    let head = candle_core::Tensor::new(rows, &Device::Cpu).unwrap();
    tensors.insert("lm_head.weight".into(), head);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();

    // A word-level tokenizer.json over a small vocabulary, with T5's
    // special tokens at T5's ids (pad 0, eos 1, unk 2).
    let mut vocab: Vec<String> = vec!["<pad>".into(), "</s>".into(), "<unk>".into()];
    for w in VOCAB.split_whitespace() {
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
        serde_json::to_vec(&tokenizer).unwrap(),
    )
    .unwrap();
}

fn opts(dtype: DType) -> T5Options {
    T5Options {
        id: "flan-t5-tiny-test".into(),
        dtype,
        device: Device::Cpu,
        max_input_tokens: 512,
    }
}

#[test]
fn the_weights_carry_the_real_hugging_face_names() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_flan_t5(dir.path());
    let tensors =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for name in [
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi_0.weight",
        "encoder.final_layer_norm.weight",
        "decoder.block.0.layer.1.EncDecAttention.k.weight",
        "decoder.block.1.layer.2.DenseReluDense.wo.weight",
        "lm_head.weight",
    ] {
        assert!(
            tensors.contains_key(name),
            "missing {name}; have {:?}",
            tensors.keys().take(8).collect::<Vec<_>>()
        );
    }
}

#[test]
fn flan_t5_round_trip_on_tiny_weights_in_f32_and_bf16() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_flan_t5(dir.path());
    let transcript = utterances_from_text("Alice: we agreed to ship on friday\nBob: budget launch");
    for dtype in [DType::F32, DType::BF16] {
        let m = T5Summarizer::load(dir.path(), &opts(dtype)).unwrap();
        let out = m
            .summarize(&SummarizeRequest {
                transcript: &transcript,
                kinds: &[SummaryKind::Short, SummaryKind::Decisions],
                language: None,
                query: None,
                deadline: None,
                cancel: Cancel::default(),
            })
            .unwrap();
        assert_eq!(out.len(), 2);
        for o in &out {
            // The FLAN instruction and the transcript went in whole.
            assert!(
                o.input_tokens > 10,
                "{dtype:?}: {} input tokens",
                o.input_tokens
            );
            assert_eq!(o.chunks, 1);
            // Random weights say random words of the vocabulary.
            assert!(o.output_tokens > 0, "{dtype:?}: no output tokens");
            let words: Vec<&str> = o.text.split_whitespace().collect();
            assert!(!words.is_empty(), "{dtype:?}: empty output");
            assert!(
                words
                    .iter()
                    .all(|w| VOCAB.split_whitespace().any(|v| v == *w)),
                "{dtype:?}: words outside the vocabulary: {}",
                o.text
            );
        }
        assert_eq!(m.engine(), "t5");
        assert!(m.count_tokens("alice and bob").unwrap() == 4);
    }
}

#[test]
fn long_input_is_chunked_for_t5_too() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_flan_t5(dir.path());
    let m = T5Summarizer::load(
        dir.path(),
        &T5Options {
            max_input_tokens: 64,
            ..opts(DType::F32)
        },
    )
    .unwrap();
    let text: String = (0..30)
        .map(|_| "Alice: we agreed to ship on friday\n")
        .collect();
    let t = utterances_from_text(&text);
    let out = m
        .summarize(&SummarizeRequest {
            transcript: &t,
            kinds: &[SummaryKind::Short],
            language: None,
            query: None,
            deadline: None,
            cancel: Cancel::default(),
        })
        .unwrap();
    assert!(out[0].chunks > 1, "{}", out[0].chunks);
}

#[test]
fn bad_t5_directories_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = T5Summarizer::load(dir.path(), &opts(DType::F32))
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::BadModel(_)) && err.to_string().contains("config.json"),
        "{err}"
    );
    write_tiny_flan_t5(dir.path());
    let err = T5Summarizer::load(dir.path(), &opts(DType::F16))
        .err()
        .unwrap();
    assert!(err.to_string().contains("NaN"), "{err}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = T5Summarizer::load(dir.path(), &opts(DType::F32))
        .err()
        .unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    write_tiny_flan_t5(dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("model.safetensors"))
        .unwrap();
    f.set_len(100).unwrap();
    let err = T5Summarizer::load(dir.path(), &opts(DType::F32))
        .err()
        .unwrap();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}
