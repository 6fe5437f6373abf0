//! Job format v1: what a producer puts on the wire, and the checks every
//! entry point (router, worker, gateway) runs before a job costs anything.
//!
//! Parsing goes through `serde_json::Value` by hand rather than a derived
//! `Deserialize`, so that each rejection carries a machine-readable code and
//! the offending field: the dead-letter queue and the gateway's problem+json
//! bodies both need them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use uuid::Uuid;

/// The one schema version this build understands.
pub const SCHEMA_VERSION: u64 = 1;

/// The summary kinds a job may ask for. A kind is defined in one place,
/// [`SummaryKind::spec`]; adding one takes a variant, its row there and in `ALL`, its
/// instruction file under `workers/engine/prompts/v1/`, the job schema's
/// enum (a test compares the two) and a line of the extractive baseline
/// (the compiler asks for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryKind {
    Overview,
    ActionItems,
    Decisions,
    Short,
}

/// What makes a summary kind what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSpec {
    /// The kind's name on the wire, in the database and in metrics.
    pub name: &'static str,
    /// The most tokens a summary of this kind may have: the engines stop
    /// generating there, and the policy estimates its cost with it.
    pub max_output_tokens: usize,
    /// The kind's instruction, a file of the prompt version's folder.
    pub prompt_file: &'static str,
    /// Whether the cascade asks a summary of this kind to name one of the
    /// transcript's speakers (an overview or a list of who does what does;
    /// a one-liner or a list of decisions need not).
    pub names_speakers: bool,
}

impl SummaryKind {
    pub const ALL: [SummaryKind; 4] = [
        SummaryKind::Overview,
        SummaryKind::ActionItems,
        SummaryKind::Decisions,
        SummaryKind::Short,
    ];

    /// The kind's definition: every other property derives from it.
    pub const fn spec(self) -> KindSpec {
        match self {
            SummaryKind::Overview => KindSpec {
                name: "overview",
                max_output_tokens: 200,
                prompt_file: "overview.txt",
                names_speakers: true,
            },
            SummaryKind::ActionItems => KindSpec {
                name: "action_items",
                max_output_tokens: 160,
                prompt_file: "action_items.txt",
                names_speakers: true,
            },
            SummaryKind::Decisions => KindSpec {
                name: "decisions",
                max_output_tokens: 160,
                prompt_file: "decisions.txt",
                names_speakers: false,
            },
            SummaryKind::Short => KindSpec {
                name: "short",
                max_output_tokens: 60,
                prompt_file: "short.txt",
                names_speakers: false,
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        self.spec().name
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// See [`KindSpec::max_output_tokens`].
    pub fn max_output_tokens(self) -> usize {
        self.spec().max_output_tokens
    }
}

impl fmt::Display for SummaryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The producer's hint of what quality it is willing to pay for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Economy,
    #[default]
    Balanced,
    Best,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Economy => "economy",
            Quality::Balanced => "balanced",
            Quality::Best => "best",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Quality::Economy, Quality::Balanced, Quality::Best]
            .into_iter()
            .find(|q| q.as_str() == s)
    }
}

/// One turn of speech.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Utterance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_s: Option<f64>,
    pub text: String,
}

impl Utterance {
    /// `Speaker: text`, or the bare text when nobody is named; the form the
    /// prompts and the extractive baseline show.
    pub fn line(&self) -> String {
        match &self.speaker {
            Some(s) => format!("{s}: {}", self.text),
            None => self.text.clone(),
        }
    }
}

