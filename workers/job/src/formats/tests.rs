use super::*;
use proptest::prelude::*;

fn sample(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../samples/formats")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn speakers(u: &[Utterance]) -> Vec<Option<&str>> {
    u.iter().map(|u| u.speaker.as_deref()).collect()
}

#[test]
fn each_sample_is_detected_as_its_format() {
    for (file, want) in [
        ("teams.vtt", TranscriptFormat::WebVtt),
        ("zoom.vtt", TranscriptFormat::WebVtt),
        ("meeting.srt", TranscriptFormat::Srt),
        ("whisper.json", TranscriptFormat::Whisper),
        ("whisperx.json", TranscriptFormat::Whisper),
        ("aws-transcribe.json", TranscriptFormat::AwsTranscribe),
        ("diarized.json", TranscriptFormat::Diarized),
    ] {
        assert_eq!(detect_text(&sample(file)), want, "{file}");
    }
    assert_eq!(detect_text("Alice: hi\nBob: hello"), TranscriptFormat::Text);
    assert_eq!(detect_text("[not json"), TranscriptFormat::Text);
    assert_eq!(
        detect_text(r#"[{"speaker": "A", "text": "hi"}]"#),
        TranscriptFormat::Utterances
    );
    // A line that merely starts with the word is not a signature.
    assert_eq!(detect_text("WEBVTTX\n"), TranscriptFormat::Text);
    assert_eq!(
        detect_text("\u{feff}WEBVTT\n\n00:01.000 --> 00:02.000\nx\n"),
        TranscriptFormat::WebVtt
    );
    // The signature alone, with no cue, is no caption file to detect.
    assert_eq!(detect_text("WEBVTT\n"), TranscriptFormat::Text);
}

#[test]
fn a_teams_export_reads_as_turns_with_voices_times_and_no_markup() {
    let u = parse_text(&sample("teams.vtt"), None).unwrap();
    assert_eq!(
        speakers(&u),
        [
            Some("Priya Raman"),
            Some("Marcus Lee"),
            Some("Priya Raman"),
            Some("Dana Okafor"),
            Some("Marcus Lee")
        ]
    );
    // Priya's two first cues are one turn, from the first start to the
    // second end.
    assert_eq!(
        u[0].text,
        "Morning everyone. Let's go through the launch plan for the mobile app. We said last week that the beta ships on the twelfth."
    );
    assert_eq!((u[0].start_s, u[0].end_s), (Some(1.12), Some(8.01)));
    // A two-line cue is one text; entities are decoded; tags are gone.
    assert_eq!(
        u[1].text,
        "The payments screen still crashes on older Android phones, so I'd rather move the beta to the nineteenth."
    );
    assert_eq!(
        u[2].text,
        "Okay. Then we move the beta to the nineteenth & tell support today."
    );
    assert_eq!(
        u[3].text,
        "I'll write the note to support and update the release calendar."
    );
    assert_eq!(u[4].text, "I'll have a fix for the crash by Friday.");
    assert_eq!(u[4].end_s, Some(27.15));
    // NOTE blocks are not text.
    assert!(u.iter().all(|t| !t.text.contains("Exported")));
}

#[test]
fn zoom_and_srt_name_speakers_in_the_text() {
    let u = parse_text(&sample("zoom.vtt"), None).unwrap();
    assert_eq!(
        speakers(&u),
        [Some("Priya Raman"), Some("Marcus Lee"), Some("Priya Raman")]
    );
    assert_eq!(
        u[1].text,
        "The payments screen still crashes on older Android phones. I'd rather move the beta to the nineteenth."
    );
    assert_eq!((u[1].start_s, u[1].end_s), (Some(4.1), Some(11.25)));

    let u = parse_text(&sample("meeting.srt"), None).unwrap();
    assert_eq!(
        speakers(&u),
        [Some("Priya Raman"), Some("Marcus Lee"), Some("Priya Raman")]
    );
    // `{\an8}`, `<i>` and `<font>` are stripped; CRLF line ends are read.
    assert_eq!(
        u[0].text,
        "Morning everyone. Let's go through the launch plan."
    );
    assert_eq!(
        u[1].text,
        "The payments screen still crashes on older Android phones."
    );
    assert_eq!(u[2].text, "Then the beta moves to the nineteenth.");
    assert_eq!((u[0].start_s, u[2].end_s), (Some(1.0), Some(12.0)));
}

#[test]
fn asr_json_reads_segments_speakers_and_words() {
    let u = parse_text(&sample("whisper.json"), None).unwrap();
    // Three spoken segments (the silent one is dropped), no speakers.
    assert_eq!(u.len(), 3);
    assert!(u.iter().all(|t| t.speaker.is_none()));
    assert_eq!(
        u[0].text,
        "Morning everyone. Let's go through the launch plan."
    );
    assert_eq!((u[2].start_s, u[2].end_s), (Some(8.3), Some(11.0)));

    let u = parse_text(&sample("whisperx.json"), None).unwrap();
    assert_eq!(
        speakers(&u),
        [Some("SPEAKER_00"), Some("SPEAKER_01"), Some("SPEAKER_00")]
    );
    assert_eq!(
        u[1].text,
        "The payments screen still crashes on older Android phones. So I'd rather move the beta."
    );

    let u = parse_text(&sample("aws-transcribe.json"), None).unwrap();
    assert_eq!(speakers(&u), [Some("spk_0"), Some("spk_1"), Some("spk_0")]);
    assert_eq!(
        u[1].text,
        "The payments screen still crashes on older Android phones, so I'd rather move the beta."
    );
    assert_eq!(u[0].start_s, Some(0.44));
    assert_eq!(u[2].text, "Agreed. The beta moves to the nineteenth.");

    let u = parse_text(&sample("diarized.json"), None).unwrap();
    assert_eq!(
        speakers(&u),
        [Some("Priya Raman"), Some("Marcus Lee"), Some("Priya Raman")]
    );
    assert_eq!((u[1].start_s, u[1].end_s), (Some(4.1), Some(11.25)));
}

#[test]
fn aws_items_with_their_own_speaker_labels_and_none_at_all() {
    let word = |t: &str, c: &str, s: Option<&str>| {
        let mut v = serde_json::json!({"start_time": t, "end_time": t,
            "alternatives": [{"confidence": "0.9", "content": c}], "type": "pronunciation"});
        if let Some(s) = s {
            v["speaker_label"] = s.into();
        }
        v
    };
    let stop = serde_json::json!({"alternatives": [{"content": "."}], "type": "punctuation"});
    let doc = serde_json::json!({"results": {"items": [
        word("1.0", "Hello", Some("spk_0")), stop.clone(),
        word("2.0", "Hi", Some("spk_1")), stop.clone(),
    ]}});
    let u = parse_value(&doc, None).unwrap();
    assert_eq!(speakers(&u), [Some("spk_0"), Some("spk_1")]);
    assert_eq!(u[0].text, "Hello.");
    // Without labels, a turn ends with its sentence.
    let doc = serde_json::json!({"results": {"items": [
        word("1.0", "Ship", None), word("1.5", "it", None), stop.clone(),
        word("2.0", "Agreed", None), stop,
    ]}});
    let u = parse_value(&doc, None).unwrap();
    let texts: Vec<&str> = u.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(texts, ["Ship it.", "Agreed."]);
}

#[test]
fn voices_several_to_a_cue_and_classes_are_read() {
    let vtt = "WEBVTT\n\n00:01.000 --> 00:02.000\n<v.loud Alice>Stop!</v> <v Bob>Why?</v>\n\n00:02.000 --> 00:03.000\n<v Bob>Because.\n";
    let u = parse_text(vtt, None).unwrap();
    assert_eq!(speakers(&u), [Some("Alice"), Some("Bob")]);
    assert_eq!(u[1].text, "Why? Because.");
    // A tag that starts with v but is no voice stays markup.
    let vtt = "WEBVTT\n\n00:01.000 --> 00:02.000\n<vid>x</vid> plain\n";
    let u = parse_text(vtt, None).unwrap();
    assert_eq!(u[0].text, "x plain");
    assert_eq!(u[0].speaker, None);
}

#[test]
fn markup_is_stripped_and_text_kept() {
    for (raw, want) in [
        ("<b>bold</b> and <i>it</i>", "bold and it"),
        ("{\\an8}top", "top"),
        ("a &lt; b &amp;&amp; c &gt; d", "a < b && c > d"),
        ("x < y", "x < y"),
        ("5 & 6", "5 & 6"),
        ("&unknown; stays", "&unknown; stays"),
        ("<c.yellow>col</c> <00:00:01.000>karaoke", "col karaoke"),
        ("{not an override}", "{not an override}"),
        ("unclosed <i", "unclosed <i"),
        ("  many \n  spaces ", "many spaces"),
    ] {
        assert_eq!(strip_markup(raw), want, "{raw}");
    }
}

#[test]
fn malformed_files_are_refused_with_where_and_why() {
    let cases: [(&str, Option<TranscriptFormat>, &str); 10] = [
        (
            "WEBVTT\n\n00:01.000 --> 00:0x.000\nhello\n",
            None,
            "webvtt line 3: `00:0x.000` is not a timestamp",
        ),
        (
            "WEBVTT\n\n00:05.000 --> 00:01.000\nhello\n",
            None,
            "webvtt line 3: the cue ends (1 s) before it starts (5 s)",
        ),
        (
            "WEBVTT\n\n00:01.000 --> 00:02.000\n<v Alice></v>\n",
            None,
            "webvtt line 3: a cue without text",
        ),
        (
            "WEBVTT\n\n00:01.000 --> 00:02.000\nok\n\n00:03.000 --> 00:0400\nbad\n",
            None,
            "webvtt line 6: `00:0400` is not a timestamp",
        ),
        (
            "not vtt at all",
            Some(TranscriptFormat::WebVtt),
            "webvtt line 1: a WebVTT file starts with `WEBVTT`",
        ),
        (
            "1\n00:00:01,000 --> 00:00:02,000\n\n2\n00:00:03,000 --> 00:00:04,000\nhi\n",
            None,
            "srt line 2: a cue without text",
        ),
        (
            "1\n00:00:01,000 --> 00:00:02,000\nhi\n\n2\n00:00:03 --> 00:00:04,000\nho\n",
            None,
            "srt line 6: `00:00:03` is not a timestamp",
        ),
        (
            r#"{"segments": [{"start": 0, "end": 1}]}"#,
            None,
            "whisper segments[0].text: is required",
        ),
        (
            r#"{"segments": [{"start": -1, "end": 1, "text": "x"}]}"#,
            None,
            "whisper segments[0].start: must be a non-negative number of seconds",
        ),
        (
            r#"[{"speaker": "A", "start": 3, "end": 1, "text": "x"}]"#,
            None,
            "diarized [0].end: ends (1 s) before it starts (3 s)",
        ),
    ];
    for (text, format, want) in cases {
        let e = parse_text(text, format).expect_err(want);
        assert_eq!(e.to_string(), want, "{text}");
    }
    let e = parse_text("{\"results\": {}}", None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "aws_transcribe results.items: is required (a list of words)"
    );
    let e = parse_text("{", Some(TranscriptFormat::Whisper)).unwrap_err();
    assert!(e.to_string().starts_with("whisper line 1: not JSON"), "{e}");
}

#[test]
fn format_names_round_trip() {
    for f in TranscriptFormat::ALL {
        assert_eq!(TranscriptFormat::parse(f.as_str()), Some(f));
    }
    assert_eq!(TranscriptFormat::parse("vtt"), None);
}

/// A cue's text for the round trip: words, no markup characters.
fn words() -> impl Strategy<Value = String> {
    "[A-Za-z][a-z]{0,8}( [a-z]{1,8}){0,6}[.?!]?"
}

proptest! {
    #[test]
    fn no_bytes_make_a_parser_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let text = String::from_utf8_lossy(&bytes);
        for f in TranscriptFormat::ALL {
            let _ = parse_text(&text, Some(f));
        }
        let _ = parse_text(&text, None);
        for prefix in ["WEBVTT\n\n", "1\n00:00:01,000 --> 00:00:02,000\n", "{\"segments\":"] {
            let _ = parse_text(&format!("{prefix}{text}"), None);
        }
        let _ = strip_markup(&text);
    }

    #[test]
    fn a_written_webvtt_file_reads_back(
        cues in proptest::collection::vec((0usize..3, words(), 0u32..5000, 1u32..4000), 1..20)
    ) {
        let names = ["Alice Smith", "Bob", "Carol Jones"];
        let mut vtt = String::from("WEBVTT\n\nNOTE written by the test\n\n");
        let mut t = 0u32;
        let mut want: Vec<Utterance> = Vec::new();
        for (who, text, gap, len) in &cues {
            let (start, end) = (t + gap, t + gap + len);
            t = end;
            let ts = |ms: u32| format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
            vtt.push_str(&format!("{} --> {}\n<v {}>{}</v>\n\n", ts(start), ts(end), names[*who], text));
            want.push(Utterance {
                speaker: Some(names[*who].to_string()),
                start_s: Some(start as f64 / 1000.0),
                end_s: Some(end as f64 / 1000.0),
                text: text.clone(),
            });
        }
        let got = parse_text(&vtt, None).unwrap();
        prop_assert_eq!(got, finish(TranscriptFormat::WebVtt, want).unwrap());
    }
}

