//! LoRA adapters in Hugging Face PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names for llama- and
//! qwen2-family models (`base_model.model.model.layers.{i}.self_attn.q_proj.
//! lora_A.weight`, A as rank × in, B as out × rank), so that a PEFT adapter
//! loads here and recap's loads in PEFT. recap's own facts about an adapter
//! (the base's sha256) sit beside them in `recap_adapter.json`, which PEFT
//! ignores.
//!
//! llama GGUFs hold `attn_q` and `attn_k` with their rows permuted for
//! interleaved RoPE (llama.cpp's `convert_hf_to_gguf.py`, `permute`), while
//! PEFT's B matrices follow the Hugging Face rows: B of q and k is permuted
//! on load and unpermuted on save, so the same adapter drives both.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const RECAP_FILE: &str = "recap_adapter.json";

/// A projection an adapter may sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's (and Hugging Face's) module name.
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    fn block(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.peft_name() == name)
    }

    /// PEFT's tensor name of this target's A or B in layer `layer`.
    pub fn tensor_name(self, layer: usize, ab: char) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
            self.block(),
            self.peft_name()
        )
    }
}

/// `adapter_config.json`: the keys PEFT's `LoraConfig` reads that matter
/// here; others are kept as they were found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl LoraConfig {
    /// The multiplier of `B A` (PEFT: alpha / r, or alpha / √r with rsLoRA).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn new(r: usize, alpha: f64, dropout: f64, targets: &[Target]) -> LoraConfig {
        LoraConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: targets.iter().map(|t| t.peft_name().to_string()).collect(),
            layers_to_transform: None,
            base_model_name_or_path: None,
            bias: Some("none".into()),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            inference_mode: true,
            other: BTreeMap::new(),
        }
    }
}

/// What recap records about an adapter beside PEFT's files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecapAdapterInfo {
    /// sha256 of the GGUF the adapter was trained on.
    pub base_sha256: String,
    /// The base's catalog id, for people.
    #[serde(default)]
    pub base_model: Option<String>,
    /// The prompt order it was trained with (`task_first` or
    /// `transcript_first`): served with another, it sees prompts it never
    /// learned.
    #[serde(default)]
    pub prompt_order: Option<String>,
}

/// Shapes of the base that an adapter must fit, and how its q/k rows lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseLayout {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_ff: usize,
    /// llama GGUFs: q and k rows permuted for interleaved RoPE.
    pub permuted_qk: bool,
}

impl BaseLayout {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// (out, in) of a target's weight.
    pub fn shape(&self, t: Target) -> (usize, usize) {
        let kv = self.n_kv_head * self.head_dim();
        match t {
            Target::Q | Target::O => (self.n_embd, self.n_embd),
            Target::K | Target::V => (kv, self.n_embd),
            Target::Gate | Target::Up => (self.n_ff, self.n_embd),
            Target::Down => (self.n_embd, self.n_ff),
        }
    }

    /// The GGUF row of each Hugging Face row of q (or k): `gguf[i] =
    /// hf[map[i]]`. llama.cpp's converter reshapes the rows to (heads, 2,
    /// head_dim / 2) and swaps the last two axes.
    pub fn gguf_rows_from_hf(&self, t: Target) -> Option<Vec<usize>> {
        let heads = match t {
            Target::Q if self.permuted_qk => self.n_head,
            Target::K if self.permuted_qk => self.n_kv_head,
            _ => return None,
        };
        let d = self.head_dim();
        let half = d / 2;
        let mut map = Vec::with_capacity(heads * d);
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    map.push(h * d + j * half + i);
                }
            }
        }
        Some(map)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {path}: {message}")]
    Bad { path: String, message: String },
    #[error("adapter: {0}")]
    Tensor(#[from] candle_core::Error),
}

fn bad(path: &Path, message: impl std::fmt::Display) -> AdapterError {
    AdapterError::Bad {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// One adapted projection: A (rank × in) and B (out × rank), f32, B's rows
/// in the GGUF's order.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A LoRA adapter, ready to apply to a GGUF base.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    pub info: Option<RecapAdapterInfo>,
    pub pairs: BTreeMap<(usize, Target), LoraPair>,
}

fn permute_rows(b: &Tensor, map: &[usize]) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = map.iter().map(|&i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), b.device())?;
    b.index_select(&idx, 0)
}

fn inverse(map: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; map.len()];
    for (i, &m) in map.iter().enumerate() {
        inv[m] = i;
    }
    inv
}

