//! Ownership and permission checks for the files esptun trusts: the state
//! directory (whose records keep GCM nonces unique), key files and the
//! drop captures (decrypted traffic).
//!
//! The rule for a directory path is OpenSSH's StrictModes (`safe_path()`
//! in misc.c): every directory from `/` down must be owned by root or by
//! the effective user and not writable by group or others, since whoever
//! can write a directory can swap what sits below it. One deliberate
//! exception: a root-owned directory with the sticky bit (`/tmp`) is
//! accepted as an *ancestor*, because in a sticky directory only an
//! entry's owner (or root) may rename or remove it (unlink(2), EPERM), so
//! an entry owned by us cannot be swapped; it is never accepted as the
//! directory we keep files in, where others could still add entries.
//!
//! Files are checked on the opened descriptor (fstat), never by a second
//! lookup of the path, so what was checked is what is read or written.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const S_ISVTX: u32 = 0o1000;

/// The effective user id, which owns what the process creates.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why a path is not trusted; the message names the path and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsafe {
    #[error(
        "{path} is owned by uid {owner}, not by this process's user (uid {euid}){root}: another \
         account controls it; `chown {euid} {path}` if it is really ours, or use another path"
    , root = if *root_ok { " or root" } else { "" })]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
        root_ok: bool,
    },
    #[error(
        "{path} has mode {mode:04o}: group or others can write it, so another account could \
         change or replace what it holds; `chmod go-w {path}`"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "{path} has mode {mode:04o}: group or others can write it, so another account could \
         add, change or replace the files in it; `chmod 700 {path}`"
    )]
    WritableDir { path: PathBuf, mode: u32 },
    #[error(
        "{path} is a directory anyone can add to (mode {mode:04o}); it may only be an ancestor, \
         never hold esptun's files itself: use a directory of its own (`mkdir -m 700 DIR`)"
    )]
    SharedDir { path: PathBuf, mode: u32 },
    #[error("{path} is {kind}, not {want}: remove it or point the configuration elsewhere")]
    Type {
        path: PathBuf,
        kind: &'static str,
        want: &'static str,
    },
    #[error(
        "{path} is a symbolic link: esptun does not follow links here (another account could \
         aim it at any file); remove the link (`rm {path}`) or name the file itself"
    )]
    Symlink { path: PathBuf },
}

/// What a file type is called in messages.
pub fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The opened file at `path` (its fstat `meta`) is a regular file owned by
/// us (or root, if `root_ok`) that group and others cannot write.
pub fn check_file(path: &Path, meta: &Metadata, root_ok: bool) -> Result<(), Unsafe> {
    if !meta.file_type().is_file() {
        return Err(Unsafe::Type {
            path: path.to_path_buf(),
            kind: kind(meta),
            want: "a regular file",
        });
    }
    check_owner(path, meta, root_ok)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Unsafe::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// `meta` (of `path`) is owned by the effective user, or root if `root_ok`.
pub fn check_owner(path: &Path, meta: &Metadata, root_ok: bool) -> Result<(), Unsafe> {
    let euid = euid();
    if meta.uid() == euid || (root_ok && meta.uid() == 0) {
        Ok(())
    } else {
        Err(Unsafe::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid,
            root_ok,
        })
    }
}

/// Opens a secret (key or PSK file) for reading without following a
/// symbolic link or waiting on a FIFO (O_NOFOLLOW | O_NONBLOCK): `Err(Ok)`
/// names a link, `Err(Err)` is any other open error. The caller checks the
/// descriptor's metadata, not the path's.
pub fn open_secret(path: &Path) -> Result<std::fs::File, Result<Unsafe, std::io::Error>> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| symlink_error(path, &e).ok_or(e))
}

/// Turns an open(2) error on a path opened with O_NOFOLLOW into the
/// message for a symbolic link (ELOOP), leaving other errors alone.
pub fn symlink_error(path: &Path, e: &std::io::Error) -> Option<Unsafe> {
    (e.raw_os_error() == Some(libc::ELOOP)).then(|| Unsafe::Symlink {
        path: path.to_path_buf(),
    })
}

/// Checks that `dir` (which must exist) may hold esptun's files: owned by
/// the effective user, not writable by group or others, and under
/// ancestors no other account can use to swap it (see the module docs).
/// Symbolic links in the path are resolved first, so the directories
/// checked are the ones actually used.
pub fn check_dir_chain(dir: &Path) -> Result<(), DirError> {
    let real = std::fs::canonicalize(dir).map_err(|source| DirError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let meta = stat(&real)?;
    if !meta.is_dir() {
        return Err(Unsafe::Type {
            path: real,
            kind: kind(&meta),
            want: "a directory",
        }
        .into());
    }
    check_owner(&real, &meta, false)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(if mode & S_ISVTX != 0 {
            Unsafe::SharedDir { path: real, mode }
        } else {
            Unsafe::WritableDir { path: real, mode }
        }
        .into());
    }
    check_ancestors(&real)
}

