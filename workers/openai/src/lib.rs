//! A tier served by an OpenAI-compatible chat-completions endpoint (vLLM,
//! TGI, a llama.cpp server, a hosted API), for teams whose large model
//! already runs elsewhere. It implements the engine's [`Summarizer`] with
//! the in-process engine's prompts and chat roles (a system turn, then the
//! user turn of `prompts/v1`), its map-reduce for long transcripts, and its
//! token caps per kind; token counts come from the response's `usage`.
//!
//! Calls retry with exponential backoff on 429 and 5xx (honouring
//! `Retry-After`) and on connection errors and timeouts, up to a limit;
//! at most `max_concurrency` calls are in flight per process. The API key
//! is sent as a bearer token and never logged or shown.

use recap_engine::pipeline::mapreduce::{self, CallCounts, Step};
use recap_engine::pipeline::prompts;
use recap_engine::{EngineError, SummarizeRequest, Summarizer, SummaryOutput};
use recap_job::SummaryKind;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the endpoint is and how to call it.
#[derive(Clone)]
pub struct EndpointConfig {
    /// The catalog id this tier answers to.
    pub id: String,
    /// The API's base, as OpenAI's clients take it: `.../v1`.
    pub base_url: String,
    /// The model name the endpoint knows.
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// Retries after the first attempt, on 429, 5xx, timeouts and refused connections.
    pub max_retries: u32,
    pub max_concurrency: usize,
    /// Tokens one call may hold (prompt and answer); longer transcripts are map-reduced.
    pub context_length: usize,
    /// `transcript_first` (the default) or `task_first`, as the catalog's entries.
    pub transcript_first: bool,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("id", &self.id)
            .field("base_url", &shown(&self.base_url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("max_concurrency", &self.max_concurrency)
            .finish()
    }
}

/// One chat completion's answer: the text and the endpoint's token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    pub finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Wire {
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

/// Reads a chat-completions response body.
pub fn parse_completion(body: &[u8]) -> Result<Completion, String> {
    let wire: Wire = serde_json::from_slice(body)
        .map_err(|e| format!("not a chat-completions response: {e}"))?;
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or("the response has no choices")?;
    let text = choice
        .message
        .content
        .ok_or("the response's message has no content")?;
    Ok(Completion {
        text: text.trim().to_string(),
        prompt_tokens: wire.usage.as_ref().and_then(|u| u.prompt_tokens),
        completion_tokens: wire.usage.as_ref().and_then(|u| u.completion_tokens),
        finish_reason: choice.finish_reason,
    })
}

/// The request body: the engine's system and user turns, greedy decoding.
pub fn request_body(model: &str, system: &str, user: &str, max_tokens: usize) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": false,
    })
}

/// How long to wait before retry `attempt` (0 for the first retry) after an
/// answer with `status` (None: no answer, a timeout or a refused
/// connection), or None when it is not worth retrying.
pub fn retry_delay(
    status: Option<u16>,
    attempt: u32,
    max_retries: u32,
    retry_after: Option<&str>,
) -> Option<Duration> {
    if attempt >= max_retries {
        return None;
    }
    let retryable = match status {
        None => true,
        Some(s) => s == 429 || s == 408 || (500..600).contains(&s) && s != 501,
    };
    if !retryable {
        return None;
    }
    let backoff =
        Duration::from_millis(500u64.saturating_mul(1 << attempt.min(10))).min(MAX_BACKOFF);
    // Retry-After in seconds (the HTTP-date form is rare from these servers).
    let asked = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_BACKOFF));
    Some(asked.map_or(backoff, |a| a.max(backoff)))
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Tokens of a text, estimated: the endpoint's tokenizer is not here, and
/// this sizes only the map-reduce. Four ASCII bytes a token, as for
/// English; a token for every other character, which errs high for
/// accented Latin and holds for CJK, so that chunks stay inside the window.
pub fn estimate_tokens(text: &str) -> usize {
    let ascii = text.bytes().filter(u8::is_ascii).count();
    let other = text.chars().filter(|c| !c.is_ascii()).count();
    ascii.div_ceil(4) + other
}

