//! Several jobs through a dense decoder at once (a worker's batch,
//! `tiers.<tier>.batch_size`). Each sequence is prefilled on its own (a
//! prompt is already a GEMM-sized block of rows), then all decode together,
//! one token of each per step, so that each step reads the weights once for
//! all of them and pays the per-layer overhead once. Every sequence gets
//! the numbers it would get alone, bit for bit, and so the same text as
//! `summarize` (on CPU by construction and tested; on CUDA, where the
//! attention runs as tensor ops, `recap-bench batch` found the texts
//! equal). Kinds whose transcript needs map-reduce run afterwards, one call
//! after another, as `summarize` runs them.

use super::{finished_text, GgufModel, Weights};
use crate::models::decoder::DenseDecoder;
use crate::pipeline::generate::{may_start, model_err, GenParams, Stream};
use crate::pipeline::mapreduce::{self, Step};
use crate::pipeline::prompts;
use crate::summarizer::{EngineError, SummarizeRequest, Summarizer, SummaryOutput};
use candle_core::{Device, IndexOp, Tensor};
use recap_job::SummaryKind;
use std::time::Instant;

/// Most sequences decoding together: bounds the KV caches held at once.
const MAX_SEQUENCES: usize = 16;

/// How one request's kinds are prefilled.
struct JobPlan {
    req: usize,
    /// Transcript-first prompts of several kinds share this prefill.
    shared_head: Option<Vec<u32>>,
    kinds: Vec<KindPlan>,
}

/// One kind that fits one call: its prompt as two passes.
struct KindPlan {
    /// Its place in the request's kinds.
    at: usize,
    kind: SummaryKind,
    /// Empty when the job's head is shared.
    head: Vec<u32>,
    tail: Vec<u32>,
    params: GenParams,
}

/// A sequence decoding in the batch.
struct Sequence<'p> {
    req: usize,
    at: usize,
    kind: SummaryKind,
    params: &'p GenParams,
    stream: Stream<'p>,
    /// Logits of its last position: the next step samples from them.
    logits: Tensor,
    /// The token the next step feeds.
    next: u32,
    prompt_tokens: usize,
    prefill_ms: f64,
    started: Instant,
}

/// Prefills `ids` at `pos`; the logits of the last position (one row).
fn prefill(
    model: &mut DenseDecoder,
    device: &Device,
    ids: &[u32],
    pos: usize,
) -> Result<Tensor, EngineError> {
    let input = Tensor::new(ids, device)
        .and_then(|t| t.unsqueeze(0))
        .map_err(model_err)?;
    model
        .forward(&input, pos)
        .and_then(|l| l.squeeze(0))
        .map_err(model_err)
}

impl GgufModel {
    /// The request's single-call kinds and how to prefill them; kinds that
    /// need map-reduce are left out (they run after the batch).
    fn job_plan(&self, req_at: usize, req: &SummarizeRequest<'_>) -> Result<JobPlan, EngineError> {
        let params_of = |kind: SummaryKind| GenParams {
            max_new_tokens: kind.max_output_tokens(),
            ..GenParams::default()
        };
        if let Some((head, tails)) = self.shared_plan(req)? {
            return Ok(JobPlan {
                req: req_at,
                shared_head: Some(head),
                kinds: tails
                    .into_iter()
                    .enumerate()
                    .map(|(at, (kind, tail))| KindPlan {
                        at,
                        kind,
                        head: Vec::new(),
                        tail,
                        params: params_of(kind),
                    })
                    .collect(),
            });
        }
        let suffix = super::language_suffix(req.language);
        let count = |s: &str| self.count(s);
        let mut kinds = Vec::with_capacity(req.kinds.len());
        for (at, &kind) in req.kinds.iter().enumerate() {
            let budget = self.transcript_budget(kind);
            let Some(text) = mapreduce::single_call_text(req.transcript, budget, &count) else {
                continue;
            };
            let task = prompts::task(kind, req.query);
            let (prefix, rest) = self.user_parts(Step::Map(&text), &task, &suffix)?;
            let (head, tail) = self.head_and_tail(&prefix, &rest)?;
            kinds.push(KindPlan {
                at,
                kind,
                head,
                tail,
                params: params_of(kind),
            });
        }
        Ok(JobPlan {
            req: req_at,
            shared_head: None,
            kinds,
        })
    }

