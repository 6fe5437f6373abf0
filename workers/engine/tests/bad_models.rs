//! Bad model files give clear errors, never panics: truncated, wrong
//! sha256, an unknown architecture, a missing tokenizer.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use recap_engine::models::llm::{GgufModel, GgufOptions};
use recap_engine::EngineError;
use std::path::{Path, PathBuf};

fn opts(sha: Option<&str>) -> GgufOptions {
    GgufOptions {
        id: "test".into(),
        sha256: sha.map(str::to_string),
        device: Device::Cpu,
        max_context: 1024,
        transcript_first: true,
        adapter: None,
    }
}

fn load_err(path: &Path, sha: Option<&str>) -> String {
    match GgufModel::load(path, &opts(sha)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            assert!(matches!(e, EngineError::BadModel(_)), "{e:?}");
            e.to_string()
        }
    }
}

fn write_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &t)]).unwrap();
}

fn smollm2() -> PathBuf {
    common::models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn missing_file() {
    let e = load_err(Path::new("/nonexistent/model.gguf"), None);
    assert!(e.contains("recap models fetch"), "{e}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.gguf");
    std::fs::write(&p, b"definitely not gguf").unwrap();
    assert!(load_err(&p, None).contains("not a readable GGUF"));
}

#[test]
fn truncated_real_weights() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(smollm2()).expect("SmolLM2 weights; run scripts/fetch-models");
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let e = load_err(&p, None);
    assert!(e.contains("truncated.gguf"), "{e}");
}

#[test]
fn wrong_sha256() {
    let e = load_err(&smollm2(), Some(&"0".repeat(64)));
    assert!(e.contains("sha256") && e.contains("expected"), "{e}");
}

#[test]
fn unknown_architecture_and_missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let no_tok = dir.path().join("no-tokenizer.gguf");
    write_gguf(
        &no_tok,
        &[("general.architecture", Value::String("llama".into()))],
    );
    let e = load_err(&no_tok, None);
    assert!(e.contains("tokenizer"), "{e}");

    let unknown = dir.path().join("mamba.gguf");
    write_gguf(
        &unknown,
        &[
            ("general.architecture", Value::String("mamba".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![
                    Value::String("a".into()),
                    Value::String("b".into()),
                    Value::String("ab".into()),
                ]),
            ),
            (
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("a b".into())]),
            ),
            (
                "tokenizer.chat_template",
                Value::String("{{ messages[0].content }}".into()),
            ),
        ],
    );
    let e = load_err(&unknown, None);
    assert!(e.contains("architecture `mamba`"), "{e}");
}
