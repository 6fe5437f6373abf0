//! GGUF decoder models (llama, qwen2 families) as a [`Summarizer`]:
//! weights and tokenizer from one GGUF file, the file's own chat template,
//! chunked map-reduce for transcripts longer than the context budget.

use crate::pipeline::generate::{
    finished_text, generate, model_err, Decoder, GenParams, Generation,
};
use crate::pipeline::mapreduce::{self, Step};
use crate::pipeline::prompts::{self, ChatTemplate};
use crate::summarizer::{EngineError, SummarizeRequest, Summarizer, SummaryOutput};
use crate::tokenize::GgufTokenizer;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama};
use recap_job::SummaryKind;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

mod batch;

#[derive(Clone)]
enum Weights {
    /// Dense llama and qwen2: recap's own decoder (prompt GEMM, forkable).
    Dense(crate::models::decoder::DenseDecoder),
    /// Mixture-of-experts llama GGUFs: candle's.
    Llama(quantized_llama::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

impl Decoder for Weights {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Dense(m) => m.forward(ids, pos),
            Weights::Llama(m) => m.forward(ids, pos),
            Weights::Gemma3(m) => m.forward(ids, pos),
        }
    }
    fn clear_cache(&mut self) {
        match self {
            Weights::Dense(m) => m.clear_kv_cache(),
            Weights::Llama(m) => m.clear_kv_cache(),
            // Gemma3 starts its cache afresh at position 0 by itself.
            Weights::Gemma3(_) => {}
        }
    }
}

/// The prompt layout of base models, whose GGUF carries no chat template.
const PLAIN_TEMPLATE: &str =
    "{{ bos_token }}{{ messages[0].content }}\n\n{{ messages[1].content }}\n\nAnswer:\n";

/// How a GGUF model is to be loaded.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub id: String,
    /// Checked before loading when given.
    pub sha256: Option<String>,
    pub device: Device,
    /// Cap on the tokens one call may use (prompt + output); the model's
    /// own context length caps it too. Smaller means faster on CPU and more
    /// chunks for long transcripts.
    pub max_context: usize,
    /// The catalog's prompt order: transcript first (kinds share a prefill)
    /// or task first (see `ModelEntry::prompt_order`).
    pub transcript_first: bool,
    /// A LoRA adapter to serve on the base.
    pub adapter: Option<AdapterOptions>,
}

/// A LoRA adapter directory (PEFT layout) and how to serve it.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    pub dir: std::path::PathBuf,
    /// sha256 of `adapter_model.safetensors`, checked before loading.
    pub sha256: Option<String>,
    /// Fold the adapter into the weights at load (f32) instead of running
    /// it beside the quantized ones.
    pub merge: bool,
}

impl GgufOptions {
    /// Options for a catalog entry.
    pub fn for_entry(
        entry: &crate::catalog::ModelEntry,
        device: Device,
        max_context: usize,
    ) -> GgufOptions {
        GgufOptions {
            id: entry.id.clone(),
            sha256: entry.sha256.clone(),
            device,
            max_context,
            transcript_first: entry.prompt_order.as_deref() != Some("task_first"),
            adapter: None,
        }
    }
}

pub struct GgufModel {
    id: String,
    weights: Mutex<Weights>,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    device: Device,
    context: usize,
    transcript_first: bool,
}

fn poisoned() -> EngineError {
    EngineError::Model("model lock poisoned by an earlier panic".into())
}

