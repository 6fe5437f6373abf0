//! Token ids equal llama.cpp's (llama-cpp-python 0.3.36) on every case of
//! tests/fixtures/tokenizer-vectors.json, for each model whose weights are
//! installed (`recap models fetch`; scripts/test fetches the defaults).

use candle_core::quantized::gguf_file;
use recap_engine::tokenize::GgufTokenizer;
mod common;

use common::models_dir;

fn check(model_key: &str, file: &str) {
    let path = models_dir().join(file);
    let mut f = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-models", path.display()));
    let ct = gguf_file::Content::read(&mut f).expect("read GGUF");
    let tk = GgufTokenizer::from_gguf(&ct).expect("tokenizer from GGUF");
    let vectors: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/tokenizer-vectors.json"
    ))
    .unwrap();
    let m = &vectors["models"][model_key];
    assert_eq!(tk.bos_id, m["bos_id"].as_u64().map(|x| x as u32), "bos");
    assert_eq!(tk.eos_id, m["eos_id"].as_u64().map(|x| x as u32), "eos");
    let mut failures = Vec::new();
    let cases = m["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = case["special"].as_bool().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tk.encode(text, special).unwrap();
        if got != want {
            failures.push(format!(
                "special={special} {text:?}\n  want {want:?}\n  got  {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{model_key} (pre {}): {} of {} cases differ:\n{}",
        tk.pre,
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_ids_match_llama_cpp() {
    check(
        "smollm2-135m-instruct-q4_1",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    );
}

#[test]
fn qwen2_ids_match_llama_cpp() {
    check(
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    );
}

#[test]
fn gemma3_ids_match_llama_cpp() {
    check("gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf");
}