    /// Summarizes the requests together; one result per request, in order.
    pub(super) fn summarize_together(
        &self,
        reqs: &[SummarizeRequest<'_>],
    ) -> Vec<Result<Vec<SummaryOutput>, EngineError>> {
        let mut outputs: Vec<Vec<Option<SummaryOutput>>> =
            reqs.iter().map(|r| vec![None; r.kinds.len()]).collect();
        let mut failed: Vec<Option<EngineError>> = reqs.iter().map(|_| None).collect();
        let mut plans = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            match self.job_plan(i, req) {
                Ok(p) => plans.push(p),
                Err(e) => failed[i] = Some(e),
            }
        }
        match self.weights.lock() {
            Ok(weights) => match &*weights {
                Weights::Dense(base) => {
                    let mut rest = plans.as_slice();
                    while !rest.is_empty() {
                        // Whole jobs per wave (a shared head serves all its kinds).
                        let mut take = 1;
                        let mut seqs = rest[0].kinds.len();
                        while take < rest.len() && seqs + rest[take].kinds.len() <= MAX_SEQUENCES {
                            seqs += rest[take].kinds.len();
                            take += 1;
                        }
                        let (wave, after) = rest.split_at(take);
                        self.run_wave(base, wave, reqs, &mut outputs, &mut failed);
                        rest = after;
                    }
                }
                // Other models: one job after another.
                _ => {
                    drop(weights);
                    return reqs.iter().map(|r| self.summarize(r)).collect();
                }
            },
            Err(_) => return reqs.iter().map(|_| Err(super::poisoned())).collect(),
        }
        // Kinds that need map-reduce, as `summarize` runs them.
        for (i, req) in reqs.iter().enumerate() {
            for (at, &kind) in req.kinds.iter().enumerate() {
                if failed[i].is_some() || outputs[i][at].is_some() {
                    continue;
                }
                match self.summarize_one(req, kind) {
                    Ok(o) => outputs[i][at] = Some(o),
                    Err(e) => failed[i] = Some(e),
                }
            }
        }
        outputs
            .into_iter()
            .zip(failed)
            .map(|(outs, err)| match err {
                Some(e) => Err(e),
                None => outs
                    .into_iter()
                    .map(|o| {
                        o.ok_or_else(|| EngineError::Model("a summary kind was not run".into()))
                    })
                    .collect(),
            })
            .collect()
    }

    /// A finished sequence's summary.
    fn summary_of(&self, s: Sequence<'_>) -> Result<SummaryOutput, EngineError> {
        let g = s.stream.finish(s.prompt_tokens, s.prefill_ms);
        let raw = self.tokenizer.decode(&g.tokens)?;
        Ok(SummaryOutput {
            kind: s.kind,
            text: finished_text(&raw, &g, s.params),
            input_tokens: s.prompt_tokens as u32,
            output_tokens: g.tokens.len() as u32,
            prefill_ms: s.prefill_ms,
            decode_ms: g.decode_ms,
            total_ms: s.started.elapsed().as_secs_f64() * 1e3,
            chunks: 1,
            confidence: g.confidence,
        })
    }

