//! Small helpers shared by the library and the CLI.

use std::io::Write;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename.
/// A crash leaves either the old file or the new one, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// [`write_atomic`] for a writer that makes the file itself: `write` creates the temporary
/// file it is given (a safetensors serialiser streaming to disk), which is then synced and
/// renamed to `path`, or removed if anything failed.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = temp_beside(path, "tmp")?;
    let result = write(&tmp).and_then(|()| {
        // Opened for writing: some systems refuse to sync a read-only handle.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)?
            .sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// `.NAME.TAGPID` beside `path` (`NAME` its last component, `PID` this process's id): where a
/// file or directory is written before it is renamed into place, so that a crash never leaves a
/// half-written `path` and two processes never share a temporary.
pub(crate) fn temp_beside(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} does not end in a file name", path.display()))?;
    Ok(path.with_file_name(format!(
        ".{}.{tag}{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// A vector of `len` values, each written by `fill` (given the unwritten buffer) before use:
/// no zero-fill pass over memory that is about to be overwritten.
///
/// # Safety
/// `fill` writes every one of the `len` values.
pub unsafe fn written_by<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's contract.
    unsafe { v.set_len(len) };
    v
}

/// Rewrites the text file `path` (atomically) with only the lines `keep` accepts; a missing
/// file is left missing.
pub(crate) fn keep_lines(path: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| keep(l))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// The value of a `--set key=value` as TOML: a TOML literal (number, bool, quoted string),
/// else the raw text as a string; an integer for a key that holds a float (`current`) is
/// widened (`capacity_factor=2` means 2.0).
pub(crate) fn set_value(value: &str, current: &toml::Value) -> toml::Value {
    let value = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    match (current, parsed) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (_, p) => p,
    }
}

/// A settings `table` with `key` set to `value` read back as `T`, or an error naming both.
pub(crate) fn settings_from<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    key: &str,
    value: &str,
) -> Result<T> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| {
            anyhow::anyhow!(
                "invalid value `{}` for {key}: {}",
                value.trim(),
                e.message().trim()
            )
        })
}
