//! One writer per run: `runs/NAME/lock` holds the writing process's id and host while it
//! trains; a second `switch train` on the same run gets a clear error instead of interleaving
//! checkpoints and metrics. A lock left by a process that no longer runs (on this host) is taken
//! over with a message; the lock is removed when its holder is dropped.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The lock of one run directory, held until dropped.
#[derive(Debug)]
pub(crate) struct RunLock {
    path: PathBuf,
}

/// This machine's name, as the lock records it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether process `pid` runs on this machine (Linux: `/proc/PID` exists).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl RunLock {
    /// Takes the lock of the run in `dir` (which must exist).
    pub(crate) fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join("lock");
        let me = format!("{} {}\n", std::process::id(), host());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut words = held.split_whitespace();
                    let pid = words.next().and_then(|p| p.parse::<u32>().ok());
                    let holder_host = words.next().unwrap_or("");
                    match pid {
                        Some(pid) if holder_host == host() && !alive(pid) => {
                            tracing::info!(
                                "{} was left by process {pid}, which no longer runs: \
                                 taking it over",
                                path.display()
                            );
                            std::fs::remove_file(&path).with_context(|| {
                                format!("cannot remove the stale lock {}", path.display())
                            })?;
                        }
                        Some(pid) => bail!(
                            "{} is being trained by process {pid} on {holder_host} (its lock is \
                             {}): wait for it to finish, or stop it first; if that process is \
                             gone, remove the lock file",
                            dir.display(),
                            path.display()
                        ),
                        None => bail!(
                            "{} has an unreadable lock file {}: remove it if no process is \
                             training this run",
                            dir.display(),
                            path.display()
                        ),
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
        bail!("cannot take the lock {}", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
