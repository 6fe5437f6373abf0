use super::*;
use proptest::prelude::*;
use serde_json::json;

fn good() -> Value {
    json!({
        "version": 1,
        "job_id": "6f1c1c8e-3f7a-4d5e-9d43-2a7e0f1b2c3d",
        "tenant": "acme",
        "transcript": [
            {"speaker": "Alice", "start_s": 0.0, "end_s": 2.5, "text": "Let's ship on Friday."},
            {"speaker": "Bob", "text": "Agreed, I'll update the roadmap."}
        ],
        "summaries": ["overview", "action_items"],
        "quality": "economy",
        "language": "en",
        "metadata": {"meeting": "weekly", "n": 3}
    })
}

fn reject(v: Value) -> Rejection {
    parse_job_value(&v, &Limits::default()).expect_err("job should be refused")
}

#[test]
fn a_full_job_parses() {
    let job = parse_job_value(&good(), &Limits::default()).unwrap();
    assert_eq!(job.tenant, "acme");
    assert_eq!(job.transcript.len(), 2);
    assert_eq!(job.transcript[0].speaker.as_deref(), Some("Alice"));
    assert_eq!(
        job.summaries,
        vec![SummaryKind::Overview, SummaryKind::ActionItems]
    );
    assert_eq!(job.quality, Quality::Economy);
    assert_eq!(job.language.as_deref(), Some("en"));
    assert_eq!(job.metadata.as_ref().unwrap()["n"], json!(3));
    assert_eq!(job.speakers_for_test(), vec!["Alice", "Bob"]);
}

impl Job {
    fn speakers_for_test(&self) -> Vec<String> {
        self.speakers().into_iter().map(String::from).collect()
    }
}

#[test]
fn defaults_apply_to_optional_fields() {
    let job = parse_job_value(
        &json!({"version": 1, "job_id": "6f1c1c8e-3f7a-4d5e-9d43-2a7e0f1b2c3d",
                "tenant": "t", "transcript": "Alice: hello there"}),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(job.summaries, vec![SummaryKind::Overview]);
    assert_eq!(job.quality, Quality::Balanced);
    assert_eq!(job.transcript[0].speaker.as_deref(), Some("Alice"));
    assert_eq!(job.transcript[0].text, "hello there");
}

#[test]
fn round_trip_through_json() {
    let job = parse_job_value(&good(), &Limits::default()).unwrap();
    let again = parse_job(&job.to_json(), &Limits::default()).unwrap();
    assert_eq!(job, again);
}

#[test]
fn not_utf8() {
    let r = parse_job(&[0x7b, 0xff, 0xfe, 0x7d], &Limits::default()).unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidUtf8);
}

#[test]
fn not_json() {
    let r = parse_job(b"{\"version\": 1,", &Limits::default()).unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidJson);
    let r = parse_job(b"[1,2]", &Limits::default()).unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidJson);
}

#[test]
fn unknown_version_names_the_job() {
    let mut v = good();
    v["version"] = json!(2);
    let r = reject(v);
    assert_eq!(r.code, RejectCode::UnsupportedVersion);
    assert_eq!(
        r.job_id.unwrap().to_string(),
        "6f1c1c8e-3f7a-4d5e-9d43-2a7e0f1b2c3d"
    );
    let mut v = good();
    v.as_object_mut().unwrap().remove("version");
    assert_eq!(reject(v).code, RejectCode::MissingField);
}

#[test]
fn missing_and_mistyped_fields_name_the_field() {
    for field in ["job_id", "tenant", "transcript"] {
        let mut v = good();
        v.as_object_mut().unwrap().remove(field);
        let r = reject(v);
        assert_eq!(r.code, RejectCode::MissingField, "{field}");
        assert_eq!(r.field.as_deref(), Some(field));
    }
    let cases = [
        ("job_id", json!(42)),
        ("job_id", json!("not-a-uuid")),
        ("tenant", json!(["a"])),
        ("tenant", json!("has space")),
        ("transcript", json!(7)),
        ("summaries", json!("overview")),
        ("quality", json!("premium")),
        ("language", json!("english please")),
        ("metadata", json!([1])),
        ("callback_url", json!("ftp://x")),
    ];
    for (field, value) in cases {
        invalid_field(field, value);
    }
}

