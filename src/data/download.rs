//! Fetching the Tiny Shakespeare data set when it is not on disk.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Where Tiny Shakespeare is downloaded from (Karpathy's char-rnn copy, as labml uses).
pub const TINY_SHAKESPEARE_URL: &str =
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
/// SHA-256 of the expected file; a download with another hash is refused.
pub const TINY_SHAKESPEARE_SHA256: &str =
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed";

/// Lower-case hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Downloads `url` to `dest` (atomically), checking the SHA-256. `progress(done, total)` is
/// called as bytes arrive.
pub fn download(
    url: &str,
    sha256: &str,
    dest: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<()> {
    let offline = || {
        format!(
            "cannot download {url}. Without network access, fetch the file on another machine \
             and copy it to {} (or pass --data PATH to any UTF-8 text file)",
            dest.display()
        )
    };
    let mut response = ureq::get(url).call().with_context(offline)?;
    let total = response.body().content_length();
    let mut reader = response.body_mut().as_reader();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).with_context(offline)?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
        progress(bytes.len() as u64, total);
    }
    let got = sha256_hex(&bytes);
    if got != sha256 {
        bail!("the download from {url} has SHA-256 {got}, expected {sha256}: not saved");
    }
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::util::write_atomic(dest, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_text() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn unreachable_url_says_what_to_do() {
        // Port 9 (discard) on loopback: refused at once, no traffic leaves the machine.
        let dest = std::env::temp_dir().join("switch-never-written.txt");
        let err = download("http://127.0.0.1:9/input.txt", "00", &dest, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("--data"), "{err}");
        assert!(!dest.exists());
    }
}