/// A validated job, v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub version: u64,
    pub job_id: Uuid,
    pub tenant: String,
    pub transcript: Vec<Utterance>,
    pub summaries: Vec<SummaryKind>,
    pub quality: Quality,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl Job {
    /// A job from plain text with default settings: what `recap summarize`
    /// and `recap submit` build from a text file.
    pub fn from_text(tenant: &str, text: &str, summaries: Vec<SummaryKind>) -> Self {
        Job {
            version: SCHEMA_VERSION,
            job_id: Uuid::new_v4(),
            tenant: tenant.to_string(),
            transcript: utterances_from_text(text),
            summaries,
            quality: Quality::default(),
            language: None,
            metadata: None,
            callback_url: None,
        }
    }

    pub fn transcript_bytes(&self) -> usize {
        self.transcript.iter().map(|u| u.text.len()).sum()
    }

    /// The distinct named speakers, in order of first appearance.
    pub fn speakers(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for s in self.transcript.iter().filter_map(|u| u.speaker.as_deref()) {
            if !seen.contains(&s) {
                seen.push(s);
            }
        }
        seen
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A Job holds only strings, numbers and maps: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Size limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest transcript, counted as UTF-8 bytes of utterance text.
    pub max_transcript_bytes: usize,
    /// Most utterances in one transcript.
    pub max_utterances: usize,
    /// Longest tenant name.
    pub max_tenant_len: usize,
    /// Largest `metadata` object, serialized.
    pub max_metadata_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_transcript_bytes: 2 * 1024 * 1024,
            max_utterances: 20_000,
            max_tenant_len: 64,
            max_metadata_bytes: 16 * 1024,
        }
    }
}

impl Limits {
    /// Largest message body worth decoding: a transcript at the limit with
    /// room for JSON escaping, the metadata and the other fields. Anything
    /// bigger is refused before it is parsed, so no body costs more memory
    /// than a job may.
    pub fn max_message_bytes(&self) -> usize {
        self.max_transcript_bytes
            .saturating_mul(2)
            .saturating_add(self.max_metadata_bytes)
            .saturating_add(64 * 1024)
    }
}

/// Why a job was refused: stable, machine-readable codes. They travel in
/// the `x-recap-reason` header of dead letters and in problem+json `type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    InvalidUtf8,
    InvalidJson,
    UnsupportedVersion,
    MissingField,
    InvalidField,
    EmptyTranscript,
    TranscriptTooLarge,
    TooManyUtterances,
    UnknownSummaryKind,
    /// A transcript file (WebVTT, SubRip, ASR JSON) that its format's
    /// parser refuses: broken timestamps, a cue without text.
    MalformedTranscript,
    /// `transcript_format` names no format recap reads.
    UnknownTranscriptFormat,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidUtf8 => "invalid_utf8",
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::UnsupportedVersion => "unsupported_version",
            RejectCode::MissingField => "missing_field",
            RejectCode::InvalidField => "invalid_field",
            RejectCode::EmptyTranscript => "empty_transcript",
            RejectCode::TranscriptTooLarge => "transcript_too_large",
            RejectCode::TooManyUtterances => "too_many_utterances",
            RejectCode::UnknownSummaryKind => "unknown_summary_kind",
            RejectCode::MalformedTranscript => "malformed_transcript",
            RejectCode::UnknownTranscriptFormat => "unknown_transcript_format",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused job: the code, the field it concerns, a sentence for people,
/// and the job id where one could be read (so a `dead` row can be written).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: RejectCode,
    pub field: Option<String>,
    pub message: String,
    pub job_id: Option<Uuid>,
    /// The tenant, where the body named one as a string.
    pub tenant: Option<String>,
}

impl Rejection {
    fn new(code: RejectCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Rejection {
            code,
            field: field.map(str::to_string),
            message: message.into(),
            job_id: None,
            tenant: None,
        }
    }
}

/// The job id and tenant a message names, read without validating the
/// rest (the transcript is not parsed): what a consumer needs to end a job
/// it will not run.
pub fn peek_ids(bytes: &[u8], limits: &Limits) -> (Option<Uuid>, Option<String>) {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(bytes) else {
        return (None, None);
    };
    let tenant = match obj.get("tenant") {
        Some(Value::String(t)) if valid_tenant(t, limits.max_tenant_len) => Some(t.clone()),
        _ => None,
    };
    (read_job_id(&obj).ok(), tenant)
}