/// A URL as it may be shown: without the `user:password@` it may carry.
fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit('@').next().unwrap_or(authority);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// A tier on an OpenAI-compatible endpoint.
pub struct OpenAiSummarizer {
    config: EndpointConfig,
    client: reqwest::Client,
    slots: Arc<tokio::sync::Semaphore>,
    /// The calls' own runtime: the engine's interface is synchronous and
    /// is called from a worker's blocking threads, from a command's main
    /// thread, or from no runtime at all; the client's pooled connections
    /// belong to this one runtime whichever it is.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for OpenAiSummarizer {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl OpenAiSummarizer {
    pub fn new(config: EndpointConfig) -> Result<OpenAiSummarizer, EngineError> {
        let bad = |m: String| EngineError::BadModel(format!("{}: {m}", config.id));
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(bad(format!(
                "base URL `{}` is not http(s)",
                shown(&config.base_url)
            )));
        }
        if config.model.trim().is_empty() {
            return Err(bad("no model name".into()));
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("recap-openai")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("its runtime: {e}")))?;
        Ok(OpenAiSummarizer {
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrency.max(1))),
            config,
            client,
            runtime: Some(runtime),
        })
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        )
    }

    /// One chat completion, retried as [`retry_delay`] says, given up at
    /// the request's deadline or when it is cancelled.
    pub async fn complete(
        &self,
        system: &str,
        user: &str,
        max_tokens: usize,
        req: &SummarizeRequest<'_>,
    ) -> Result<Completion, EngineError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let body = request_body(&self.config.model, system, user, max_tokens);
        let id = &self.config.id;
        let mut attempt = 0;
        loop {
            if req.cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            let left = match req.deadline {
                Some(d) => d
                    .checked_duration_since(Instant::now())
                    .ok_or(EngineError::DeadlineExceeded(0))?,
                None => self.config.timeout,
            };
            let mut call = self.client.post(self.url()).json(&body);
            if let Some(key) = &self.config.api_key {
                call = call.bearer_auth(key);
            }
            let sent = tokio::time::timeout(left, async {
                let resp = call.send().await?;
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let bytes = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, retry_after, bytes))
            })
            .await
            .map_err(|_| EngineError::DeadlineExceeded(0))?;
            let (status, retry_after, failure) = match sent {
                Ok((status, _, bytes)) if status.is_success() => {
                    return parse_completion(&bytes)
                        .map_err(|e| EngineError::Model(format!("{id}: {e}")));
                }
                Ok((status, retry_after, bytes)) => {
                    let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
                    let hint = match status.as_u16() {
                        401 | 403 => " (check the tier's API key)",
                        404 => " (check the base URL and the model name)",
                        _ => "",
                    };
                    (
                        Some(status.as_u16()),
                        retry_after,
                        format!("{id}: the endpoint answered {status}{hint}: {text}"),
                    )
                }
                Err(e) => (None, None, format!("{id}: {}", without_url(&e))),
            };
            let wait = retry_delay(
                status,
                attempt,
                self.config.max_retries,
                retry_after.as_deref(),
            )
            // No wait that would end past the deadline.
            .filter(|w| req.deadline.is_none_or(|d| Instant::now() + *w < d));
            match wait {
                Some(wait) => {
                    tracing::warn!(model = %id, attempt, ?status, "endpoint call failed; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                None => return Err(EngineError::Model(failure)),
            }
        }
    }

    fn summarize_one(
        &self,
        req: &SummarizeRequest<'_>,
        kind: SummaryKind,
    ) -> Result<SummaryOutput, EngineError> {
        let max_tokens = kind.max_output_tokens();
        let task = prompts::task(kind, req.query);
        let suffix = recap_engine::models::llm::language_suffix(req.language);
        let system = prompts::system();
        // What a call holds beside the transcript: the turns' scaffolding,
        // the task and the answer.
        let overhead = estimate_tokens(system) + estimate_tokens(&task) + 64 + max_tokens;
        let budget = self.config.context_length.saturating_sub(overhead).max(256);
        let count = |s: &str| estimate_tokens(s);
        // `complete` checks the cancel flag and the deadline before each attempt.
        mapreduce::summarize_kind(req.transcript, kind, budget, &count, &mut |step| {
            let user = match step {
                Step::Map(t) if self.config.transcript_first => {
                    let (head, rest) = prompts::user_turn_parts(t, &task)?;
                    format!("{head}{rest}")
                }
                Step::Map(t) => prompts::user_turn(t, &task)?,
                Step::Reduce(p) => prompts::reduce_turn(p, &task)?,
            };
            let user = format!("{user}{suffix}");
            let started = Instant::now();
            let c = self.run(self.complete(system, &user, max_tokens, req))??;
            let counts = CallCounts {
                prompt_tokens: c
                    .prompt_tokens
                    .unwrap_or_else(|| estimate_tokens(system) + estimate_tokens(&user)),
                output_tokens: c
                    .completion_tokens
                    .unwrap_or_else(|| estimate_tokens(&c.text)),
                prefill_ms: 0.0,
                decode_ms: started.elapsed().as_secs_f64() * 1e3,
                confidence: Default::default(),
            };
            Ok((c.text, counts))
        })
    }
}