fn bad_model(path: &Path, msg: impl std::fmt::Display) -> EngineError {
    EngineError::BadModel(format!("{}: {msg}", path.display()))
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks an adapter against the base (its recorded base sha256, its
/// file's sha256, every shape) and puts it on the decoder.
fn apply_adapter(
    dense: &mut crate::models::decoder::DenseDecoder,
    base_path: &Path,
    opts: &GgufOptions,
    a: &AdapterOptions,
) -> Result<(), EngineError> {
    use crate::models::adapter::{Adapter, WEIGHTS_FILE};
    let weights_file = a.dir.join(WEIGHTS_FILE);
    if let Some(want) = &a.sha256 {
        let got = sha256_file(&weights_file).map_err(|e| bad_model(&weights_file, e))?;
        if &got != want {
            return Err(bad_model(
                &weights_file,
                format!("sha256 is {got}, expected {want}: not the adapter the catalog names"),
            ));
        }
    }
    let layout = dense.layout().map_err(|e| bad_model(base_path, e))?;
    let adapter =
        Adapter::load(&a.dir, &layout).map_err(|e| EngineError::BadModel(e.to_string()))?;
    let order = if opts.transcript_first {
        "transcript_first"
    } else {
        "task_first"
    };
    adapter
        .check_base(
            &a.dir,
            &base_path.display().to_string(),
            order,
            || match &opts.sha256 {
                Some(s) => Ok(s.clone()),
                None => sha256_file(base_path).map_err(|e| format!("{}: {e}", base_path.display())),
            },
        )
        .map_err(EngineError::BadModel)?;
    dense
        .apply_adapter(&adapter, a.merge)
        .map_err(|e| bad_model(&a.dir, e))
}

impl GgufModel {
    pub fn load(path: &Path, opts: &GgufOptions) -> Result<GgufModel, EngineError> {
        if !path.exists() {
            return Err(bad_model(path, "file not found; run `recap models fetch`"));
        }
        if let Some(want) = &opts.sha256 {
            let got = sha256_file(path).map_err(|e| bad_model(path, e))?;
            if &got != want {
                return Err(bad_model(
                    path,
                    format!("sha256 is {got}, expected {want}: the file is damaged or not this model; delete it and run `recap models fetch`"),
                ));
            }
        }
        let mut file = std::fs::File::open(path).map_err(|e| bad_model(path, e))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| bad_model(path, format!("not a readable GGUF file: {e}")))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| bad_model(path, "no general.architecture in the GGUF metadata"))?;
        let tokenizer = GgufTokenizer::from_gguf(&ct).map_err(|e| bad_model(path, e))?;
        let ctx_key = format!("{arch}.context_length");
        let trained_ctx = ct
            .metadata
            .get(&ctx_key)
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2048) as usize;
        // Base models (no chat template) get a plain instruction layout.
        let template_src = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| PLAIN_TEMPLATE.to_string());
        let tok_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            &template_src,
            &tok_text(tokenizer.bos_id),
            &tok_text(tokenizer.eos_id),
        )?;
        let experts = ct
            .metadata
            .get("llama.expert_count")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(0);
        // The registry says which families the dense decoder lays out.
        let family = crate::catalog::Family::of_gguf(&arch).map(|f| (f.name, f.dense.is_some()));
        let weights = match family {
            Some((_, true)) if experts <= 1 => Weights::Dense(
                crate::models::decoder::DenseDecoder::from_gguf(&ct, &mut file, &opts.device)
                    .map_err(|e| bad_model(path, format!("loading {arch} weights: {e}")))?,
            ),
            Some(("llama", _)) => Weights::Llama(
                quantized_llama::ModelWeights::from_gguf(ct, &mut file, &opts.device)
                    .map_err(|e| bad_model(path, format!("loading llama weights: {e}")))?,
            ),
            Some(("gemma3", _)) => Weights::Gemma3(
                quantized_gemma3::ModelWeights::from_gguf(ct, &mut file, &opts.device)
                    .map_err(|e| bad_model(path, format!("loading gemma3 weights: {e}")))?,
            ),
            _ => {
                return Err(bad_model(
                    path,
                    format!("architecture `{arch}` is not supported (llama, qwen2, gemma3 are)"),
                ))
            }
        };
        let weights = match &opts.adapter {
            None => weights,
            Some(a) => {
                let Weights::Dense(mut dense) = weights else {
                    return Err(bad_model(
                        path,
                        format!("LoRA adapters are served on llama and qwen2 bases, not {arch}"),
                    ));
                };
                apply_adapter(&mut dense, path, opts, a)?;
                Weights::Dense(dense)
            }
        };
        Ok(GgufModel {
            id: opts.id.clone(),
            weights: Mutex::new(weights),
            tokenizer,
            template,
            device: opts.device.clone(),
            context: opts.max_context.min(trained_ctx),
            transcript_first: opts.transcript_first,
        })
    }

    fn is_dense(&self) -> bool {
        self.weights
            .lock()
            .map(|w| matches!(&*w, Weights::Dense(_)))
            .unwrap_or(false)
    }

    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// Token ids of a chat prompt with this system and user message. The
    /// template's own markup is tokenized with special tokens parsed; the
    /// user message (which holds the transcript) as plain text, so that a
    /// transcript that types `<|im_start|>` cannot inject a control token.
    pub fn prompt_ids(&self, user: &str) -> Result<Vec<u32>, EngineError> {
        let (mut ids, tail) = self.prompt_ids_parts(user, "")?;
        ids.extend(tail);
        Ok(ids)
    }

    /// Token ids of a chat prompt whose user message is `prefix` then
    /// `suffix`, tokenized apart: every prompt with the same `prefix` starts
    /// with the same ids (the first part of the return), whatever follows.
    pub fn prompt_ids_parts(
        &self,
        prefix: &str,
        suffix: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), EngineError> {
        let (before, after) = self.around_user()?;
        let mut head = self.tokenizer.encode(&before, true)?;
        head.extend(self.tokenizer.encode(prefix, false)?);
        Ok((head, self.tail_ids(suffix, &after)?))
    }

    /// The prompt as the two passes that prefill it: `head` (the template's
    /// start and `prefix`) then `tail` (never empty: generation continues
    /// from its last token).
    fn head_and_tail(
        &self,
        prefix: &str,
        suffix: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), EngineError> {
        let (mut head, mut tail) = self.prompt_ids_parts(prefix, suffix)?;
        if tail.is_empty() {
            if let Some(last) = head.pop() {
                tail.push(last);
            }
        }
        Ok((head, tail))
    }

    /// The chat template's text before and after the user message.
    fn around_user(&self) -> Result<(String, String), EngineError> {
        // A private-use character no template or tokenizer gives meaning to.
        const SLOT: &str = "\u{E000}recap-user\u{E000}";
        let prompt = self.template.render(prompts::system(), SLOT)?;
        let Some((before, after)) = prompt.split_once(SLOT) else {
            return Err(EngineError::Template(
                "the chat template dropped the user message".into(),
            ));
        };
        Ok((before.to_string(), after.to_string()))
    }

    /// Ids of the end of a user message and what the template puts after it.
    fn tail_ids(&self, suffix: &str, after: &str) -> Result<Vec<u32>, EngineError> {
        let mut tail = self.tokenizer.encode(suffix, false)?;
        tail.extend(self.tokenizer.encode(after, true)?);
        Ok(tail)
    }

    /// Prefills `head` from position 0 into the (cleared) KV cache, after the
    /// checks a model call starts with; returns the milliseconds it
    /// took. The one first pass of both prompt paths (see `complete_parts`).
    fn prefill_head(
        &self,
        weights: &mut Weights,
        head: &[u32],
        req: &SummarizeRequest<'_>,
    ) -> Result<f64, EngineError> {
        crate::pipeline::generate::may_start(&req.cancel, req.deadline)?;
        weights.clear_cache();
        let started = std::time::Instant::now();
        if !head.is_empty() {
            let input = Tensor::new(head, &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(|e| EngineError::Model(e.to_string()))?;
            weights
                .forward(&input, 0)
                .map_err(|e| EngineError::Model(e.to_string()))?;
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }

    /// One chat completion.
    pub fn complete(
        &self,
        user: &str,
        params: &GenParams,
        req: &SummarizeRequest<'_>,
    ) -> Result<(String, Generation), EngineError> {
        self.complete_parts(user, "", params, req)
    }

    /// One chat completion of a user message given in two parts.
    pub fn complete_parts(
        &self,
        prefix: &str,
        suffix: &str,
        params: &GenParams,
        req: &SummarizeRequest<'_>,
    ) -> Result<(String, Generation), EngineError> {
        let (mut head, tail) = self.head_and_tail(prefix, suffix)?;
        let mut weights = self.lock_weights()?;
        let decode = |t: &[u32]| self.tokenizer.decode(t);
        if !matches!(&*weights, Weights::Dense(_)) {
            // Models without forks take the prompt in one pass.
            head.extend(tail);
            let g = generate(
                &mut *weights,
                &self.device,
                &head,
                params,
                &self.tokenizer.stop_ids,
                &decode,
                &req.cancel,
                req.deadline,
            )?;
            let text = finished_text(&self.tokenizer.decode(&g.tokens)?, &g, params);
            return Ok((text, g));
        }
        // The prompt is prefilled in the same two passes as when kinds share
        // the head (summarize_shared_prefix), so that both give the same
        // numbers to the last bit, and so the same text.
        let head_ms = self.prefill_head(&mut weights, &head, req)?;
        let mut g = crate::pipeline::generate::generate_at(
            &mut *weights,
            &self.device,
            &tail,
            head.len(),
            params,
            &self.tokenizer.stop_ids,
            &decode,
            &req.cancel,
            req.deadline,
        )?;
        g.prefill_ms += head_ms;
        g.prompt_tokens += head.len();
        let text = finished_text(&self.tokenizer.decode(&g.tokens)?, &g, params);
        Ok((text, g))
    }

    /// The weights, for one call at a time.
    fn lock_weights(&self) -> Result<std::sync::MutexGuard<'_, Weights>, EngineError> {
        self.weights.lock().map_err(|_| poisoned())
    }

    /// The next-token logits after the prompt ids, on the host: the
    /// benchmark compares them across devices (GPU against CPU).
    pub fn prompt_logits(&self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut weights = self.lock_weights()?;
        weights.clear_cache();
        let input = Tensor::new(ids, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err)?;
        // Every decoder here returns the last position's logits, (1, vocab).
        let logits = weights.forward(&input, 0).and_then(|l| {
            l.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()
        });
        weights.clear_cache();
        logits.map_err(model_err)
    }

    /// Generates from prompt ids as they are (no template, no cleaning):
    /// the inference benchmark feeds recap and llama.cpp the same ids.
    /// Without `stop_at_eos` it runs to `max_new_tokens` whatever it says.
    pub fn generate_ids(
        &self,
        ids: &[u32],
        params: &GenParams,
        stop_at_eos: bool,
    ) -> Result<Generation, EngineError> {
        let mut weights = self.lock_weights()?;
        let decode = |t: &[u32]| self.tokenizer.decode(t);
        let stop: &[u32] = if stop_at_eos {
            &self.tokenizer.stop_ids
        } else {
            &[]
        };
        generate(
            &mut *weights,
            &self.device,
            ids,
            params,
            stop,
            &decode,
            &crate::summarizer::Cancel::default(),
            None,
        )
    }

    fn count(&self, text: &str) -> usize {
        self.tokenizer
            .encode(text, false)
            .map(|v| v.len())
            .unwrap_or(text.len() / 3 + 1)
    }

    /// Tokens of transcript a single call can hold for `kind`.
    fn transcript_budget(&self, kind: SummaryKind) -> usize {
        let overhead = self.count(prompts::system()) + self.count(prompts::instruction(kind)) + 64;
        self.context
            .saturating_sub(overhead + kind.max_output_tokens())
            .max(64)
    }

    fn summarize_one(
        &self,
        req: &SummarizeRequest<'_>,
        kind: SummaryKind,
    ) -> Result<SummaryOutput, EngineError> {
        let params = GenParams {
            max_new_tokens: kind.max_output_tokens(),
            ..GenParams::default()
        };
        let suffix = language_suffix(req.language);
        let count = |s: &str| self.count(s);
        let task = prompts::task(kind, req.query);
        mapreduce::summarize_kind(
            req.transcript,
            kind,
            self.transcript_budget(kind),
            &count,
            &mut |step| {
                let (prefix, rest) = self.user_parts(step, &task, &suffix)?;
                self.complete_parts(&prefix, &rest, &params, req)
                    .map(|(text, g)| (text, (&g).into()))
            },
        )
    }

    /// The prompt ids a worker prefills for `kind` (or `query`) over this
    /// transcript when it fits one call, exactly as `summarize` builds them
    /// (template, prompt order, language line); None when the transcript
    /// needs map-reduce. Fine-tuning renders its examples with this.
    pub fn single_call_prompt(
        &self,
        transcript: &[recap_job::Utterance],
        kind: SummaryKind,
        query: Option<&str>,
        language: Option<&str>,
    ) -> Result<Option<Vec<u32>>, EngineError> {
        let count = |s: &str| self.count(s);
        let Some(text) =
            mapreduce::single_call_text(transcript, self.transcript_budget(kind), &count)
        else {
            return Ok(None);
        };
        let task = prompts::task(kind, query);
        let (prefix, rest) =
            self.user_parts(Step::Map(&text), &task, &language_suffix(language))?;
        let (mut head, tail) = self.head_and_tail(&prefix, &rest)?;
        head.extend(tail);
        Ok(Some(head))
    }

    /// Tokens of a summary as the model is to write it: the text, then the
    /// end of its turn.
    pub fn target_ids(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let mut ids = self.tokenizer.encode(text.trim(), false)?;
        // The token that closes a user turn in this template closes the
        // model's too (ChatML's `<|im_end|>`); a plain layout ends on EOS.
        let (_, after) = self.around_user()?;
        let closing = self.tokenizer.encode(&after, true)?.first().copied();
        let end = closing
            .filter(|t| self.tokenizer.stop_ids.contains(t))
            .or(self.tokenizer.eos_id)
            .ok_or_else(|| EngineError::Model("the tokenizer has no end-of-turn token".into()))?;
        ids.push(end);
        Ok(ids)
    }

    /// The context this model's calls are cut to.
    pub fn context(&self) -> usize {
        self.context
    }

    /// A call's user message in the two parts `complete_parts` takes, in
    /// this model's prompt order.
    fn user_parts(
        &self,
        step: Step<'_>,
        task: &str,
        suffix: &str,
    ) -> Result<(String, String), EngineError> {
        let (prefix, rest) = match step {
            Step::Map(t) if self.transcript_first => prompts::user_turn_parts(t, task)?,
            Step::Map(t) => (prompts::user_turn(t, task)?, String::new()),
            Step::Reduce(p) => (prompts::reduce_turn(p, task)?, String::new()),
        };
        Ok((prefix, format!("{rest}{suffix}")))
    }
}