/// Parses and validates a job from raw message bytes.
pub fn parse_job(bytes: &[u8], limits: &Limits) -> Result<Job, Rejection> {
    check_message_size(bytes, limits)?;
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectCode::InvalidUtf8,
            None,
            format!("body is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            RejectCode::InvalidJson,
            None,
            format!("body is not JSON: {e}"),
        )
    })?;
    parse_job_value(&value, limits)
}

/// Why a gateway submission was refused before it became a job.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmissionError {
    /// The body names a tenant other than the caller's.
    TenantMismatch,
    /// The body is JSON but not an object.
    NotAnObject,
    /// The job itself is refused.
    Rejected(Rejection),
}

/// Decodes an HTTP submission body into a job for `tenant`: the tenant comes
/// from the caller's credentials (a body naming another is refused),
/// `version` defaults to 1 and `job_id` to `new_id`.
pub fn parse_submission(
    bytes: &[u8],
    tenant: &str,
    new_id: Uuid,
    limits: &Limits,
) -> Result<Job, SubmissionError> {
    check_message_size(bytes, limits).map_err(SubmissionError::Rejected)?;
    let text = std::str::from_utf8(bytes).map_err(|e| {
        SubmissionError::Rejected(Rejection::new(
            RejectCode::InvalidUtf8,
            None,
            format!("body is not valid UTF-8 (at byte {})", e.valid_up_to()),
        ))
    })?;
    let mut value: Value = serde_json::from_str(text).map_err(|e| {
        SubmissionError::Rejected(Rejection::new(
            RejectCode::InvalidJson,
            None,
            format!("body is not JSON: {e}"),
        ))
    })?;
    let Some(obj) = value.as_object_mut() else {
        return Err(SubmissionError::NotAnObject);
    };
    if matches!(obj.get("tenant"), Some(Value::String(t)) if t != tenant) {
        return Err(SubmissionError::TenantMismatch);
    }
    obj.insert("tenant".into(), Value::String(tenant.to_string()));
    obj.entry("version").or_insert(Value::from(1));
    obj.entry("job_id")
        .or_insert_with(|| Value::String(new_id.to_string()));
    parse_job_value(&value, limits).map_err(SubmissionError::Rejected)
}

/// Validates an already-decoded JSON value as a job.
pub fn parse_job_value(value: &Value, limits: &Limits) -> Result<Job, Rejection> {
    let Some(obj) = value.as_object() else {
        return Err(Rejection::new(
            RejectCode::InvalidJson,
            None,
            "a job must be a JSON object",
        ));
    };
    // Read the id first so that every later rejection can name the job.
    let job_id = read_job_id(obj);
    validate(obj, limits).map_err(|mut r| {
        r.job_id = job_id.ok();
        r.tenant = match obj.get("tenant") {
            Some(Value::String(t)) if valid_tenant(t, limits.max_tenant_len) => Some(t.clone()),
            _ => None,
        };
        r
    })
}

fn read_job_id(obj: &Map<String, Value>) -> Result<Uuid, Rejection> {
    match obj.get("job_id") {
        None | Some(Value::Null) => Err(Rejection::new(
            RejectCode::MissingField,
            Some("job_id"),
            "`job_id` is required (a UUID chosen by the producer)",
        )),
        Some(Value::String(s)) => Uuid::parse_str(s).map_err(|_| {
            Rejection::new(
                RejectCode::InvalidField,
                Some("job_id"),
                format!("`job_id` must be a UUID, got {s:?}"),
            )
        }),
        Some(other) => Err(mistyped("job_id", "a UUID string", other)),
    }
}

fn mistyped(field: &str, want: &str, got: &Value) -> Rejection {
    Rejection::new(
        RejectCode::InvalidField,
        Some(field),
        format!("`{field}` must be {want}, got {}", type_name(got)),
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn required<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a Value, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(Rejection::new(
            RejectCode::MissingField,
            Some(field),
            format!("`{field}` is required"),
        )),
        Some(v) => Ok(v),
    }
}