/// reqwest's error without the URL it names (a URL may carry credentials).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut msg = kind.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

impl OpenAiSummarizer {
    /// Runs a call on this tier's runtime from the engine's synchronous
    /// interface, on a short-lived plain thread: that works from inside
    /// any runtime (a thread of one may not block on another) and outside.
    fn run<T: Send>(
        &self,
        f: impl std::future::Future<Output = T> + Send,
    ) -> Result<T, EngineError> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| EngineError::Model("the tier's runtime is gone".into()))?;
        std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join())
            .map_err(|_| EngineError::Model(format!("{}: a call panicked", self.config.id)))
    }
}

impl Summarizer for OpenAiSummarizer {
    fn model_id(&self) -> &str {
        &self.config.id
    }

    fn engine(&self) -> &'static str {
        "openai"
    }

    fn count_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(estimate_tokens(text))
    }

    fn summarize(&self, req: &SummarizeRequest<'_>) -> Result<Vec<SummaryOutput>, EngineError> {
        req.kinds
            .iter()
            .map(|&k| self.summarize_one(req, k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_response_gives_text_and_usage() {
        let body = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"  Alice owns the launch. "},"finish_reason":"stop"}],"usage":{"prompt_tokens":120,"completion_tokens":7,"total_tokens":127}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.text, "Alice owns the launch.");
        assert_eq!((c.prompt_tokens, c.completion_tokens), (Some(120), Some(7)));
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        let no_usage = br#"{"choices":[{"message":{"content":"ok"},"finish_reason":"length"}]}"#;
        let no_content = br#"{"choices":[{"message":{"role":"assistant","content":null}}]}"#;
        assert!(parse_completion(no_content)
            .unwrap_err()
            .contains("no content"));
        assert_eq!(parse_completion(no_usage).unwrap().prompt_tokens, None);
        assert!(parse_completion(br#"{"choices":[]}"#)
            .unwrap_err()
            .contains("no choices"));
        assert!(parse_completion(b"<html>502 Bad Gateway</html>")
            .unwrap_err()
            .contains("not a chat-completions response"));
    }

    #[test]
    fn the_request_carries_the_engine_turns() {
        let b = request_body("m", "sys", "user turn", 160);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "user turn");
        assert_eq!(b["max_tokens"], 160);
        assert_eq!(b["temperature"], 0.0);
    }

    #[test]
    fn retries_follow_the_status() {
        let d = |s, a| retry_delay(s, a, 3, None);
        assert_eq!(d(Some(429), 0), Some(Duration::from_millis(500)));
        assert_eq!(d(Some(503), 1), Some(Duration::from_secs(1)));
        assert_eq!(d(None, 2), Some(Duration::from_secs(2)));
        assert_eq!(d(Some(500), 3), None, "past the limit");
        for s in [400, 401, 403, 404, 422, 501] {
            assert_eq!(d(Some(s), 0), None, "{s}");
        }
        assert_eq!(
            retry_delay(Some(429), 0, 3, Some("7")),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_delay(Some(429), 0, 3, Some("3600")),
            Some(MAX_BACKOFF)
        );
    }

    #[test]
    fn estimates_err_high_outside_ascii() {
        assert_eq!(estimate_tokens("abcdefgh"), 2);
        assert_eq!(estimate_tokens("会议纪要"), 4);
        assert_eq!(estimate_tokens("café"), 2);
    }

    #[test]
    fn shown_urls_carry_no_credentials() {
        assert_eq!(
            shown("https://user:pa55@llm.example/v1"),
            "https://llm.example/v1"
        );
        assert_eq!(
            shown("http://127.0.0.1:8000/v1"),
            "http://127.0.0.1:8000/v1"
        );
        assert_eq!(shown("http://a@b@host"), "http://host");
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let c = EndpointConfig {
            id: "t".into(),
            base_url: "http://admin:hunter2@127.0.0.1:1/v1".into(),
            model: "m".into(),
            api_key: Some("sk-secret-value".into()),
            timeout: Duration::from_secs(1),
            max_retries: 0,
            max_concurrency: 1,
            context_length: 4096,
            transcript_first: true,
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-secret-value") && !shown.contains("hunter2"));
    }

    proptest! {
        #[test]
        fn any_body_is_an_answer_or_an_error(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_completion(&body);
        }

        #[test]
        fn backoff_never_exceeds_the_cap(status in proptest::option::of(100u16..600), attempt in 0u32..100, after in proptest::option::of("[0-9]{1,12}")) {
            if let Some(d) = retry_delay(status, attempt, 200, after.as_deref()) {
                prop_assert!(d <= MAX_BACKOFF);
            }
        }
    }
}