/// The good job with `field` set to `value` is refused as an invalid
/// `field`; returns the rejection.
fn invalid_field(field: &str, value: Value) -> Rejection {
    let mut v = good();
    v[field] = value.clone();
    let r = reject(v);
    assert_eq!(r.code, RejectCode::InvalidField, "{field}={value}");
    assert_eq!(r.field.as_deref(), Some(field), "{field}={value}");
    r
}

#[test]
fn nul_characters_are_refused_wherever_they_hide() {
    let cases = [
        (
            "transcript",
            json!([{"speaker": "A", "text": "hello\u{0}world"}]),
        ),
        (
            "transcript",
            json!([{"speaker": "A\u{0}", "text": "hello"}]),
        ),
        ("metadata", json!({"k": ["x", {"deep": "a\u{0}"}]})),
        ("metadata", json!({"k\u{0}": 1})),
        ("language", json!("en\u{0}")),
    ];
    for (field, value) in cases {
        let r = invalid_field(field, value);
        assert!(r.message.contains("NUL"), "{}", r.message);
        // The dead row can still name the job and its tenant.
        assert!(r.job_id.is_some() && r.tenant.is_some(), "{r:?}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let mut v = good();
    v["sumaries"] = json!(["overview"]);
    let r = reject(v);
    assert_eq!(r.code, RejectCode::InvalidField);
    assert_eq!(r.field.as_deref(), Some("sumaries"));
}

#[test]
fn bad_utterances() {
    let mut v = good();
    v["transcript"] = json!([{"speaker": "A"}]);
    let r = reject(v);
    assert_eq!(r.code, RejectCode::MissingField);
    assert_eq!(r.field.as_deref(), Some("transcript[0].text"));
    let mut v = good();
    v["transcript"] = json!([{"text": "hi", "start_s": 5.0, "end_s": 1.0}]);
    assert_eq!(reject(v).field.as_deref(), Some("transcript[0].end_s"));
    let mut v = good();
    v["transcript"] = json!([{"text": "hi", "start_s": -1}]);
    assert_eq!(reject(v).code, RejectCode::InvalidField);
}

#[test]
fn empty_transcripts() {
    for t in [
        json!(""),
        json!("  \n\t "),
        json!([]),
        json!([{"text": "   "}]),
    ] {
        let mut v = good();
        v["transcript"] = t.clone();
        assert_eq!(reject(v).code, RejectCode::EmptyTranscript, "{t}");
    }
}

#[test]
fn oversize_transcripts() {
    let limits = Limits {
        max_transcript_bytes: 100,
        max_utterances: 3,
        ..Limits::default()
    };
    let mut v = good();
    v["transcript"] = json!("x".repeat(101));
    assert_eq!(
        parse_job_value(&v, &limits).unwrap_err().code,
        RejectCode::TranscriptTooLarge
    );
    v["transcript"] = json!([{"text": "a".repeat(60)}, {"text": "b".repeat(60)}]);
    assert_eq!(
        parse_job_value(&v, &limits).unwrap_err().code,
        RejectCode::TranscriptTooLarge
    );
    v["transcript"] = json!("a\nb\nc\nd");
    assert_eq!(
        parse_job_value(&v, &limits).unwrap_err().code,
        RejectCode::TooManyUtterances
    );
}

#[test]
fn unknown_summary_kind() {
    let mut v = good();
    v["summaries"] = json!(["overview", "haiku"]);
    let r = reject(v);
    assert_eq!(r.code, RejectCode::UnknownSummaryKind);
    assert_eq!(r.field.as_deref(), Some("summaries[1]"));
    let mut v = good();
    v["summaries"] = json!([]);
    assert_eq!(reject(v).code, RejectCode::InvalidField);
}

#[test]
fn repeated_kinds_collapse() {
    let mut v = good();
    v["summaries"] = json!(["short", "short", "overview"]);
    let job = parse_job_value(&v, &Limits::default()).unwrap();
    assert_eq!(
        job.summaries,
        vec![SummaryKind::Short, SummaryKind::Overview]
    );
}

#[test]
fn plain_text_speakers() {
    let u = utterances_from_text(
        "Alice: hello\n\nBob Smith: we agreed. Really: yes\nThis is a sentence, with: a colon\nhttp://example.com",
    );
    assert_eq!(u.len(), 4);
    assert_eq!(u[0].speaker.as_deref(), Some("Alice"));
    assert_eq!(u[1].speaker.as_deref(), Some("Bob Smith"));
    assert_eq!(u[1].text, "we agreed. Really: yes");
    assert_eq!(u[2].speaker, None);
    assert_eq!(u[3].speaker, None);
}

#[test]
fn codes_are_stable_strings() {
    let codes = [
        (RejectCode::InvalidUtf8, "invalid_utf8"),
        (RejectCode::InvalidJson, "invalid_json"),
        (RejectCode::UnsupportedVersion, "unsupported_version"),
        (RejectCode::MissingField, "missing_field"),
        (RejectCode::InvalidField, "invalid_field"),
        (RejectCode::EmptyTranscript, "empty_transcript"),
        (RejectCode::TranscriptTooLarge, "transcript_too_large"),
        (RejectCode::TooManyUtterances, "too_many_utterances"),
        (RejectCode::UnknownSummaryKind, "unknown_summary_kind"),
    ];
    for (code, s) in codes {
        assert_eq!(code.as_str(), s);
        assert_eq!(serde_json::to_value(code).unwrap(), json!(s));
    }
}

proptest! {
    // Any bytes at all: the parser answers, never panics.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_job(&bytes, &Limits::default());
    }

    // Any JSON-ish mutation of a good job: accepted jobs always satisfy the limits.
    #[test]
    fn accepted_jobs_respect_limits(text in "[a-zA-Z :\n]{0,400}", max in 1usize..300) {
        let limits = Limits { max_transcript_bytes: max, ..Limits::default() };
        let mut v = good();
        v["transcript"] = json!(text);
        if let Ok(job) = parse_job_value(&v, &limits) {
            prop_assert!(job.transcript_bytes() <= max);
            prop_assert!(!job.transcript.is_empty());
            prop_assert!(job.transcript.iter().all(|u| !u.text.trim().is_empty()));
        }
    }

    #[test]
    fn utterance_split_keeps_every_nonempty_line(lines in proptest::collection::vec("[a-zA-Z ]{0,20}(: [a-z ]{1,20})?", 0..30)) {
        let text = lines.join("\n");
        let u = utterances_from_text(&text);
        let nonempty = lines.iter().filter(|l| !l.trim().is_empty()).count();
        prop_assert_eq!(u.len(), nonempty);
    }
}

/// The published JSON Schema and this parser must agree on the vocabulary.
#[test]
fn json_schema_matches_the_parser() {
    let schema: Value =
        serde_json::from_str(include_str!("../../../schemas/job-v1.schema.json")).unwrap();
    let props = schema["properties"].as_object().unwrap();
    let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut known = KNOWN_FIELDS.to_vec();
    known.sort_unstable();
    assert_eq!(names, known);
    let kinds: Vec<&str> = schema["properties"]["summaries"]["items"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        SummaryKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
    );
    let qualities: Vec<&str> = schema["properties"]["quality"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(qualities, ["economy", "balanced", "best"]);
    let formats: Vec<&str> = schema["properties"]["transcript_format"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(formats, TranscriptFormat::ALL.map(TranscriptFormat::as_str));
    assert_eq!(
        schema["properties"]["version"]["const"],
        json!(SCHEMA_VERSION)
    );
    assert_eq!(
        schema["required"],
        json!(["version", "job_id", "tenant", "transcript"])
    );
    // The sample job in the repo is valid for the parser.
    let sample = include_bytes!("../../../samples/incident-retro.json");
    parse_job(sample, &Limits::default()).unwrap();
}

// --- gateway submissions -------------------------------------------------

fn submit(v: &Value) -> Result<Job, SubmissionError> {
    let bytes = serde_json::to_vec(v).unwrap();
    parse_submission(&bytes, "acme", Uuid::from_u128(7), &Limits::default())
}

#[test]
fn a_submission_takes_the_callers_tenant_and_fills_the_defaults() {
    let mut v = good();
    let o = v.as_object_mut().unwrap();
    o.remove("tenant");
    o.remove("version");
    o.remove("job_id");
    let job = submit(&v).unwrap();
    assert_eq!(job.tenant, "acme");
    assert_eq!(job.version, 1);
    assert_eq!(job.job_id, Uuid::from_u128(7));
}

#[test]
fn a_submission_naming_its_own_tenant_and_id_keeps_them() {
    let mut v = good();
    v["tenant"] = json!("acme");
    let id = v["job_id"].as_str().unwrap().parse::<Uuid>().unwrap();
    let job = submit(&v).unwrap();
    assert_eq!((job.tenant.as_str(), job.job_id), ("acme", id));
}

#[test]
fn a_submission_naming_another_tenant_is_refused() {
    let mut v = good();
    v["tenant"] = json!("globex");
    assert_eq!(submit(&v), Err(SubmissionError::TenantMismatch));
    // A non-string tenant is not a claim to another tenant: it is replaced.
    v["tenant"] = json!(42);
    assert_eq!(submit(&v).unwrap().tenant, "acme");
}

#[test]
fn submissions_that_are_not_jobs_say_why() {
    let lim = Limits::default();
    let id = Uuid::from_u128(1);
    assert_eq!(
        parse_submission(b"[1,2]", "acme", id, &lim),
        Err(SubmissionError::NotAnObject)
    );
    let code = |bytes: &[u8]| match parse_submission(bytes, "acme", id, &lim) {
        Err(SubmissionError::Rejected(r)) => r.code,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(b"\xff\xfe"), RejectCode::InvalidUtf8);
    assert_eq!(code(b"{"), RejectCode::InvalidJson);
    assert_eq!(code(b"{}"), RejectCode::MissingField);
}

#[test]
fn a_message_too_big_to_be_a_job_is_refused_before_it_is_parsed() {
    let limits = Limits {
        max_transcript_bytes: 1000,
        ..Limits::default()
    };
    // Not even JSON: the size is checked first.
    let big = vec![b'['; limits.max_message_bytes() + 1];
    let r = parse_job(&big, &limits).unwrap_err();
    assert_eq!(r.code, RejectCode::TranscriptTooLarge);
    assert!(
        r.message.contains("the largest a job may be"),
        "{}",
        r.message
    );
    match parse_submission(&big, "acme", Uuid::from_u128(1), &limits) {
        Err(SubmissionError::Rejected(r)) => assert_eq!(r.code, RejectCode::TranscriptTooLarge),
        other => panic!("{other:?}"),
    }
    // At the limit it is parsed (and refused for what it is).
    let r = parse_job(&big[..limits.max_message_bytes()], &limits).unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidJson);
}

// --- transcript formats in jobs --------------------------------------------

fn sample_format(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../samples/formats")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn a_job_takes_a_transcript_file_as_text_or_json_and_keeps_no_format_field() {
    let mut v = good();
    v["transcript"] = json!(sample_format("teams.vtt"));
    let job = parse_job_value(&v, &Limits::default()).unwrap();
    assert_eq!(job.transcript[0].speaker.as_deref(), Some("Priya Raman"));
    assert_eq!(job.transcript[0].start_s, Some(1.12));
    // Named, the format is not detected.
    v["transcript_format"] = json!("webvtt");
    assert_eq!(
        parse_job_value(&v, &Limits::default()).unwrap().transcript,
        job.transcript
    );
    // Whisper's JSON as an object.
    let mut v = good();
    v["transcript"] = serde_json::from_str(&sample_format("whisperx.json")).unwrap();
    let job = parse_job_value(&v, &Limits::default()).unwrap();
    assert_eq!(job.transcript.len(), 3);
    assert_eq!(job.transcript[1].speaker.as_deref(), Some("SPEAKER_01"));
    // What is re-published is recap's own utterance list: it parses again
    // to the same job.
    let again = parse_job(&job.to_json(), &Limits::default()).unwrap();
    assert_eq!(again, job);
    assert!(!String::from_utf8(job.to_json())
        .unwrap()
        .contains("transcript_format"));
    // A diarized list, detected by its `start`/`end` keys.
    let mut v = good();
    v["transcript"] = serde_json::from_str(&sample_format("diarized.json")).unwrap();
    assert_eq!(
        parse_job_value(&v, &Limits::default())
            .unwrap()
            .transcript
            .len(),
        3
    );
}

#[test]
fn a_bad_transcript_file_or_format_name_is_refused_with_its_code() {
    let mut v = good();
    v["transcript_format"] = json!("docx");
    let r = reject(v);
    assert_eq!(r.code, RejectCode::UnknownTranscriptFormat);
    assert_eq!(r.field.as_deref(), Some("transcript_format"));
    assert!(r.message.contains("webvtt"), "{}", r.message);

    let mut v = good();
    v["transcript"] = json!("WEBVTT\n\n00:01.000 --> 00:00.500\nhi\n");
    let r = reject(v);
    assert_eq!(r.code, RejectCode::MalformedTranscript);
    assert_eq!(r.field.as_deref(), Some("transcript"));
    assert!(r.message.contains("line 3"), "{}", r.message);

    let mut v = good();
    v["transcript"] = json!({"segments": [{"start": 1.0, "end": 2.0}]});
    assert_eq!(reject(v).code, RejectCode::MalformedTranscript);
    // An object that is no known file is a mistyped transcript.
    let mut v = good();
    v["transcript"] = json!({"minutes": "x"});
    assert_eq!(reject(v).code, RejectCode::InvalidField);
    // The size limit holds on what a file turns into.
    let mut v = good();
    v["transcript"] = json!({"segments": [{"start": 0, "end": 1, "text": "x".repeat(2000)}]});
    let small = Limits {
        max_transcript_bytes: 1000,
        ..Limits::default()
    };
    let r = parse_job_value(&v, &small).unwrap_err();
    assert_eq!(r.code, RejectCode::TranscriptTooLarge);
}

#[test]
fn what_a_file_turns_into_is_checked_as_a_jobs_own_utterances() {
    // A NUL that only appears once the file's JSON is read.
    let mut v = good();
    v["transcript"] = json!("{\"segments\":[{\"start\":0,\"end\":1,\"text\":\"a\\u0000b\"}]}");
    let r = reject(v);
    assert_eq!(r.code, RejectCode::InvalidField);
    assert!(r.message.contains("NUL"), "{}", r.message);
    // Speakers come out as a job's own: trimmed, none when empty; the job
    // survives its own serialization.
    let mut v = good();
    v["transcript"] = json!([{"speaker": "  ", "start": 0, "end": 1, "text": "x"},
                             {"speaker": " Bo ", "start": 1, "end": 2, "text": "y"}]);
    let job = parse_job_value(&v, &Limits::default()).unwrap();
    assert_eq!(job.transcript[0].speaker, None);
    assert_eq!(job.transcript[1].speaker.as_deref(), Some("Bo"));
    assert_eq!(parse_job(&job.to_json(), &Limits::default()).unwrap(), job);
    // Text that JSON escapes grows six-fold as utterances: refused where
    // the re-published job would not fit a message.
    let mut v = good();
    v["transcript"] = json!(format!(
        "WEBVTT\n\n00:01.000 --> 00:02.000\n<v A>{}\n",
        "\u{1}".repeat(1900)
    ));
    let small = Limits {
        max_transcript_bytes: 4000,
        ..Limits::default()
    };
    let r = parse_job_value(&v, &small).unwrap_err();
    assert_eq!(r.code, RejectCode::TranscriptTooLarge, "{}", r.message);
    assert!(r.message.contains("as utterances"), "{}", r.message);
    // The peek reads ids without the transcript.
    let body = br#"{"job_id": "6f1c1c8e-3f7a-4d5e-9d43-2a7e0f1b2c3d", "tenant": "acme", "transcript": {"segments": 5}}"#;
    let (id, tenant) = peek_ids(body, &Limits::default());
    assert_eq!(
        id.map(|u| u.to_string()).as_deref(),
        Some("6f1c1c8e-3f7a-4d5e-9d43-2a7e0f1b2c3d")
    );
    assert_eq!(tenant.as_deref(), Some("acme"));
    assert_eq!(peek_ids(b"nope", &Limits::default()), (None, None));
}

#[test]
fn a_kinds_wire_name_is_its_specs_and_its_serde_name() {
    let mut files = std::collections::BTreeSet::new();
    for kind in SummaryKind::ALL {
        let spec = kind.spec();
        assert_eq!(kind.as_str(), spec.name);
        assert_eq!(SummaryKind::parse(spec.name), Some(kind));
        assert_eq!(serde_json::to_value(kind).unwrap(), json!(spec.name));
        assert!(spec.max_output_tokens > 0, "{kind}");
        assert!(
            files.insert(spec.prompt_file),
            "{kind} shares its prompt file"
        );
    }
    assert_eq!(SummaryKind::parse("minutes"), None);
}