/// Checks the directories above `path` (already canonical) up to `/`.
pub fn check_ancestors(path: &Path) -> Result<(), DirError> {
    for ancestor in path.ancestors().skip(1) {
        let meta = stat(ancestor)?;
        check_owner(ancestor, &meta, true)?;
        let mode = meta.mode() & 0o7777;
        let sticky_root = mode & S_ISVTX != 0 && meta.uid() == 0;
        if mode & 0o022 != 0 && !sticky_root {
            return Err(Unsafe::Writable {
                path: ancestor.to_path_buf(),
                mode,
            }
            .into());
        }
    }
    Ok(())
}

/// Checks the directory a file is to be created in as an ancestor of that
/// file (root-owned sticky directories such as `/tmp` accepted).
pub fn check_parent_of(file: &Path) -> Result<(), DirError> {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let real = std::fs::canonicalize(parent).map_err(|source| DirError::Io {
        path: parent.to_path_buf(),
        source,
    })?;
    check_ancestors(&real.join("_"))
}

fn stat(path: &Path) -> Result<Metadata, DirError> {
    std::fs::metadata(path).map_err(|source| DirError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A directory path that cannot be checked or is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Unsafe(#[from] Unsafe),
}

/// For root-only unit tests (chown to a foreign uid): whether to run.
/// Without root it writes `SKIPPED <test>: <why>` to stderr, or fails
/// under `ESPTUN_REQUIRE_NETNS=1`, so a skip is never silent.
#[cfg(test)]
pub(crate) fn root_or_skip(test: &str) -> bool {
    use std::io::Write;
    if euid() == 0 {
        return true;
    }
    assert!(
        std::env::var("ESPTUN_REQUIRE_NETNS").as_deref() != Ok("1"),
        "{test}: needs root (to chown files to another uid), and ESPTUN_REQUIRE_NETNS=1 is set"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (to chown files to another uid)"
    );
    false
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testutil::TempDir;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_private_dir_under_tmp_is_accepted_and_lax_ones_are_refused_with_the_fix() {
        let dir = TempDir::new("fsperm-dir");
        std::fs::create_dir_all(dir.0.join("inner")).expect("mkdir");
        chmod(&dir.0, 0o755);
        let inner = dir.0.join("inner");
        chmod(&inner, 0o700);
        check_dir_chain(&inner).expect("0700 under 0755 under sticky /tmp");

        chmod(&inner, 0o777);
        let err = check_dir_chain(&inner)
            .expect_err("world-writable")
            .to_string();
        assert!(err.contains("chmod 700") && err.contains("0777"), "{err}");

        chmod(&inner, 0o1777);
        let err = check_dir_chain(&inner)
            .expect_err("sticky itself")
            .to_string();
        assert!(err.contains("only be an ancestor"), "{err}");

        // A writable ancestor lets another account swap the directory.
        chmod(&inner, 0o700);
        chmod(&dir.0, 0o777);
        let err = check_dir_chain(&inner).expect_err("ancestor").to_string();
        assert!(
            err.contains(&dir.0.display().to_string()) && err.contains("chmod go-w"),
            "{err}"
        );
        chmod(&dir.0, 0o755);

        // A file is not a directory.
        let file = dir.0.join("f");
        std::fs::write(&file, "").expect("write");
        let err = check_dir_chain(&file).expect_err("file").to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn a_foreign_owner_is_refused_root_only() {
        if !root_or_skip("fsperm::a_foreign_owner_is_refused_root_only") {
            return;
        }
        let dir = TempDir::new("fsperm-owner");
        std::fs::create_dir_all(dir.0.join("inner")).expect("mkdir");
        let inner = dir.0.join("inner");
        chmod(&inner, 0o700);
        std::os::unix::fs::chown(&inner, Some(4242), Some(4242)).expect("chown");
        let err = check_dir_chain(&inner).expect_err("foreign").to_string();
        assert!(err.contains("uid 4242") && err.contains("chown 0"), "{err}");
        // Foreign-owned ancestor, too.
        std::os::unix::fs::chown(&inner, Some(0), Some(0)).expect("chown back");
        std::os::unix::fs::chown(&dir.0, Some(4242), None).expect("chown");
        let err = check_dir_chain(&inner).expect_err("ancestor").to_string();
        assert!(err.contains("uid 4242"), "{err}");
    }
}