impl Adapter {
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// Reads an adapter directory and checks it against the base: every
    /// tensor named as PEFT names it, every shape the base's.
    pub fn load(dir: &Path, base: &BaseLayout) -> Result<Adapter, AdapterError> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(&cfg_path, e))?;
        let config: LoraConfig = serde_json::from_str(&text).map_err(|e| bad(&cfg_path, e))?;
        if config.peft_type != "LORA" {
            return Err(bad(
                &cfg_path,
                format!("peft_type is {}, only LORA is served", config.peft_type),
            ));
        }
        if config.use_dora || config.fan_in_fan_out || config.r == 0 {
            return Err(bad(
                &cfg_path,
                "DoRA, fan_in_fan_out and r = 0 are not supported",
            ));
        }
        if let Some(b) = config.bias.as_deref() {
            if b != "none" {
                return Err(bad(&cfg_path, format!("bias = {b} is not supported")));
            }
        }
        let info_path = dir.join(RECAP_FILE);
        let info = match std::fs::read_to_string(&info_path) {
            Ok(t) => Some(serde_json::from_str(&t).map_err(|e| bad(&info_path, e))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(bad(&info_path, e)),
        };
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .map_err(|e| bad(&weights_path, e))?;
        let mut pairs = BTreeMap::new();
        for layer in 0..base.n_layer {
            for t in Target::ALL {
                let (an, bn) = (t.tensor_name(layer, 'A'), t.tensor_name(layer, 'B'));
                let (a, b) = match (tensors.remove(&an), tensors.remove(&bn)) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(bad(&weights_path, format!("{an} and {bn} come in pairs"))),
                };
                let (out, inp) = base.shape(t);
                let want_a = [config.r, inp];
                let want_b = [out, config.r];
                if a.dims() != want_a || b.dims() != want_b {
                    return Err(bad(
                        &weights_path,
                        format!(
                            "layer {layer} {}: the adapter's A is {:?} and B {:?}, the base needs A {want_a:?} and B {want_b:?}: an adapter for another base",
                            t.peft_name(),
                            a.dims(),
                            b.dims()
                        ),
                    ));
                }
                let a = a.to_dtype(DType::F32)?;
                let mut b = b.to_dtype(DType::F32)?;
                if let Some(map) = base.gguf_rows_from_hf(t) {
                    b = permute_rows(&b, &map)?;
                }
                pairs.insert((layer, t), LoraPair { a, b });
            }
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(
                &weights_path,
                format!("tensor {extra} fits no layer of the base ({} layers, projections q/k/v/o/gate/up/down)", base.n_layer),
            ));
        }
        if pairs.is_empty() {
            return Err(bad(&weights_path, "no LoRA tensors"));
        }
        Ok(Adapter {
            config,
            info,
            pairs,
        })
    }

    /// Refuses an adapter whose record names another base (sha256) or
    /// another prompt order than the one it is put on; `base_sha256` is
    /// asked only when the adapter records one. PEFT's own adapters carry
    /// no record: their shapes, checked by [`Adapter::load`], are all there is.
    pub fn check_base(
        &self,
        dir: &Path,
        base: &str,
        prompt_order: &str,
        base_sha256: impl FnOnce() -> Result<String, String>,
    ) -> Result<(), String> {
        let Some(info) = &self.info else {
            return Ok(());
        };
        if let Some(order) = info.prompt_order.as_deref().filter(|o| *o != prompt_order) {
            return Err(format!(
                "adapter {} was trained with prompt order {order}, but {base} serves {prompt_order}",
                dir.display()
            ));
        }
        let base_sha = base_sha256()?;
        if info.base_sha256 != base_sha {
            return Err(format!(
                "adapter {} was trained on the base with sha256 {}, but {base} has sha256 {base_sha}",
                dir.display(),
                info.base_sha256
            ));
        }
        Ok(())
    }

    /// Writes the PEFT layout into `dir` (created), each file written then
    /// renamed, so a reader never sees half an adapter.
    pub fn save(&self, dir: &Path, base: &BaseLayout) -> Result<(), AdapterError> {
        std::fs::create_dir_all(dir).map_err(|e| bad(dir, e))?;
        let mut out: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
        for (&(layer, t), p) in &self.pairs {
            let mut b = p.b.clone();
            if let Some(map) = base.gguf_rows_from_hf(t) {
                b = permute_rows(&b, &inverse(&map))?;
            }
            out.insert(t.tensor_name(layer, 'A'), p.a.contiguous()?);
            out.insert(t.tensor_name(layer, 'B'), b.contiguous()?);
        }
        let weights = dir.join(WEIGHTS_FILE);
        let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
        candle_core::safetensors::save(&out, &tmp).map_err(|e| bad(&tmp, e))?;
        std::fs::rename(&tmp, &weights).map_err(|e| bad(&weights, e))?;
        let config = dir.join(CONFIG_FILE);
        write_atomic(&config, &to_json(&self.config, &config)?)?;
        if let Some(info) = &self.info {
            let path = dir.join(RECAP_FILE);
            write_atomic(&path, &to_json(info, &path)?)?;
        }
        Ok(())
    }
}

fn to_json<T: Serialize>(v: &T, path: &Path) -> Result<String, AdapterError> {
    serde_json::to_string_pretty(v).map_err(|e| bad(path, e))
}

