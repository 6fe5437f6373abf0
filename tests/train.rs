//! `recap train` end to end: shadow outputs of real jobs train the compact
//! tier (the data flywheel), a run killed with SIGKILL resumes on the same
//! loss curve, and bad data is refused with its line named and nothing
//! written.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

const COMPACT: &str = "smollm2-135m-instruct-q4_1";
const LARGE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m";

fn run_ok(out: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{what} failed:\n{err}");
    err
}

fn report(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("train.json")).expect("train.json");
    serde_json::from_str(&text).expect("train.json is JSON")
}

fn losses(report: &serde_json::Value) -> Vec<f64> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["loss"].as_f64().expect("loss"))
        .collect()
}

// Jobs run with shadow sampling on every job: the large tier's shadow
// summaries are stored with their transcripts, and `recap train --data
// shadow` trains an adapter from exactly those pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_outputs_of_real_jobs_train_the_compact_tier() {
    let mut env = TestEnv::new("train_shadow").await;
    env.migrate();
    let policy = shadow_every_job_policy(env.dir.path());
    let vars = [
        ("RECAP_COMPACT_MODEL", COMPACT),
        ("RECAP_LARGE_MODEL", LARGE),
        ("RECAP_POLICY", policy.to_str().unwrap()),
    ];
    env.spawn(&["router"], &vars);
    env.spawn(&["worker", "--tier", "compact"], &vars);
    env.spawn(&["worker", "--tier", "large"], &vars);
    let conn = env.amqp().await;
    let ch = confirm_channel(&conn).await;
    for _ in 0..2 {
        let id = uuid::Uuid::new_v4();
        publish(
            &ch,
            "ingest",
            &job_json(id, "acme", &["short"]),
            Some(&id.to_string()),
        )
        .await;
    }
    let shadows = env
        .wait_count(
            "SELECT count(*) FROM summaries s JOIN shadow_transcripts t USING (job_id) WHERE s.shadow",
            2,
            Duration::from_secs(400),
        )
        .await;
    assert_eq!(shadows, 2, "logs:\n{}", env.logs());

    let out_dir = env.dir.path().join("run");
    let err = run_ok(
        env.command(&[
            "train",
            "--model",
            COMPACT,
            "--data",
            "shadow:acme",
            "--out",
            out_dir.to_str().unwrap(),
            "--grad-accum",
            "1",
            "--rank",
            "4",
        ])
        .output()
        .unwrap(),
        "recap train --data shadow",
    );
    let r = report(&out_dir);
    assert_eq!(r["config"]["data"][0]["spec"], "shadow:acme", "{err}");
    assert_eq!(r["config"]["data"][0]["examples"], 2, "{err}");
    assert_eq!(r["examples"], 2, "{err}");
    let l = losses(&r);
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|x| x.is_finite() && *x > 0.0), "{l:?}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "recap_adapter.json",
    ] {
        assert!(out_dir.join("adapter").join(f).exists(), "{f}");
    }
    // Another tenant has no shadow pairs: a clear refusal.
    let none = env
        .command(&[
            "train",
            "--model",
            COMPACT,
            "--data",
            "shadow:nobody",
            "--out",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no shadow summaries"));
}

/// A small JSONL of real transcripts (the samples) with short targets.
fn write_data(path: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples");
    let mut lines = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    names.sort();
    for (i, p) in names.iter().enumerate() {
        let text = std::fs::read_to_string(p).unwrap();
        let short: String = text.lines().take(6).collect::<Vec<_>>().join("\n");
        for (kind, target) in [
            ("short", "The team agreed on the plan and named owners."),
            ("decisions", "- The plan was approved."),
        ] {
            lines.push(serde_json::json!({
                "transcript": short, "kind": kind, "target": target, "id": format!("s{i}-{kind}")
            }).to_string());
        }
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

fn train_cmd(env: &TestEnv, data: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut args = vec![
        "train",
        "--model",
        COMPACT,
        "--data",
        "",
        "--out",
        out.to_str().unwrap(),
        "--grad-accum",
        "1",
        "--rank",
        "4",
        "--epochs",
        "2",
        "--checkpoint-every",
        "1",
    ];
    let spec = format!("jsonl:{}", data.display());
    args[4] = &spec;
    args.extend_from_slice(extra);
    env.command(&args)
}

// SIGKILL in the middle of a run, then --resume: the curve and the adapter
// are the uninterrupted run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_way_resumes_on_the_same_curve() {
    let env = TestEnv::new("train_resume").await;
    let data = env.dir.path().join("data.jsonl");
    write_data(&data);
    let whole = env.dir.path().join("whole");
    run_ok(
        train_cmd(&env, &data, &whole, &[]).output().unwrap(),
        "uninterrupted run",
    );
    let whole_report = report(&whole);
    let steps = losses(&whole_report).len();
    assert!(steps >= 6, "{steps} steps");

    let cut = env.dir.path().join("cut");
    let mut child = train_cmd(&env, &data, &cut, &[])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = cut.join("checkpoints/latest");
    let started = Instant::now();
    loop {
        let at = std::fs::read_to_string(&latest).unwrap_or_default();
        if at.trim() >= "step-0000002" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!cut.join("train.json").exists());
    let err = run_ok(
        train_cmd(&env, &data, &cut, &["--resume"])
            .output()
            .unwrap(),
        "resumed run",
    );
    let resumed = report(&cut);
    assert!(resumed["resumed_from_step"].as_u64().is_some(), "{err}");
    assert_eq!(losses(&resumed), losses(&whole_report));
    assert_eq!(
        std::fs::read(cut.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter/adapter_model.safetensors")).unwrap()
    );
    // A resume with another config is refused, naming what differs.
    let other = train_cmd(&env, &data, &cut, &["--resume", "--lr", "1e-3"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    let e = String::from_utf8_lossy(&other.stderr);
    assert!(e.contains("differing keys: lr"), "{e}");
}

// `--init-adapter` starts a run from a trained adapter: its first step's
// loss is below a fresh start's on the same first batch, train.json names
// the adapter and its sha256, and an adapter of another scale is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_starts_from_a_trained_adapter() {
    let env = TestEnv::new("train_init_adapter").await;
    let data = env.dir.path().join("data.jsonl");
    write_data(&data);
    let first = env.dir.path().join("first");
    run_ok(
        train_cmd(&env, &data, &first, &["--lr", "2e-3"])
            .output()
            .unwrap(),
        "first run",
    );
    let adapter = first.join("adapter");
    let init = adapter.to_str().unwrap();
    let second = env.dir.path().join("second");
    run_ok(
        train_cmd(&env, &data, &second, &["--init-adapter", init])
            .output()
            .unwrap(),
        "run from the first run's adapter",
    );
    let (fresh, started) = (report(&first), report(&second));
    let (l0_fresh, l0_started) = (losses(&fresh)[0], losses(&started)[0]);
    assert!(
        l0_started < 0.9 * l0_fresh,
        "first loss {l0_started} from the adapter, {l0_fresh} fresh"
    );
    let recorded = &started["config"]["init_adapter"];
    assert_eq!(recorded["dir"].as_str(), Some(init));
    let weights = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&weights));
    assert_eq!(recorded["sha256"].as_str(), Some(sha.as_str()));
    assert!(fresh["config"].get("init_adapter").is_none());

    let other = train_cmd(
        &env,
        &data,
        &env.dir.path().join("third"),
        &["--init-adapter", init, "--alpha", "8"],
    )
    .output()
    .unwrap();
    assert!(!other.status.success());
    let e = String::from_utf8_lossy(&other.stderr);
    assert!(
        e.contains(init) && e.contains("scale (alpha / rank): the adapter's is 8, this run's 2"),
        "{e}"
    );
}

// --max-target-copy: an example whose target copies a transcript line is
// left out, counted under its reason, and the share is in the run's config;
// without the flag the same example trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_copy_the_transcript_are_left_out_and_counted() {
    let env = TestEnv::new("train_copy").await;
    let data = env.dir.path().join("data.jsonl");
    write_data(&data);
    let copying = serde_json::json!({
        "transcript": "Sofia: Yes, that would save about thirty percent of its cost.\nChen: Good.",
        "kind": "short",
        "target": "Sofia said that would save about thirty percent of its cost.",
        "id": "copies",
    });
    // Half its sentences copied: at the limit, so kept.
    let half = serde_json::json!({
        "transcript": "Omar: I will have numbers by Thursday for the old backups.\nChen: Good.",
        "kind": "short",
        "target": "Omar: I will have numbers by Thursday for the old backups. Chen agreed.",
        "id": "half",
    });
    let mut text = std::fs::read_to_string(&data).unwrap();
    for line in [&copying, &half] {
        text.push('\n');
        text.push_str(&line.to_string());
    }
    std::fs::write(&data, text).unwrap();
    let kept = |dir: &Path, extra: &[&str]| {
        run_ok(train_cmd(&env, &data, dir, extra).output().unwrap(), "run");
        report(dir)
    };
    let strict = kept(
        &env.dir.path().join("strict"),
        &["--max-target-copy", "0.5"],
    );
    let reason = "target copies over --max-target-copy 0.5";
    assert_eq!(
        strict["skipped"][reason].as_u64(),
        Some(1),
        "{}",
        strict["skipped"]
    );
    assert_eq!(strict["config"]["max_target_copy"].as_f64(), Some(0.5));
    let all = kept(&env.dir.path().join("all"), &[]);
    assert!(all["skipped"].get(reason).is_none(), "{}", all["skipped"]);
    assert!(all["config"].get("max_target_copy").is_none());
    assert_eq!(
        all["examples"].as_u64().map(|n| n - 1),
        strict["examples"].as_u64(),
        "{} against {}",
        all["examples"],
        strict["examples"]
    );

    let bad = train_cmd(
        &env,
        &data,
        &env.dir.path().join("bad"),
        &["--max-target-copy", "2"],
    )
    .output()
    .unwrap();
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(
        e.contains("--max-target-copy") && e.contains("not a share in [0, 1]"),
        "{e}"
    );
}

// Bad data: a line that is not JSON, a line without a target, an empty
// file, examples all longer than the limit. Each is refused with the file
// and line named, and no output directory is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_training_data_is_refused_naming_the_line() {
    let env = TestEnv::new("train_bad").await;
    let cases = [
        (
            "{\"transcript\": \"A: hi\", \"target\": \"x\"}\nnot json\n",
            "line 2",
        ),
        ("{\"transcript\": \"A: hi\"}\n", "line 1"),
        ("\n", "no examples"),
        (
            "{\"transcript\": \"A: hi there\", \"target\": \"x\"}\n",
            "every example was skipped",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let data = env.dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&data, text).unwrap();
        let out = env.dir.path().join(format!("out{i}"));
        let run = train_cmd(&env, &data, &out, &["--max-seq-len", "8"])
            .output()
            .unwrap();
        assert!(!run.status.success(), "case {i} ran");
        let e = String::from_utf8_lossy(&run.stderr);
        assert!(e.contains(want), "case {i}: {e}");
        if i < 3 {
            assert!(e.contains(&format!("bad{i}.jsonl")), "case {i}: {e}");
        }
        assert!(
            !out.join("adapter").exists() && !out.join("train.json").exists(),
            "case {i}"
        );
    }
}