    /// Prefills the wave's sequences one by one, then decodes them together.
    fn run_wave(
        &self,
        base: &DenseDecoder,
        wave: &[JobPlan],
        reqs: &[SummarizeRequest<'_>],
        outputs: &mut [Vec<Option<SummaryOutput>>],
        failed: &mut [Option<EngineError>],
    ) {
        let stop_ids = &self.tokenizer.stop_ids;
        let mut seqs: Vec<Sequence<'_>> = Vec::new();
        let mut models: Vec<DenseDecoder> = Vec::new();
        for plan in wave {
            let req = &reqs[plan.req];
            let started = seqs.len();
            let prefilled = (|| -> Result<(), EngineError> {
                let shared = match &plan.shared_head {
                    Some(head) => {
                        may_start(&req.cancel, req.deadline)?;
                        let t = Instant::now();
                        let mut m = base.detached();
                        prefill(&mut m, &self.device, head, 0)?;
                        Some((m, head.len(), t.elapsed().as_secs_f64() * 1e3))
                    }
                    None => None,
                };
                // The shared prefill is booked to the first kind.
                let mut head_ms = shared.as_ref().map_or(0.0, |s| s.2);
                for k in &plan.kinds {
                    may_start(&req.cancel, req.deadline)?;
                    let t = Instant::now();
                    let (mut m, start) = match &shared {
                        Some((m, len, _)) => (m.fork_owned().map_err(model_err)?, *len),
                        None => {
                            let mut m = base.detached();
                            if !k.head.is_empty() {
                                prefill(&mut m, &self.device, &k.head, 0)?;
                            }
                            (m, k.head.len())
                        }
                    };
                    let logits = prefill(&mut m, &self.device, &k.tail, start)?;
                    let prefill_ms = t.elapsed().as_secs_f64() * 1e3 + std::mem::take(&mut head_ms);
                    seqs.push(Sequence {
                        req: plan.req,
                        at: k.at,
                        kind: k.kind,
                        params: &k.params,
                        stream: Stream::new(&k.params, stop_ids, start + k.tail.len()),
                        logits,
                        next: 0,
                        prompt_tokens: start + k.tail.len(),
                        prefill_ms,
                        started: t,
                    });
                    models.push(m);
                }
                Ok(())
            })();
            if let Err(e) = prefilled {
                failed[plan.req] = Some(e);
                seqs.truncate(started);
                models.truncate(started);
            }
        }

        let decode = |t: &[u32]| self.tokenizer.decode(t);
        while !seqs.is_empty() {
            // Each sequence samples its next token; an error ends its job.
            let mut finished = vec![false; seqs.len()];
            for (s, done) in seqs.iter_mut().zip(finished.iter_mut()) {
                if failed[s.req].is_some() {
                    continue;
                }
                let req = &reqs[s.req];
                match s.stream.step(&s.logits, &decode, &req.cancel, req.deadline) {
                    Ok(Some(t)) => s.next = t,
                    Ok(None) => *done = true,
                    Err(e) => failed[s.req] = Some(e),
                }
            }
            // Finished sequences leave with their text; a job that failed
            // takes its other sequences along (one that fails below, at its
            // next step).
            let (mut kept, mut kept_models) = (Vec::new(), Vec::new());
            for ((s, m), done) in seqs.drain(..).zip(models.drain(..)).zip(finished) {
                if failed[s.req].is_some() {
                    continue;
                }
                if !done {
                    kept.push(s);
                    kept_models.push(m);
                    continue;
                }
                let (req, at) = (s.req, s.at);
                match self.summary_of(s) {
                    Ok(o) => outputs[req][at] = Some(o),
                    Err(e) => failed[req] = Some(e),
                }
            }
            (seqs, models) = (kept, kept_models);
            if seqs.is_empty() {
                break;
            }
            let tokens: Vec<u32> = seqs.iter().map(|s| s.next).collect();
            let positions: Vec<usize> = seqs.iter().map(|s| s.stream.position()).collect();
            match DenseDecoder::forward_batch(&mut models, &tokens, &positions) {
                Ok(logits) => {
                    for (i, s) in seqs.iter_mut().enumerate() {
                        match logits.i(i) {
                            Ok(row) => s.logits = row,
                            Err(e) => {
                                failed[s.req] = Some(model_err(e));
                            }
                        }
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for s in &seqs {
                        failed[s.req] = Some(EngineError::Model(msg.clone()));
                    }
                    return;
                }
            }
        }
    }
}
