//! Autoregressive generation over any decoder that maps token ids to
//! next-token logits with a KV cache: prefill the prompt in one batched
//! forward pass, then decode token by token with sampling, a repetition
//! penalty, stop tokens and strings, a token cap, a deadline and
//! cancellation. Per-call counts and timings come back with the text.

use crate::summarizer::{Cancel, Confidence, EngineError};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::time::Instant;

/// A model the loop can drive: `forward(ids, pos)` returns the logits of
/// the last position, with the KV cache holding everything before `pos`.
pub trait Decoder {
    fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor>;
    fn clear_cache(&mut self);
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// None: greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// 1.0 disables it; small models loop without one.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub stop_strings: Vec<String>,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_new_tokens: 256,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: 299792458,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            stop_strings: Vec::new(),
        }
    }
}

impl GenParams {
    fn sampling(&self) -> Sampling {
        match (self.temperature, self.top_k, self.top_p) {
            (None, _, _) => Sampling::ArgMax,
            (Some(t), _, _) if t <= 0.0 => Sampling::ArgMax,
            (Some(temperature), None, None) => Sampling::All { temperature },
            (Some(temperature), Some(k), None) => Sampling::TopK { k, temperature },
            (Some(temperature), None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(temperature), Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Why it stopped: `eos`, `stop_string`, `max_tokens`.
    pub finish: &'static str,
    /// Over every sampled token, the stop token included.
    pub confidence: Confidence,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / (self.prefill_ms / 1e3).max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len() as f64 / (self.decode_ms / 1e3).max(1e-9)
    }
}

pub(crate) fn model_err(e: candle_core::Error) -> EngineError {
    EngineError::Model(e.to_string())
}

/// Runs one generation. `decode` turns ids into text for stop strings.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &mut dyn Decoder,
    device: &Device,
    prompt: &[u32],
    params: &GenParams,
    stop_ids: &[u32],
    decode: &dyn Fn(&[u32]) -> Result<String, EngineError>,
    cancel: &Cancel,
    deadline: Option<Instant>,
) -> Result<Generation, EngineError> {
    model.clear_cache();
    generate_at(
        model, device, prompt, 0, params, stop_ids, decode, cancel, deadline,
    )
}

/// Runs one generation whose prompt continues `start` tokens already in the
/// model's KV cache (a prefilled prefix); `generate` is `start` = 0.
#[allow(clippy::too_many_arguments)]
pub fn generate_at(
    model: &mut dyn Decoder,
    device: &Device,
    prompt: &[u32],
    start: usize,
    params: &GenParams,
    stop_ids: &[u32],
    decode: &dyn Fn(&[u32]) -> Result<String, EngineError>,
    cancel: &Cancel,
    deadline: Option<Instant>,
) -> Result<Generation, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::Model("empty prompt".into()));
    }
    may_start(cancel, deadline)?;
    let prefill_start = Instant::now();
    let input = Tensor::new(prompt, device)
        .and_then(|t| t.unsqueeze(0))
        .map_err(model_err)?;
    let mut logits = model.forward(&input, start).map_err(model_err)?;
    let prefill_ms = prefill_start.elapsed().as_secs_f64() * 1e3;

    let mut stream = Stream::new(params, stop_ids, start + prompt.len());
    while let Some(next) = stream.step(
        &logits.squeeze(0).map_err(model_err)?,
        decode,
        cancel,
        deadline,
    )? {
        let input = Tensor::new(&[next], device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err)?;
        logits = model
            .forward(&input, stream.position())
            .map_err(model_err)?;
    }
    Ok(stream.finish(prompt.len(), prefill_ms))
}

/// The checks a model call starts with: one that starts past its deadline,
/// or cancelled, does not spend a prefill.
pub fn may_start(cancel: &Cancel, deadline: Option<Instant>) -> Result<(), EngineError> {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(EngineError::DeadlineExceeded(0));
    }
    if cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    Ok(())
}

/// One sequence's decoding: it turns each step's logits into the next
/// token, applies the stops and the cap, and says what to feed the model
/// next. `generate_at` steps one; a batch steps several side by side.
pub struct Stream<'p> {
    params: &'p GenParams,
    stop_ids: &'p [u32],
    sampler: LogitsProcessor,
    tokens: Vec<u32>,
    /// Where the next fed token goes in the KV cache.
    next_pos: usize,
    finish: Option<&'static str>,
    started: Instant,
    confidence: Confidence,
}