fn optional_str<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(mistyped(field, "a string", other)),
    }
}

const KNOWN_FIELDS: [&str; 10] = [
    "version",
    "job_id",
    "tenant",
    "transcript",
    "transcript_format",
    "summaries",
    "quality",
    "language",
    "metadata",
    "callback_url",
];

fn holds_nul(s: &str) -> bool {
    s.contains('\0')
}

fn holds_nul_value(v: &Value) -> bool {
    match v {
        Value::String(s) => holds_nul(s),
        Value::Array(items) => items.iter().any(holds_nul_value),
        Value::Object(map) => map.iter().any(|(k, v)| holds_nul(k) || holds_nul_value(v)),
        _ => false,
    }
}

fn validate(obj: &Map<String, Value>, limits: &Limits) -> Result<Job, Rejection> {
    check_envelope(obj)?;
    let job_id = read_job_id(obj)?;
    let tenant = read_tenant(obj, limits)?;
    let format = read_transcript_format(obj)?;
    let transcript = parse_transcript(required(obj, "transcript")?, format, limits)?;
    let summaries = match obj.get("summaries") {
        None | Some(Value::Null) => vec![SummaryKind::Overview],
        Some(Value::Array(items)) => parse_summary_kinds(items)?,
        Some(other) => return Err(mistyped("summaries", "an array of summary kinds", other)),
    };
    Ok(Job {
        version: SCHEMA_VERSION,
        job_id,
        tenant,
        transcript,
        summaries,
        quality: read_quality(obj)?,
        language: read_language(obj)?,
        metadata: read_metadata(obj, limits)?,
        callback_url: read_callback_url(obj)?,
    })
}

/// The version, no unknown field, and no NUL anywhere.
fn check_envelope(obj: &Map<String, Value>) -> Result<(), Rejection> {
    let version = match required(obj, "version")? {
        Value::Number(n) => n.as_u64(),
        other => return Err(mistyped("version", "the integer 1", other)),
    };
    if version != Some(SCHEMA_VERSION) {
        return Err(Rejection::new(
            RejectCode::UnsupportedVersion,
            Some("version"),
            format!(
                "schema version {} is not supported; this build reads version {SCHEMA_VERSION}",
                obj.get("version").map(Value::to_string).unwrap_or_default()
            ),
        ));
    }
    // Unknown fields are refused rather than dropped: a misspelt `sumaries`
    // silently falling back to defaults is worse than a clear error.
    if let Some(unknown) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            Some(unknown),
            format!("unknown field `{unknown}`"),
        ));
    }
    // PostgreSQL's text and jsonb cannot hold U+0000: a job carrying one
    // would fail every write of its row or summaries, so it is refused here
    // with its field named, before anything is written.
    for (field, value) in obj {
        if holds_nul(field) || holds_nul_value(value) {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                Some(field),
                format!("`{field}` holds a NUL character (\\u0000), which text cannot store"),
            ));
        }
    }
    Ok(())
}

/// The tenant: a name of `limits.max_tenant_len` characters at most.
fn read_tenant(obj: &Map<String, Value>, limits: &Limits) -> Result<String, Rejection> {
    let tenant = match required(obj, "tenant")? {
        Value::String(s) => s.clone(),
        other => return Err(mistyped("tenant", "a string", other)),
    };
    if !valid_tenant(&tenant, limits.max_tenant_len) {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            Some("tenant"),
            format!(
                "`tenant` must be 1-{} characters of a-z, A-Z, 0-9, '.', '_' or '-'",
                limits.max_tenant_len
            ),
        ));
    }
    Ok(tenant)
}

/// The transcript's declared format, if any.
fn read_transcript_format(obj: &Map<String, Value>) -> Result<Option<TranscriptFormat>, Rejection> {
    let format = match optional_str(obj, "transcript_format")? {
        None => None,
        Some(f) => Some(TranscriptFormat::parse(f).ok_or_else(|| {
            Rejection::new(
                RejectCode::UnknownTranscriptFormat,
                Some("transcript_format"),
                format!(
                    "`transcript_format` must be one of {}, got {f:?}",
                    TranscriptFormat::ALL
                        .map(TranscriptFormat::as_str)
                        .join(", ")
                ),
            )
        })?),
    };
    Ok(format)
}

