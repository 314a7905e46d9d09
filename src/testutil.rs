//! Helpers for unit tests.

use std::path::PathBuf;

/// A fresh directory under the system temp dir, unique per test name and
/// process, removed when dropped (also when the test fails).
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("esptun-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Says that the running unit test skipped and why, as `SKIPPED <test>:
/// <why>` on the real stderr: libtest captures print!/eprintln! of passing
/// tests (which would hide the skip), but not a write to the handle.
pub(crate) fn skipped(why: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("(unnamed test)");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