impl<'p> Stream<'p> {
    /// A stream whose prompt ends just before `next_pos`.
    pub fn new(params: &'p GenParams, stop_ids: &'p [u32], next_pos: usize) -> Stream<'p> {
        Stream {
            params,
            stop_ids,
            sampler: LogitsProcessor::from_sampling(params.seed, params.sampling()),
            tokens: Vec::with_capacity(params.max_new_tokens),
            next_pos,
            finish: (params.max_new_tokens == 0).then_some("max_tokens"),
            started: Instant::now(),
            confidence: Confidence::default(),
        }
    }

    /// The KV position of the token `step` last returned.
    pub fn position(&self) -> usize {
        self.next_pos + self.tokens.len().saturating_sub(1)
    }

    /// Takes the logits of the last position (one row): the token to feed
    /// next, or None once the sequence is finished.
    pub fn step(
        &mut self,
        logits: &Tensor,
        decode: &dyn Fn(&[u32]) -> Result<String, EngineError>,
        cancel: &Cancel,
        deadline: Option<Instant>,
    ) -> Result<Option<u32>, EngineError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EngineError::DeadlineExceeded(self.tokens.len() as u32));
        }
        let params = self.params;
        let l = logits
            .to_dtype(candle_core::DType::F32)
            .map_err(model_err)?;
        let raw = l.clone();
        let l = if params.repeat_penalty != 1.0 && !self.tokens.is_empty() {
            let from = self.tokens.len().saturating_sub(params.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(
                &l,
                params.repeat_penalty,
                &self.tokens[from..],
            )
            .map_err(model_err)?
        } else {
            l
        };
        let next = self.sampler.sample(&l).map_err(model_err)?;
        self.confidence
            .observe(&raw.to_vec1::<f32>().map_err(model_err)?, next);
        if self.stop_ids.contains(&next) {
            self.finish = Some("eos");
            return Ok(None);
        }
        self.tokens.push(next);
        if !params.stop_strings.is_empty() {
            let text = decode(&self.tokens)?;
            if params
                .stop_strings
                .iter()
                .any(|s| text.contains(s.as_str()))
            {
                self.finish = Some("stop_string");
                return Ok(None);
            }
        }
        if self.tokens.len() >= params.max_new_tokens {
            self.finish = Some("max_tokens");
            return Ok(None);
        }
        Ok(Some(next))
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The generation, once finished; decode time runs from `new`.
    pub fn finish(self, prompt_tokens: usize, prefill_ms: f64) -> Generation {
        Generation {
            tokens: self.tokens,
            prompt_tokens,
            prefill_ms,
            decode_ms: self.started.elapsed().as_secs_f64() * 1e3,
            finish: self.finish.unwrap_or("max_tokens"),
            confidence: self.confidence,
        }
    }
}

/// Clean text from raw model output: chat artefacts and stop strings cut,
/// an echoed "Summary:" label dropped, and repeated lines or sentences
/// (the loops small models fall into) removed.
pub fn clean_output(raw: &str, stop_strings: &[String]) -> String {
    let mut text = raw.to_string();
    for marker in [
        "<|im_end|>",
        "<|im_start|>",
        "<|endoftext|>",
        "<end_of_turn>",
        "</s>",
        "<|eot_id|>",
    ] {
        if let Some(i) = text.find(marker) {
            text.truncate(i);
        }
    }
    for s in stop_strings {
        if let Some(i) = text.find(s.as_str()) {
            text.truncate(i);
        }
    }
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        // Small models sometimes echo the prompt's own scaffolding.
        if crate::pipeline::prompts::SCAFFOLDING
            .iter()
            .any(|s| line.trim() == *s)
            || line.trim_start().starts_with("Task:")
        {
            continue;
        }
        let norm = line.trim().to_lowercase();
        if !norm.is_empty() && lines.iter().any(|l| l.trim().to_lowercase() == norm) {
            continue;
        }
        lines.push(line.to_string());
    }
    let mut text = lines.join("\n").trim().to_string();
    for label in [
        "Summary:",
        "summary:",
        "Answer:",
        "assistant\n",
        "Assistant:",
    ] {
        if let Some(rest) = text.strip_prefix(label) {
            text = rest.trim_start().to_string();
        }
    }
    dedup_sentences(&text)
}

/// The text of a finished generation: cleaned, and cut back to the last
/// whole sentence when the token cap stopped it.
pub fn finished_text(raw: &str, g: &Generation, params: &GenParams) -> String {
    let text = clean_output(raw, &params.stop_strings);
    if g.finish == "max_tokens" {
        trim_unfinished(&text)
    } else {
        text
    }
}

/// Cuts the unfinished tail of an output that hit its token cap, back to
/// the last sentence or line end, unless that would leave nothing.
pub fn trim_unfinished(text: &str) -> String {
    let cut = text
        .rfind(['.', '!', '?', '\n'])
        .map(|i| i + 1)
        .unwrap_or(0);
    let kept = text[..cut].trim();
    if kept.is_empty() {
        text.trim().to_string()
    } else {
        kept.to_string()
    }
}

