//! Checkpoints: the adapters, the optimizer's moments and the run's state,
//! written to a new directory, renamed into place, and only then named by
//! `latest`. A kill or a full disk at any point leaves the previous
//! checkpoint whole and `latest` pointing at it.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {message}")]
    Io { path: String, message: String },
}

fn io(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

const LATEST: &str = "latest";
const STATE: &str = "state.json";
const TENSORS: &str = "tensors.safetensors";

/// Saves `state` (JSON) and `tensors` as checkpoint `step` under `root`,
/// then removes the checkpoints before it. Returns its directory.
pub fn save<S: Serialize>(
    root: &Path,
    step: usize,
    state: &S,
    tensors: &HashMap<String, Tensor>,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let name = format!("step-{step:07}");
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let written = (|| {
        let json = serde_json::to_vec_pretty(state).map_err(|e| io(&tmp, e))?;
        write_synced(&tmp.join(STATE), &json)?;
        let t = tmp.join(TENSORS);
        candle_core::safetensors::save(tensors, &t).map_err(|e| io(&t, e))?;
        std::fs::File::open(&t)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&t, e))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        let latest = root.join(LATEST);
        let latest_tmp = root.join(".latest.tmp");
        write_synced(&latest_tmp, name.as_bytes())?;
        std::fs::rename(&latest_tmp, &latest).map_err(|e| io(&latest, e))
    })();
    if let Err(e) = written {
        // Whatever was half written goes; the previous checkpoint stays.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    for entry in std::fs::read_dir(root).map_err(|e| io(root, e))?.flatten() {
        let n = entry.file_name().to_string_lossy().to_string();
        if n.starts_with("step-") && n < name {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// A checkpoint read back: its directory, state and tensors.
pub type Loaded<S> = (PathBuf, S, HashMap<String, Tensor>);

/// The latest checkpoint under `root`: its state and tensors; None where
/// there is none.
pub fn load<S: for<'de> Deserialize<'de>>(
    root: &Path,
) -> Result<Option<Loaded<S>>, CheckpointError> {
    let latest = root.join(LATEST);
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&latest, e)),
    };
    let dir = root.join(&name);
    let state_path = dir.join(STATE);
    let text = std::fs::read(&state_path).map_err(|e| io(&state_path, e))?;
    let state: S = serde_json::from_slice(&text).map_err(|e| io(&state_path, e))?;
    let t = dir.join(TENSORS);
    let tensors = candle_core::safetensors::load(&t, &Device::Cpu).map_err(|e| io(&t, e))?;
    Ok(Some((dir, state, tensors)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(v: f32) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        m.insert(
            "a".to_string(),
            Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap(),
        );
        m
    }

    #[test]
    fn the_latest_checkpoint_is_read_back_and_older_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load::<u32>(dir.path()).unwrap().is_none());
        save(dir.path(), 5, &5u32, &tensors(1.0)).unwrap();
        let second = save(dir.path(), 10, &10u32, &tensors(2.0)).unwrap();
        let (at, state, t) = load::<u32>(dir.path()).unwrap().unwrap();
        assert_eq!(at, second);
        assert_eq!(state, 10);
        assert_eq!(t["a"].to_vec1::<f32>().unwrap(), vec![2.0, 3.0]);
        let steps: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("step-"))
            .collect();
        assert_eq!(steps, vec!["step-0000010".to_string()]);
    }
}