#[test]
fn the_review_cases_read_as_meant() {
    // Unclosed `<` and `{\` runs stay text and cost one pass.
    let lt = "<".repeat(200_000);
    assert_eq!(strip_markup(&lt), lt);
    let ov = "{\\".repeat(100_000);
    assert_eq!(strip_markup(&ov), ov);
    // A voice without `</v>` ends at the next voice.
    let u = parse_text(
        "WEBVTT\n\n00:01.000 --> 00:02.000\n<v A>Hi <v B>Hello</v>\n",
        None,
    )
    .unwrap();
    assert_eq!(speakers(&u), [Some("A"), Some("B")]);
    assert_eq!((u[0].text.as_str(), u[1].text.as_str()), ("Hi", "Hello"));
    // Recognizers' words are not markup.
    let u = parse_value(
        &serde_json::json!({"segments": [{"start": 0, "end": 1, "text": " x < 3 and y > 2 &amp; z"}]}),
        None,
    )
    .unwrap();
    assert_eq!(u[0].text, "x < 3 and y > 2 &amp; z");
    // One speaker's turns out of order span from the earliest start to the
    // latest end.
    let u = parse_value(
        &serde_json::json!([{"speaker": "A", "start": 5, "end": 6, "text": "b"},
                            {"speaker": "A", "start": 1, "end": 2, "text": "a"}]),
        None,
    )
    .unwrap();
    assert_eq!((u[0].start_s, u[0].end_s), (Some(1.0), Some(6.0)));
    // Speakers are trimmed, an empty one is none, a huge one refused.
    let vtt = "WEBVTT\n\n00:01.000 --> 00:02.000\n<v &lrm;>x</v>\n";
    assert_eq!(parse_text(vtt, None).unwrap()[0].speaker, None);
    let label = "L".repeat(300);
    let doc = serde_json::json!({"results": {"items": [{"start_time": "1", "end_time": "2",
        "alternatives": [{"content": "hi"}], "type": "pronunciation", "speaker_label": label}]}});
    let e = parse_value(&doc, None).unwrap_err();
    assert!(e.to_string().contains("over 256 bytes"), "{e}");
    let vtt = format!("WEBVTT\n\n00:01.000 --> 00:02.000\n<v {label}>x</v>\n");
    assert!(parse_text(&vtt, None).is_err());
    // Plain text that only looks like a caption file stays text.
    for text in [
        "1\nPlan A --> plan B",
        "WEBVTT is the format we export.\nAlice: fine",
        "[1,2]",
        "\"quoted\"",
    ] {
        assert_eq!(detect_text(text), TranscriptFormat::Text, "{text}");
    }
    // A block without a timing line is skipped, as WebVTT's parser does.
    let u = parse_text(
        "WEBVTT\n\nstray words\n\n00:01.000 --> 00:02.000\nkept\n",
        None,
    )
    .unwrap();
    let texts: Vec<&str> = u.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(texts, ["kept"]);
    // recap's utterances with a stray key stay recap's (and the job parser
    // names the key); diarized segments with numbered speakers and no times
    // are diarized.
    assert_eq!(
        detect_json(&serde_json::json!([{"text": "a", "start_s": 1, "start": 1}])),
        Some(TranscriptFormat::Utterances)
    );
    assert_eq!(
        detect_json(&serde_json::json!([{"speaker": 1, "text": "a", "confidence": 0.9}])),
        Some(TranscriptFormat::Diarized)
    );
}