impl GgufModel {
    /// Several kinds over a transcript that fits one call: the transcript
    /// (the prompt's shared prefix) is prefilled once and each kind's
    /// instruction continues from a fork of that KV cache, instead of the
    /// whole prompt being prefilled once per kind. The prompts, and so the
    /// outputs, are the ones `summarize_one` would make. None where it does
    /// not apply (one kind, a query, chunking needed, a model without forks).
    fn summarize_shared_prefix(
        &self,
        req: &SummarizeRequest<'_>,
    ) -> Result<Option<Vec<SummaryOutput>>, EngineError> {
        let Some((head, prompts_of)) = self.shared_plan(req)? else {
            return Ok(None);
        };
        let mut weights = self.lock_weights()?;
        if !matches!(&*weights, Weights::Dense(_)) {
            return Ok(None);
        }
        let mut prefix_ms = self.prefill_head(&mut weights, &head, req)?;

        let snapshot = weights.clone();
        let decode = |t: &[u32]| self.tokenizer.decode(t);
        let mut outputs = Vec::with_capacity(prompts_of.len());
        for (kind, tail) in prompts_of {
            let kind_started = std::time::Instant::now();
            let params = GenParams {
                max_new_tokens: kind.max_output_tokens(),
                ..GenParams::default()
            };
            let mut fork = snapshot.clone();
            let g = crate::pipeline::generate::generate_at(
                &mut fork,
                &self.device,
                &tail,
                head.len(),
                &params,
                &self.tokenizer.stop_ids,
                &decode,
                &req.cancel,
                req.deadline,
            )?;
            let text = finished_text(&self.tokenizer.decode(&g.tokens)?, &g, &params);
            // The shared prefill is booked to the first kind.
            let prefill_ms = g.prefill_ms + std::mem::take(&mut prefix_ms);
            outputs.push(SummaryOutput {
                kind,
                text,
                input_tokens: (head.len() + tail.len()) as u32,
                output_tokens: g.tokens.len() as u32,
                prefill_ms,
                decode_ms: g.decode_ms,
                total_ms: kind_started.elapsed().as_secs_f64() * 1e3 + (prefill_ms - g.prefill_ms),
                chunks: 1,
                confidence: g.confidence,
            });
        }
        Ok(Some(outputs))
    }