/// The quality hint (default balanced).
fn read_quality(obj: &Map<String, Value>) -> Result<Quality, Rejection> {
    let quality = match optional_str(obj, "quality")? {
        None => Quality::default(),
        Some(q) => Quality::parse(q).ok_or_else(|| {
            Rejection::new(
                RejectCode::InvalidField,
                Some("quality"),
                format!("`quality` must be economy, balanced or best, got {q:?}"),
            )
        })?,
    };
    Ok(quality)
}

/// The transcript's language, a BCP 47 tag, if given.
fn read_language(obj: &Map<String, Value>) -> Result<Option<String>, Rejection> {
    let language = match optional_str(obj, "language")? {
        None => None,
        Some(l) if valid_language_tag(l) => Some(l.to_string()),
        Some(l) => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                Some("language"),
                format!("`language` must be a BCP 47 tag such as \"en\" or \"fr-CA\", got {l:?}"),
            ))
        }
    };
    Ok(language)
}

/// The producer's metadata, an object within `limits.max_metadata_bytes`.
fn read_metadata(
    obj: &Map<String, Value>,
    limits: &Limits,
) -> Result<Option<Map<String, Value>>, Rejection> {
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > limits.max_metadata_bytes {
                return Err(Rejection::new(
                    RejectCode::InvalidField,
                    Some("metadata"),
                    format!(
                        "`metadata` is {size} bytes; the limit is {}",
                        limits.max_metadata_bytes
                    ),
                ));
            }
            Some(m.clone())
        }
        Some(other) => return Err(mistyped("metadata", "an object", other)),
    };
    Ok(metadata)
}

/// Where the job's webhook goes, if anywhere: an http(s) URL.
fn read_callback_url(obj: &Map<String, Value>) -> Result<Option<String>, Rejection> {
    let callback_url = match optional_str(obj, "callback_url")? {
        None => None,
        Some(u) if (u.starts_with("https://") || u.starts_with("http://")) && u.len() <= 2048 => {
            Some(u.to_string())
        }
        Some(_) => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                Some("callback_url"),
                "`callback_url` must be an http(s) URL of at most 2048 characters",
            ))
        }
    };
    Ok(callback_url)
}

/// Whether `t` is an acceptable tenant name: 1 to `max_len` of A-Z, a-z, 0-9, `.`, `_`, `-`.
pub fn valid_tenant(t: &str, max_len: usize) -> bool {
    !t.is_empty()
        && t.len() <= max_len
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_language_tag(l: &str) -> bool {
    let mut parts = l.split('-');
    let primary_ok = parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphabetic()));
    primary_ok
        && l.len() <= 35
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn parse_summary_kinds(items: &[Value]) -> Result<Vec<SummaryKind>, Rejection> {
    if items.is_empty() {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            Some("summaries"),
            "`summaries` must name at least one kind",
        ));
    }
    let mut kinds = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("summaries[{i}]");
        let Value::String(s) = item else {
            return Err(mistyped(&field, "a summary kind string", item));
        };
        let kind = SummaryKind::parse(s).ok_or_else(|| {
            Rejection::new(
                RejectCode::UnknownSummaryKind,
                Some(&field),
                format!(
                    "unknown summary kind {s:?}; known kinds: overview, action_items, decisions, short"
                ),
            )
        })?;
        // A repeated kind would ask for the same work twice: keep the first.
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

