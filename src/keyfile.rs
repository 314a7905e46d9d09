//! Key files: RFC 4106 key material (AES key || 4-byte salt) as one line of
//! hex, in a file only its owner can read.
//!
//! Invariants:
//! - A new key file is created, never overwritten (O_CREAT|O_EXCL), with
//!   mode 0600 from the start, so it is never readable by others even for
//!   an instant.
//! - A key file that group or others can read, write or execute is refused:
//!   its key may already be known elsewhere.
//! - A key file must be a regular file owned by the effective user or
//!   root: opened without following a link or blocking on a FIFO
//!   (O_NOFOLLOW | O_NONBLOCK) and checked on the descriptor, so a FIFO at
//!   the path cannot hang `check-config` or a reload.
//! - Key bytes pass only through zeroizing buffers and never into errors.
//!   The buffers are sized once and never grow: growing a `String` or
//!   `Vec` frees the old allocation without clearing it, leaving a copy
//!   of the key in the heap.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::crypto::KeySize;
use crate::fsperm::{self, Unsafe};
use crate::sa::KeyMaterial;

/// The salt RFC 4106 section 8.1 appends to the key.
const SALT_LEN: usize = 4;
/// Longest file read: 36 bytes of hex plus whitespace and a comment's room.
const MAX_FILE_LEN: u64 = 4096;
/// The longest key material: an AES-256 key and its salt.
const MAX_MATERIAL: usize = 32 + SALT_LEN;