    /// The shared-prefix prompts of a request: the head (template start and
    /// transcript) and each kind's tail. None where sharing does not apply
    /// (one kind, a query, chunking needed, task-first prompts).
    #[allow(clippy::type_complexity)]
    fn shared_plan(
        &self,
        req: &SummarizeRequest<'_>,
    ) -> Result<Option<(Vec<u32>, Vec<(SummaryKind, Vec<u32>)>)>, EngineError> {
        if req.kinds.len() < 2 || req.query.is_some() || !self.transcript_first {
            return Ok(None);
        }
        let transcript = mapreduce::lines(req.transcript);
        let cost = self.count(&transcript) + req.transcript.len();
        if req.kinds.iter().any(|&k| cost > self.transcript_budget(k)) {
            return Ok(None);
        }
        let suffix = language_suffix(req.language);
        // The transcript part is the same for every kind: tokenized once.
        let mut prefix = None;
        let mut rests = Vec::with_capacity(req.kinds.len());
        for &kind in req.kinds {
            let (p, rest) = prompts::user_turn_parts(&transcript, &prompts::task(kind, None))?;
            if prefix.get_or_insert_with(|| p.clone()) != &p {
                return Ok(None);
            }
            rests.push((kind, format!("{rest}{suffix}")));
        }
        let (head, _) = self.prompt_ids_parts(prefix.as_deref().unwrap_or_default(), "")?;
        let (_, after) = self.around_user()?;
        let mut prompts_of = Vec::with_capacity(rests.len());
        for (kind, rest) in rests {
            prompts_of.push((kind, self.tail_ids(&rest, &after)?));
        }
        Ok(Some((head, prompts_of)))
    }
}