/// The transcript in any accepted form: plain text, recap's utterance
/// list, or a file of one of the `formats` (named by `transcript_format`,
/// or detected from the content).
fn parse_transcript(
    value: &Value,
    format: Option<TranscriptFormat>,
    limits: &Limits,
) -> Result<Vec<Utterance>, Rejection> {
    let malformed = |e: FormatError| {
        Rejection::new(
            RejectCode::MalformedTranscript,
            Some("transcript"),
            e.to_string(),
        )
    };
    let format = format.or_else(|| formats::detect_json(value));
    let utterances = match (format, value) {
        (Some(TranscriptFormat::Utterances), Value::String(text)) => {
            check_bytes(text.len(), limits)?;
            let inner: Value = serde_json::from_str(text).map_err(|e| {
                Rejection::new(
                    RejectCode::MalformedTranscript,
                    Some("transcript"),
                    format!("utterances: not JSON: {e}"),
                )
            })?;
            return parse_transcript(&inner, Some(TranscriptFormat::Utterances), limits);
        }
        (None | Some(TranscriptFormat::Text), Value::String(text)) => {
            check_bytes(text.len(), limits)?;
            utterances_from_text(text)
        }
        (Some(f), Value::String(text)) => {
            check_bytes(text.len(), limits)?;
            formats::parse_text(text, Some(f)).map_err(malformed)?
        }
        (None | Some(TranscriptFormat::Utterances), Value::Array(items)) => {
            parse_utterances(items, limits)?
        }
        (Some(f), v @ (Value::Array(_) | Value::Object(_))) => {
            formats::parse_value(v, Some(f)).map_err(malformed)?
        }
        (_, other) => {
            return Err(mistyped(
                "transcript",
                "text, a list of utterances, or a transcript file's JSON",
                other,
            ))
        }
    };
    check_bytes(utterances.iter().map(|u| u.text.len()).sum(), limits)?;
    // A file's text is only read here: what it holds is checked as the
    // job's own utterances are (PostgreSQL text holds no NUL) ...
    if utterances
        .iter()
        .any(|u| holds_nul(&u.text) || u.speaker.as_deref().is_some_and(holds_nul))
    {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            Some("transcript"),
            "`transcript` holds a NUL character (\\u0000), which text cannot store",
        ));
    }
    // ... and the utterances recap re-publishes must fit a message, or the
    // router would refuse what the gateway accepted.
    let as_json = json_len(&utterances);
    let room = limits.max_transcript_bytes.saturating_mul(2);
    if as_json > room {
        return Err(Rejection::new(
            RejectCode::TranscriptTooLarge,
            Some("transcript"),
            format!("the transcript is {as_json} bytes as utterances; the limit is {room}"),
        ));
    }
    if utterances.is_empty() {
        return Err(Rejection::new(
            RejectCode::EmptyTranscript,
            Some("transcript"),
            "transcript holds no text",
        ));
    }
    if utterances.len() > limits.max_utterances {
        return Err(Rejection::new(
            RejectCode::TooManyUtterances,
            Some("transcript"),
            format!(
                "transcript has {} utterances; the limit is {}",
                utterances.len(),
                limits.max_utterances
            ),
        ));
    }
    Ok(utterances)
}

/// The bytes `value` takes as JSON, counted without building the text
/// (every job is parsed on the router's and workers' paths).
fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    match serde_json::to_writer(&mut n, value) {
        Ok(()) => n.0,
        Err(_) => usize::MAX,
    }
}