/// What went wrong with a key file; every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source} (check the path in the configuration)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} has mode {mode:04o}: group or others have access, so the key may be \
         known elsewhere; generate a new key with `esptun genkey`, or if you are sure it is \
         unexposed, `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} holds {got} bytes of key material; it must be 20 (AES-128 key + salt) \
         or 36 (AES-256 key + salt) bytes as hex: create one with `esptun genkey`"
    )]
    Length { path: PathBuf, got: usize },
    #[error(
        "key file {path} is not hex (one line of 40 or 72 hex digits): create one with `esptun genkey`"
    )]
    NotHex { path: PathBuf },
    #[error(
        "key file {path} is a directory, not a file: set key_file to the key file itself \
         (create one with `esptun genkey -o FILE`)"
    )]
    Directory { path: PathBuf },
    #[error("key file refused: {0}")]
    Unsafe(Unsafe),
    #[error("key file {path} is larger than {MAX_FILE_LEN} bytes: it is not a key file")]
    TooLarge { path: PathBuf },
    #[error(
        "{path} already exists: esptun genkey never overwrites a key (remove it first if you mean to)"
    )]
    Exists { path: PathBuf },
    #[error("cannot create key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system random number generator failed")]
    Random,
}

/// Generates new key material (random key and salt) for `size`.
pub fn generate(size: KeySize) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let mut bytes = Zeroizing::new(vec![0u8; size.bytes() + SALT_LEN]);
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| KeyFileError::Random)?;
    Ok(bytes)
}

/// Writes `material` as hex to a new file `path` with mode 0600.
pub fn write_new(path: &Path, material: &[u8]) -> Result<(), KeyFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyFileError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyFileError::Create {
                path: path.to_path_buf(),
                source,
            },
        })?;
    // Sized for the hex and the newline at once, never grown (see above).
    let mut text = Zeroizing::new(vec![0u8; material.len() * 2 + 1]);
    let len = crate::hex::encode_into(material, &mut text).map_err(|e| KeyFileError::Create {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    text[len] = b'\n';
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyFileError::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads and checks a key file.
pub fn load(path: &Path) -> Result<KeyMaterial, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO for reading would wait for a writer.
    let file = fsperm::open_secret(path).map_err(|e| match e {
        Ok(link) => KeyFileError::Unsafe(link),
        Err(e) => read_err(e),
    })?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(KeyFileError::Directory {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_file() {
        return Err(KeyFileError::Unsafe(Unsafe::Type {
            path: path.to_path_buf(),
            kind: fsperm::kind(&meta),
            want: "a regular file",
        }));
    }
    fsperm::check_owner(path, &meta, true).map_err(KeyFileError::Unsafe)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let too_large = || KeyFileError::TooLarge {
        path: path.to_path_buf(),
    };
    if meta.len() > MAX_FILE_LEN {
        return Err(too_large());
    }
    // One byte more than allowed, to notice a file that grew meanwhile.
    let mut text = Zeroizing::new(vec![0u8; MAX_FILE_LEN as usize + 1]);
    let mut len = 0;
    let mut reader = file.take(MAX_FILE_LEN + 1);
    loop {
        match reader.read(&mut text[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    if len as u64 > MAX_FILE_LEN {
        return Err(too_large());
    }
    // Whitespace out, in place: the digits stay in the one buffer.
    let mut digits = 0;
    for i in 0..len {
        let c = text[i];
        if !c.is_ascii_whitespace() {
            text[digits] = c;
            digits += 1;
        }
    }
    let not_hex = || KeyFileError::NotHex {
        path: path.to_path_buf(),
    };
    if !text[..digits].iter().all(u8::is_ascii_hexdigit) || digits % 2 != 0 {
        return Err(not_hex());
    }
    let got = digits / 2;
    let length = || KeyFileError::Length {
        path: path.to_path_buf(),
        got,
    };
    if got > MAX_MATERIAL {
        return Err(length());
    }
    let mut bytes = Zeroizing::new([0u8; MAX_MATERIAL]);
    let n = crate::hex::decode_into(&text[..digits], &mut bytes[..]).map_err(|_| not_hex())?;
    KeyMaterial::from_bytes(&bytes[..n]).map_err(|_| length())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testutil::TempDir;

    fn temp_dir(name: &str) -> TempDir {
        let dir = TempDir::new(&format!("keyfile-{name}"));
        fs::create_dir_all(&dir.0).expect("temp dir");
        dir
    }

    #[test]
    fn generated_keys_round_trip_with_mode_0600_and_differ() {
        let dir = temp_dir("roundtrip");
        for (size, len) in [(KeySize::Aes128, 20), (KeySize::Aes256, 36)] {
            let material = generate(size).expect("random");
            assert_eq!(material.len(), len);
            let path = dir.0.join(format!("{len}.key"));
            write_new(&path, &material).expect("write");
            let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let loaded = load(&path).expect("load");
            assert_eq!(loaded.key().size(), size);
            assert_eq!(loaded.key().expose(), &material[..size.bytes()]);
        }
        assert_ne!(
            *generate(KeySize::Aes128).expect("a"),
            *generate(KeySize::Aes128).expect("b")
        );
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = temp_dir("exists");
        let path = dir.0.join("k");
        fs::write(&path, "keep me").expect("write");
        let err = write_new(&path, &[0u8; 20]).expect_err("exists");
        assert!(matches!(err, KeyFileError::Exists { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("read"), "keep me");
    }

    #[test]
    fn exposed_short_long_and_garbled_files_are_refused_with_the_fix() {
        let dir = temp_dir("refused");
        let good = "00112233445566778899aabbccddeeff01020304\n";
        let cases: [(&str, &str, u32, &str); 6] = [
            ("group", good, 0o640, "chmod 600"),
            ("other", good, 0o604, "group or others"),
            ("short", "0011", 0o600, "must be 20"),
            ("odd", "001", 0o600, "not hex"),
            (
                "garbage",
                "zz11223344556677889900aabbccddeeff010203",
                0o600,
                "not hex",
            ),
            ("aes192", &"ab".repeat(28), 0o600, "holds 28 bytes"),
        ];
        for (name, content, mode, fix) in cases {
            let path = dir.0.join(name);
            fs::write(&path, content).expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let err = load(&path).expect_err(name).to_string();
            assert!(err.contains(fix), "{name}: {err}");
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
            assert!(
                !err.contains("00112233"),
                "{name}: key bytes in an error: {err}"
            );
        }
        let missing = load(&dir.0.join("nope")).expect_err("missing").to_string();
        assert!(missing.contains("cannot read key file"), "{missing}");
        // Whitespace and a trailing newline are fine.
        let spaced = dir.0.join("spaced");
        fs::write(&spaced, "0011223344556677 8899aabbccddeeff\n01020304\n").expect("write");
        fs::set_permissions(&spaced, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(load(&spaced).is_ok());
    }

    // Hardening: only a regular file of ours (or root's) is read, and
    // nothing at the path can make the read block.

    #[test]
    fn hardening_a_fifo_link_or_directory_is_refused_at_once_with_its_own_message() {
        let dir = temp_dir("special");
        let good = dir.0.join("good");
        write_new(&good, &[0x11; 20]).expect("write");

        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let started = std::time::Instant::now();
        let err = load(&fifo).expect_err("fifo").to_string();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "blocked"
        );
        assert!(
            err.contains("FIFO") && err.contains("not a regular file"),
            "{err}"
        );

        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&good, &link).expect("link");
        let err = load(&link).expect_err("link").to_string();
        assert!(err.contains("symbolic link"), "{err}");

        let sub = dir.0.join("sub");
        fs::create_dir(&sub).expect("mkdir");
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = load(&sub).expect_err("dir").to_string();
        assert!(err.contains("is a directory"), "{err}");
        assert!(!err.contains("chmod"), "{err}");

        let big = dir.0.join("big");
        fs::write(&big, "0".repeat(5000)).expect("write");
        fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(load(&big), Err(KeyFileError::TooLarge { .. })));
        assert!(load(&good).is_ok());
    }

    #[test]
    fn hardening_a_key_file_of_another_account_is_refused_root_only() {
        if !crate::fsperm::root_or_skip(
            "keyfile::hardening_a_key_file_of_another_account_is_refused_root_only",
        ) {
            return;
        }
        let dir = temp_dir("foreign");
        let path = dir.0.join("k");
        write_new(&path, &[0x22; 36]).expect("write");
        std::os::unix::fs::chown(&path, Some(4242), Some(4242)).expect("chown");
        let err = load(&path).expect_err("foreign").to_string();
        assert!(err.contains("uid 4242") && err.contains("chown"), "{err}");
        std::os::unix::fs::chown(&path, Some(0), Some(0)).expect("chown");
        assert!(load(&path).is_ok(), "root-owned keys are fine");
    }
}