/// The line that asks for the summary in the job's language (none for English).
pub fn language_suffix(language: Option<&str>) -> String {
    match language.map(|l| l.split('-').next().unwrap_or(l).to_lowercase()) {
        None => String::new(),
        Some(l) if l == "en" => String::new(),
        Some(l) => {
            let name = match l.as_str() {
                "fr" => "French",
                "de" => "German",
                "es" => "Spanish",
                "it" => "Italian",
                "pt" => "Portuguese",
                "nl" => "Dutch",
                _ => return format!("\nAnswer in the language whose code is {l}."),
            };
            format!("\nAnswer in {name}.")
        }
    }
}

impl Summarizer for GgufModel {
    fn model_id(&self) -> &str {
        &self.id
    }

    fn engine(&self) -> &'static str {
        "gguf"
    }

    fn count_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.tokenizer.encode(text, false)?.len())
    }

    fn summarize(&self, req: &SummarizeRequest<'_>) -> Result<Vec<SummaryOutput>, EngineError> {
        // Several kinds decode side by side, as a batch of one job's kinds
        // (the same texts, see `llm::batch`).
        if req.kinds.len() > 1 && self.is_dense() {
            return self
                .summarize_together(std::slice::from_ref(req))
                .pop()
                .unwrap_or_else(|| Err(EngineError::Model("no result".into())));
        }
        if let Some(outputs) = self.summarize_shared_prefix(req)? {
            return Ok(outputs);
        }
        req.kinds
            .iter()
            .map(|&k| self.summarize_one(req, k))
            .collect()
    }

    /// Decodes the jobs' sequences together (see `llm::batch`); the texts
    /// are the ones `summarize` gives each job alone.
    fn summarize_batch(
        &self,
        reqs: &[SummarizeRequest<'_>],
    ) -> Vec<Result<Vec<SummaryOutput>, EngineError>> {
        if reqs.len() < 2 {
            return reqs.iter().map(|r| self.summarize(r)).collect();
        }
        self.summarize_together(reqs)
    }
}