/// recap's own utterance list, each item checked by `parse_utterance`.
fn parse_utterances(items: &[Value], limits: &Limits) -> Result<Vec<Utterance>, Rejection> {
    if items.len() > limits.max_utterances {
        return Err(Rejection::new(
            RejectCode::TooManyUtterances,
            Some("transcript"),
            format!(
                "transcript has {} utterances; the limit is {}",
                items.len(),
                limits.max_utterances
            ),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    let mut bytes = 0usize;
    for (i, item) in items.iter().enumerate() {
        let u = parse_utterance(item, i)?;
        bytes += u.text.len();
        check_bytes(bytes, limits)?;
        if !u.text.trim().is_empty() {
            out.push(u);
        }
    }
    Ok(out)
}

fn check_message_size(bytes: &[u8], limits: &Limits) -> Result<(), Rejection> {
    let max = limits.max_message_bytes();
    if bytes.len() > max {
        return Err(Rejection::new(
            RejectCode::TranscriptTooLarge,
            None,
            format!(
                "the message is {} bytes; the largest a job may be is {max}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

fn check_bytes(bytes: usize, limits: &Limits) -> Result<(), Rejection> {
    if bytes > limits.max_transcript_bytes {
        return Err(Rejection::new(
            RejectCode::TranscriptTooLarge,
            Some("transcript"),
            format!(
                "transcript exceeds {} bytes (the configured limit)",
                limits.max_transcript_bytes
            ),
        ));
    }
    Ok(())
}

fn parse_utterance(item: &Value, i: usize) -> Result<Utterance, Rejection> {
    let field = format!("transcript[{i}]");
    let Value::Object(obj) = item else {
        return Err(mistyped(&field, "an utterance object", item));
    };
    if let Some(unknown) = obj
        .keys()
        .find(|k| !["speaker", "start_s", "end_s", "text"].contains(&k.as_str()))
    {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            Some(&format!("{field}.{unknown}")),
            format!("unknown utterance field `{unknown}`"),
        ));
    }
    let text = match obj.get("text") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => {
            return Err(Rejection::new(
                RejectCode::MissingField,
                Some(&format!("{field}.text")),
                format!("`{field}.text` is required"),
            ))
        }
        Some(other) => return Err(mistyped(&format!("{field}.text"), "a string", other)),
    };
    let speaker = match obj.get("speaker") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) if s.len() <= 256 => Some(s.trim().to_string()),
        Some(Value::String(_)) => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                Some(&format!("{field}.speaker")),
                "speaker names are limited to 256 bytes",
            ))
        }
        Some(other) => return Err(mistyped(&format!("{field}.speaker"), "a string", other)),
    };
    let time = |key: &str| -> Result<Option<f64>, Rejection> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(t)),
                _ => Err(Rejection::new(
                    RejectCode::InvalidField,
                    Some(&format!("{field}.{key}")),
                    format!("`{field}.{key}` must be a non-negative number of seconds"),
                )),
            },
            Some(other) => Err(mistyped(&format!("{field}.{key}"), "a number", other)),
        }
    };
    let start_s = time("start_s")?;
    let end_s = time("end_s")?;
    if let (Some(s), Some(e)) = (start_s, end_s) {
        if e < s {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                Some(&format!("{field}.end_s")),
                format!("`{field}.end_s` ({e}) is before `start_s` ({s})"),
            ));
        }
    }
    Ok(Utterance {
        speaker,
        start_s,
        end_s,
        text,
    })
}

/// Splits plain text into utterances: one per non-empty line, with a
/// `Name: text` prefix read as the speaker when the name looks like one
/// (one to three words, no sentence punctuation), so that a sentence with a
/// colon in it stays text.
pub fn utterances_from_text(text: &str) -> Vec<Utterance> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| match split_speaker(line) {
            Some((speaker, rest)) => Utterance {
                speaker: Some(speaker.to_string()),
                start_s: None,
                end_s: None,
                text: rest.to_string(),
            },
            None => Utterance {
                speaker: None,
                start_s: None,
                end_s: None,
                text: line.to_string(),
            },
        })
        .collect()
}

pub(crate) fn split_speaker(line: &str) -> Option<(&str, &str)> {
    let (name, rest) = line.split_once(':')?;
    let name = name.trim();
    let rest = rest.trim();
    let words = name.split_whitespace().count();
    let looks_like_name = !name.is_empty()
        && name.len() <= 40
        && (1..=3).contains(&words)
        && name.chars().next().is_some_and(|c| c.is_alphabetic())
        && !name.contains(['.', ',', '!', '?', '"', '(', ')'])
        && !rest.is_empty()
        && !rest.starts_with("//");
    looks_like_name.then_some((name, rest))
}

pub mod formats;

pub use formats::{FormatError, TranscriptFormat};

#[cfg(test)]
mod tests;
