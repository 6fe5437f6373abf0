//! `recap eval` end to end on three QMSum cases with the real compact model,
//! and `recap rouge` on a pair of files.

mod common;

use std::process::Command;

#[test]
fn eval_runs_three_cases_with_the_real_compact_model_and_resumes() {
    let out = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(common::bin())
            .args([
                "eval",
                "--dataset",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../tests/fixtures/qmsum/tiny3.jsonl"
                ),
            ])
            .args(["--models", "smollm2-135m-instruct-q4_1", "--out"])
            .arg(out.path())
            .env_remove("RECAP_CONFIG")
            .output()
            .unwrap()
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(err.contains("0 cached, 3 to run"), "{err}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let rows = results["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lead-60", "smollm2-135m-instruct-q4_1"]);
    for r in rows {
        assert_eq!(r["cases"], 3);
        let l = &r["rouge_l"];
        let (lo, m, hi) = (
            l["low"].as_f64().unwrap(),
            l["mean"].as_f64().unwrap(),
            l["high"].as_f64().unwrap(),
        );
        assert!(m > 0.0 && m < 1.0 && lo <= hi, "{r}");
    }
    assert!(rows[1]["total_cost_usd"].as_f64().unwrap() > 0.0);
    assert!(rows[1]["mean_input_tokens"].as_f64().unwrap() > 50.0);
    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(md.contains("| smollm2-135m-instruct-q4_1 | 3 |"), "{md}");
    let svg = std::fs::read_to_string(out.path().join("frontier.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 2);

    // A second run finds every case in the cache and runs nothing.
    let second = run();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        second.status.success() && err.contains("3 cached, 0 to run"),
        "{err}"
    );
}

#[test]
fn rouge_scores_a_pair_of_files_as_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ref.txt"), "the cat sat on the mat").unwrap();
    std::fs::write(dir.path().join("cand.txt"), "the cat sat on a mat").unwrap();
    let out = Command::new(common::bin())
        .args(["rouge", "--json", "--stemmer", "--reference"])
        .arg(dir.path().join("ref.txt"))
        .arg("--candidate")
        .arg(dir.path().join("cand.txt"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 5 of 6 unigrams match: P = R = F = 5/6.
    assert!(
        (v["rouge1"]["fmeasure"].as_f64().unwrap() - 5.0 / 6.0).abs() < 1e-9,
        "{v}"
    );
    for k in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
        for m in ["precision", "recall", "fmeasure"] {
            assert!(v[k][m].is_f64(), "{k}.{m} in {v}");
        }
    }
}

// A company's own references (the JSONL `recap train` reads) go through the
// same eval with two tiers: the routers' rows are written, the per-case
// calibration lines too, and a set too small to calibrate says so instead
// of failing the run.
#[test]
fn eval_reads_a_companys_references_and_routes_between_two_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("refs.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"id": "a", "transcript": "Maria: We launch on Friday.\nTom: I will tell marketing today.", "kind": "short", "target": "The launch is on Friday; Tom tells marketing."}"#,
            "\n",
            r#"{"id": "b", "transcript": "Chen: Cloud spend is eight percent over.\nSofia: Shut the cluster down at night.", "query": "What did Sofia suggest?", "target": "Sofia suggested shutting the analytics cluster down at night."}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = Command::new(common::bin())
        .args(["eval", "--dataset", &format!("jsonl:{}", data.display())])
        .args([
            "--models",
            "smollm2-135m-instruct-q4_1,extractive-lead",
            "--out",
        ])
        .arg(&out)
        .env_remove("RECAP_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for row in [
        "| policy ",
        "| length threshold, same cost | 2 |",
        "| random router, same cost | 2 |",
        "| oracle (better of the two per case) | 2 |",
    ] {
        assert!(md.contains(row), "{row} missing:\n{md}");
    }
    assert!(
        md.contains("not fitted: calibration needs at least 20 labelled cases, got 2"),
        "{md}"
    );
    let lines = std::fs::read_to_string(out.join("cases.jsonl")).unwrap();
    let cases: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cases.len(), 2);
    let short = cases.iter().find(|c| c["id"] == "a").unwrap();
    assert_eq!(short["signals"]["kind"], "short");
    assert_eq!(short["signals"]["query_words"], 0);
    assert!(short["signals"]["mean_logprob"]
        .as_f64()
        .is_some_and(|l| l < 0.0));
    let asked = cases.iter().find(|c| c["id"] == "b").unwrap();
    assert_eq!(asked["signals"]["query_words"], 4);
    // A line without a target is refused, naming the line.
    std::fs::write(&data, "{\"transcript\": \"A: hi\", \"kind\": \"short\"}\n").unwrap();
    let bad = Command::new(common::bin())
        .args(["eval", "--dataset", &format!("jsonl:{}", data.display())])
        .args(["--models", "smollm2-135m-instruct-q4_1", "--out"])
        .arg(&out)
        .env_remove("RECAP_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("line 1"), "{err}");
}