/// Drops a sentence that repeats an earlier one within the same line.
fn dedup_sentences(text: &str) -> String {
    text.lines()
        .map(|line| {
            let mut seen: Vec<String> = Vec::new();
            let mut out = String::new();
            for sentence in line.split_inclusive(['.', '!', '?']) {
                let norm = sentence.trim().to_lowercase();
                if norm.len() > 12 && seen.contains(&norm) {
                    continue;
                }
                seen.push(norm);
                out.push_str(sentence);
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose logits favour token `(last + 1) % vocab`: enough to
    /// check positions, stops and caps without weights.
    struct Counting {
        vocab: usize,
        positions: Vec<usize>,
    }

    impl Decoder for Counting {
        fn forward(&mut self, ids: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
            let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
            self.positions.push(pos);
            let last = *ids.last().unwrap_or(&0) as usize;
            let mut l = vec![0f32; self.vocab];
            l[(last + 1) % self.vocab] = 10.0;
            Tensor::new(l.as_slice(), &Device::Cpu)?.unsqueeze(0)
        }
        fn clear_cache(&mut self) {
            self.positions.clear();
        }
    }

    fn run(params: &GenParams, stop: &[u32], cancel: &Cancel) -> Result<Generation, EngineError> {
        let mut m = Counting {
            vocab: 50,
            positions: vec![],
        };
        let decode = |ids: &[u32]| Ok(ids.iter().map(|i| format!("<{i}>")).collect::<String>());
        let g = generate(
            &mut m,
            &Device::Cpu,
            &[1, 2, 3],
            params,
            stop,
            &decode,
            cancel,
            None,
        )?;
        // Prefill at 0, then one position per decoded token after the prompt.
        assert_eq!(m.positions[0], 0);
        for (i, p) in m.positions.iter().enumerate().skip(1) {
            assert_eq!(*p, 3 + i - 1);
        }
        Ok(g)
    }

    #[test]
    fn greedy_counts_and_caps() {
        let p = GenParams {
            max_new_tokens: 5,
            repeat_penalty: 1.0,
            ..GenParams::default()
        };
        let g = run(&p, &[], &Cancel::default()).unwrap();
        assert_eq!(g.tokens, vec![4, 5, 6, 7, 8]);
        assert_eq!(g.finish, "max_tokens");
        // One confidence step per sampled token, each the argmax.
        assert_eq!(g.confidence.tokens, 5);
        let mean = g.confidence.mean_logprob().unwrap();
        assert!(mean < 0.0 && mean > -1.0, "{mean}");
        assert_eq!(g.prompt_tokens, 3);
    }

    #[test]
    fn stops_on_eos_and_stop_strings() {
        let p = GenParams {
            max_new_tokens: 50,
            ..GenParams::default()
        };
        let g = run(&p, &[7], &Cancel::default()).unwrap();
        assert_eq!(g.tokens, vec![4, 5, 6]);
        assert_eq!(g.finish, "eos");
        let p = GenParams {
            max_new_tokens: 50,
            stop_strings: vec!["<5>".into()],
            ..GenParams::default()
        };
        let g = run(&p, &[], &Cancel::default()).unwrap();
        assert_eq!(g.tokens, vec![4, 5]);
        assert_eq!(g.finish, "stop_string");
    }

    #[test]
    fn cancellation_and_deadline() {
        let c = Cancel::default();
        c.cancel();
        assert!(matches!(
            run(&GenParams::default(), &[], &c),
            Err(EngineError::Cancelled)
        ));
        let mut m = Counting {
            vocab: 50,
            positions: vec![],
        };
        let decode = |_: &[u32]| Ok(String::new());
        let past = Instant::now();
        let r = generate(
            &mut m,
            &Device::Cpu,
            &[1],
            &GenParams::default(),
            &[],
            &decode,
            &Cancel::default(),
            Some(past),
        );
        assert!(matches!(r, Err(EngineError::DeadlineExceeded(0))));
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let p = GenParams {
            temperature: Some(0.8),
            top_p: Some(0.9),
            top_k: Some(5),
            max_new_tokens: 8,
            ..GenParams::default()
        };
        let a = run(&p, &[], &Cancel::default()).unwrap();
        let b = run(&p, &[], &Cancel::default()).unwrap();
        assert_eq!(a.tokens, b.tokens);
    }

    #[test]
    fn unfinished_tails_are_cut() {
        assert_eq!(trim_unfinished("One. Two and th"), "One.");
        assert_eq!(trim_unfinished("- a\n- b\nC"), "- a\n- b");
        assert_eq!(trim_unfinished("no end at all"), "no end at all");
    }

    #[test]
    fn cleaning() {
        assert_eq!(
            clean_output("Summary: Alice spoke.<|im_end|>junk", &[]),
            "Alice spoke."
        );
        assert_eq!(clean_output("- a\n- b\n- a\n- b\n", &[]), "- a\n- b");
        assert_eq!(
            clean_output("Bob will fix it. Bob will fix it. Bob will fix it.", &[]),
            "Bob will fix it."
        );
        assert_eq!(
            clean_output("keep\nSTOP and the rest", &["STOP".into()]),
            "keep"
        );
        assert_eq!(
            clean_output(
                "Meeting transcript:\n\"\"\"\nAlice: hi\n\"\"\"\nTask: say hi",
                &[]
            ),
            "Alice: hi"
        );
    }
}