/// Writes `text` to a temporary file beside `path`, then renames it over.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), AdapterError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| bad(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| bad(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_adapter_is_in_the_repo_with_its_pinned_hash() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../adapters");
        let c = crate::catalog::Catalog::builtin().unwrap();
        let mut seen = 0;
        for e in &c.models {
            let Some(a) = &e.adapter else { continue };
            let file = repo.join(&a.path).join(WEIGHTS_FILE);
            let got = crate::models::llm::sha256_file(&file)
                .unwrap_or_else(|err| panic!("{}: {}: {err}", e.id, file.display()));
            assert_eq!(got, a.sha256, "{}: {}", e.id, file.display());
            seen += 1;
        }
        assert!(seen >= 2, "the catalog ships two adapters");
    }

    fn layout(permuted_qk: bool) -> BaseLayout {
        BaseLayout {
            n_layer: 2,
            n_embd: 16,
            n_head: 4,
            n_kv_head: 2,
            n_ff: 24,
            permuted_qk,
        }
    }

    // llama.cpp's permute: w.reshape(heads, 2, d/2, ...).swapaxes(1, 2).
    // For head_dim 4: HF rows [a0 a1 b0 b1] become [a0 b0 a1 b1].
    #[test]
    fn q_rows_follow_llama_cpps_permutation() {
        let l = layout(true);
        let map = l.gguf_rows_from_hf(Target::Q).unwrap();
        assert_eq!(&map[..4], &[0, 2, 1, 3]);
        assert_eq!(&map[4..8], &[4, 6, 5, 7]);
        assert_eq!(map.len(), 16);
        assert_eq!(l.gguf_rows_from_hf(Target::K).unwrap().len(), 8);
        assert!(l.gguf_rows_from_hf(Target::V).is_none());
        assert!(layout(false).gguf_rows_from_hf(Target::Q).is_none());
        let inv = inverse(&map);
        for (i, &m) in map.iter().enumerate() {
            assert_eq!(inv[m], i);
        }
    }

    fn adapter(l: &BaseLayout) -> Adapter {
        let mut pairs = BTreeMap::new();
        let mut seed = 1.0f32;
        for layer in 0..l.n_layer {
            for t in Target::ALL {
                let (out, inp) = l.shape(t);
                let mut vals = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|i| {
                            seed += 0.37;
                            (seed * (i as f32 + 1.0)).sin()
                        })
                        .collect()
                };
                let a = Tensor::from_vec(vals(3 * inp), (3, inp), &Device::Cpu).unwrap();
                let b = Tensor::from_vec(vals(out * 3), (out, 3), &Device::Cpu).unwrap();
                pairs.insert((layer, t), LoraPair { a, b });
            }
        }
        Adapter {
            config: LoraConfig::new(3, 6.0, 0.0, &Target::ALL),
            info: Some(RecapAdapterInfo {
                base_sha256: "ab".repeat(32),
                base_model: None,
                prompt_order: Some("task_first".into()),
            }),
            pairs,
        }
    }

    #[test]
    fn an_adapter_round_trips_and_is_stored_in_hf_row_order() {
        let dir = tempfile::tempdir().unwrap();
        for permuted in [true, false] {
            let l = layout(permuted);
            let a = adapter(&l);
            let path = dir.path().join(format!("a{permuted}"));
            a.save(&path, &l).unwrap();
            let back = Adapter::load(&path, &l).unwrap();
            assert_eq!(back.config, a.config);
            assert_eq!(back.info, a.info);
            assert_eq!(back.pairs.len(), a.pairs.len());
            for (k, p) in &a.pairs {
                let q = &back.pairs[k];
                let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(v(&p.a), v(&q.a));
                assert_eq!(v(&p.b), v(&q.b));
            }
            // On disk, q's B rows are in the Hugging Face order.
            let raw =
                candle_core::safetensors::load(path.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
            let stored = raw[&Target::Q.tensor_name(0, 'B')]
                .to_vec2::<f32>()
                .unwrap();
            let ours = a.pairs[&(0, Target::Q)].b.to_vec2::<f32>().unwrap();
            if permuted {
                assert_eq!(stored[2], ours[1], "HF row 2 is GGUF row 1");
                assert_ne!(stored, ours);
            } else {
                assert_eq!(stored, ours);
            }
        }
    }

    #[test]
    fn an_adapter_for_another_base_is_refused_naming_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(false);
        adapter(&l).save(dir.path(), &l).unwrap();
        let other = BaseLayout { n_ff: 32, ..l };
        let e = Adapter::load(dir.path(), &other).unwrap_err().to_string();
        assert!(e.contains("gate_proj") && e.contains("[3, 16]"), "{e}");
        assert!(e.contains("[24, 3]") && e.contains("[32, 3]"), "{e}");
        let fewer = BaseLayout { n_layer: 1, ..l };
        let e = Adapter::load(dir.path(), &fewer).unwrap_err().to_string();
        assert!(e.contains("layers.1") && e.contains("1 layers"), "{e}");
        std::fs::write(dir.path().join(CONFIG_FILE), "{").unwrap();
        let e = Adapter::load(dir.path(), &l).unwrap_err().to_string();
        assert!(e.contains(CONFIG_FILE), "{e}");
    }
}
