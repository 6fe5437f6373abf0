//! Tiny GGUF decoders for tests: a real model's tokenizer and chat template
//! (copied from its GGUF) on a few random f32 layers, so that the whole
//! path (prompt rendering, training, serving) runs in milliseconds.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Where `recap models fetch` put the weights: `RECAP_MODELS_DIR`, or
/// `~/.cache/recap/models`.
pub fn models_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(d) = std::env::var_os("RECAP_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("recap/models")
}

/// The tiny model's shapes.
pub const N_EMBD: usize = 32;
pub const N_HEAD: usize = 4;
pub const N_KV_HEAD: usize = 2;
pub const N_FF: usize = 48;
pub const N_LAYER: usize = 2;

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 20001) as f32 / 10000.0 - 1.0) * scale
        })
        .collect()
}

/// Writes a tiny `arch` (llama or qwen2) GGUF to `out` with the tokenizer
/// of the GGUF at `tokenizer_from` and random weights from `seed`.
pub fn write_tiny_gguf(
    tokenizer_from: &Path,
    out: &Path,
    arch: &str,
    seed: u64,
) -> candle_core::Result<()> {
    let mut f = std::fs::File::open(tokenizer_from)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let vocab = match ct.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => candle_core::bail!("{} has no tokenizer", tokenizer_from.display()),
    };
    let mut md: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.push(("general.architecture".into(), Value::String(arch.into())));
    let u = |v: usize| Value::U32(v as u32);
    for (k, v) in [
        ("context_length", u(2048)),
        ("embedding_length", u(N_EMBD)),
        ("block_count", u(N_LAYER)),
        ("feed_forward_length", u(N_FF)),
        ("attention.head_count", u(N_HEAD)),
        ("attention.head_count_kv", u(N_KV_HEAD)),
        ("rope.dimension_count", u(N_EMBD / N_HEAD)),
        ("attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("rope.freq_base", Value::F32(10000.0)),
    ] {
        md.push((format!("{arch}.{k}"), v));
    }
    let kv = N_KV_HEAD * (N_EMBD / N_HEAD);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut k = seed;
    let mut add = |name: String, dims: &[usize], scale: f32| -> candle_core::Result<()> {
        k += 1;
        let n: usize = dims.iter().product();
        let t = Tensor::from_vec(random(n, k, scale), dims, &Device::Cpu)?;
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    };
    add("token_embd.weight".into(), &[vocab, N_EMBD], 1.0)?;
    let ones = |name: &str, tensors: &mut Vec<(String, QTensor)>| -> candle_core::Result<()> {
        let t = Tensor::ones(N_EMBD, candle_core::DType::F32, &Device::Cpu)?;
        tensors.push((name.to_string(), QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    };
    let w = 0.3f32;
    for i in 0..N_LAYER {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_q.weight"), &[N_EMBD, N_EMBD], w)?;
        add(format!("{p}.attn_k.weight"), &[kv, N_EMBD], w)?;
        add(format!("{p}.attn_v.weight"), &[kv, N_EMBD], w)?;
        add(format!("{p}.attn_output.weight"), &[N_EMBD, N_EMBD], w)?;
        add(format!("{p}.ffn_gate.weight"), &[N_FF, N_EMBD], w)?;
        add(format!("{p}.ffn_up.weight"), &[N_FF, N_EMBD], w)?;
        add(format!("{p}.ffn_down.weight"), &[N_EMBD, N_FF], w)?;
        if arch == "qwen2" {
            add(format!("{p}.attn_q.bias"), &[N_EMBD], 0.1)?;
            add(format!("{p}.attn_k.bias"), &[kv], 0.1)?;
            add(format!("{p}.attn_v.bias"), &[kv], 0.1)?;
        }
    }
    for i in 0..N_LAYER {
        ones(&format!("blk.{i}.attn_norm.weight"), &mut tensors)?;
        ones(&format!("blk.{i}.ffn_norm.weight"), &mut tensors)?;
    }
    ones("output_norm.weight", &mut tensors)?;
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut w = std::fs::File::create(out)?;
    gguf_file::write(&mut w, &md_refs, &t_refs)
}
