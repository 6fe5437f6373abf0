//! FLAN-T5's code path on tiny weights this test writes itself, with the
//! real Hugging Face tensor names and config keys (the real weights cannot
//! be fetched on these machines).

use candle_core::{DType, Device};
use recap_engine::models::t5::{T5Options, T5Summarizer};
use recap_engine::testing::{write_tiny_flan_t5, TINY_T5_VOCAB as VOCAB};
use recap_engine::{Cancel, EngineError, SummarizeRequest, Summarizer};
use recap_job::{utterances_from_text, SummaryKind};

fn opts(dtype: DType) -> T5Options {
    T5Options {
        id: "flan-t5-tiny-test".into(),
        dtype,
        device: Device::Cpu,
        max_input_tokens: 512,
        sha256: None,
    }
}

#[test]
fn the_weights_carry_the_real_hugging_face_names() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_flan_t5(dir.path()).unwrap();
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
    write_tiny_flan_t5(dir.path()).unwrap();
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
    write_tiny_flan_t5(dir.path()).unwrap();
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
    write_tiny_flan_t5(dir.path()).unwrap();
    let err = T5Summarizer::load(dir.path(), &opts(DType::F16))
        .err()
        .unwrap();
    assert!(err.to_string().contains("NaN"), "{err}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = T5Summarizer::load(dir.path(), &opts(DType::F32))
        .err()
        .unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    write_tiny_flan_t5(dir.path()).unwrap();
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

// A sharded checkpoint (an index and its shards) loads and writes what the
// single file does; its pinned sha256 is that of the shards' `sha256sum`
// listing; a missing shard, or an index naming a path out of the
// directory, is refused naming it.
#[test]
fn sharded_weights_load_as_the_single_file_does() {
    use recap_engine::models::t5::{weight_files, weights_sha256};
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    write_tiny_flan_t5(dir.path()).unwrap();
    let transcript = utterances_from_text("Alice: we agreed to ship on friday\nBob: budget launch");
    let run = |m: &T5Summarizer| {
        m.summarize(&SummarizeRequest {
            transcript: &transcript,
            kinds: &[SummaryKind::Short],
            language: None,
            query: None,
            deadline: None,
            cancel: Cancel::default(),
        })
        .unwrap()[0]
            .text
            .clone()
    };
    let whole = run(&T5Summarizer::load(dir.path(), &opts(DType::F32)).unwrap());
    let shards = recap_engine::testing::shard_safetensors(dir.path()).unwrap();
    assert!(!dir.path().join("model.safetensors").exists());
    let sharded = T5Summarizer::load(dir.path(), &opts(DType::F32)).unwrap();
    assert_eq!(run(&sharded), whole);

    let files = weight_files(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    let mut listing = String::new();
    for s in &shards {
        let bytes = std::fs::read(dir.path().join(s)).unwrap();
        listing.push_str(&format!("{}  {s}\n", hex::encode(Sha256::digest(&bytes))));
    }
    assert_eq!(
        weights_sha256(&files).unwrap(),
        hex::encode(Sha256::digest(listing.as_bytes()))
    );

    std::fs::remove_file(dir.path().join(&shards[1])).unwrap();
    let e = weight_files(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&shards[1]) && e.contains("missing"), "{e}");
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replace(&shards[1], "../outside.safetensors")).unwrap();
    let e = weight_files(dir.path()).unwrap_err().to_string();
    assert!(e.contains("../outside.safetensors"), "{e}");
}

// The pinned sha256 is checked at load: the right one loads, another is
// refused naming both.
#[test]
fn a_pinned_sha256_is_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_flan_t5(dir.path()).unwrap();
    let sha = recap_engine::models::t5::dir_sha256(dir.path()).unwrap();
    let pinned = |sha256: &str| T5Options {
        sha256: Some(sha256.to_string()),
        ..opts(DType::F32)
    };
    assert!(T5Summarizer::load(dir.path(), &pinned(&sha)).is_ok());
    let wrong = "0".repeat(64);
    let e = match T5Summarizer::load(dir.path(), &pinned(&wrong)) {
        Ok(_) => panic!("loaded with a wrong sha256"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&sha) && e.contains(&wrong), "{e}");
}