// A full disk while checkpointing: the write fails with a clear error, the
// previous checkpoint stays whole and `latest` names it, nothing half
// written is left, and a later --resume goes on from it. The full disk is
// a file-size limit (RLIMIT_FSIZE) on the resumed run, with SIGXFSZ
// ignored so that the write returns the error, as ENOSPC would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_checkpointing_keeps_the_previous_checkpoint() {
    use std::os::unix::process::CommandExt;
    let env = TestEnv::new("train_full_disk").await;
    let data = env.dir.path().join("data.jsonl");
    write_data(&data);
    let out = env.dir.path().join("run");
    run_ok(
        train_cmd(&env, &data, &out, &["--stop-after", "2"])
            .output()
            .unwrap(),
        "the first two steps",
    );
    let ckpt = out.join("checkpoints");
    let latest = || std::fs::read_to_string(ckpt.join("latest")).unwrap();
    assert_eq!(latest().trim(), "step-0000002");
    let files = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = files(&ckpt.join("step-0000002"));
    let tensors = before
        .iter()
        .map(|(_, b)| b.len())
        .max()
        .expect("checkpoint files");

    let mut full = train_cmd(&env, &data, &out, &["--resume"]);
    // Small files still fit; the checkpoint's tensors do not.
    let limit = (tensors / 2) as libc::rlim_t;
    unsafe {
        full.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let l = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let failed = full.output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr).to_string();
    assert!(!failed.status.success(), "the run went on:\n{err}");
    assert!(
        err.contains("checkpoint") && err.contains("File too large"),
        "{err}"
    );
    assert_eq!(latest().trim(), "step-0000002", "{err}");
    assert_eq!(files(&ckpt.join("step-0000002")), before);
    let left: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["latest", "step-0000002"], "half-written files left");
    assert!(!out.join("train.json").exists());

    // With room again, the run goes on from the checkpoint it kept.
    run_ok(
        train_cmd(&env, &data, &out, &["--resume"])
            .output()
            .unwrap(),
        "the resumed run",
    );
    assert_eq!(report(&out)["resumed_from_step"], 2);
}
