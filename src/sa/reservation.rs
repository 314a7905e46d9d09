//! Durable sequence-number reservations: what makes (key, nonce) reuse
//! impossible across restarts, `kill -9` included.
//!
//! Before an outbound SA may use sequence numbers up to some ceiling, the
//! ceiling is written to the state directory and made durable (write the
//! temporary file, fsync it, rename it over the record, fsync the
//! directory). After a restart the SA resumes above the recorded ceiling,
//! so a number is never used twice even if the process died right after
//! reserving. Reservations come in blocks, so the hot path writes rarely.
//!
//! A record belongs to the key material (key and salt), not to an SA: the
//! GCM nonce is salt || sequence number (RFC 4106 section 4), with no SPI
//! in it, so two SPIs over one key share one nonce space. Records are
//! named by a keyed hash of key and salt (HMAC-SHA-256 keyed with the key
//! itself), never by the key: the state directory reveals nothing about
//! it. A record that cannot be read or
//! parsed is an error, never "no record": failing open here would reuse
//! nonces.
//!
//! Whoever can change a record can make the daemon reuse nonces (a
//! record rewritten to `ceiling 0` restarts the key at 1), so the store
//! trusts only what no other account can touch: the directory must pass
//! [`crate::fsperm::check_dir_chain`] (ours, not group/other-writable,
//! under ancestors nobody else can use to swap it), and every file in it
//! is opened without following links (O_NOFOLLOW) or blocking on a FIFO
//! (O_NONBLOCK), then checked on the descriptor: a regular file, ours,
//! not group/other-writable. Temporary records are created with O_EXCL.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;

use super::{KeyMaterial, OutboundSa};
use crate::fsperm::{self, DirError, Unsafe};

/// Sequence numbers reserved per durable write.
pub const DEFAULT_BLOCK: u64 = 1 << 20;
const LABEL: &[u8] = b"esptun sequence reservation v2";
const FRESH_LABEL: &[u8] = b"esptun fresh key v1";
/// Longest record read: "ceiling " and 20 digits fit many times over.
const MAX_RECORD: usize = 64;
/// Every file in the state directory: never follow a link planted at its
/// name, never block opening a FIFO planted there.
const NO_LINK_NO_BLOCK: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK;

#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error(
        "cannot use state directory {path}: {source} (create it, owned by root with mode 0700, or set state_dir)"
    )]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {dir} cannot be trusted with sequence records (whoever can change them \
         can make esptun reuse GCM nonces): {source}"
    )]
    UnsafeDir { dir: PathBuf, source: Box<DirError> },
    #[error(
        "refusing a file in the state directory (whoever can change sequence records can make \
         esptun reuse GCM nonces): {0}"
    )]
    UnsafeFile(Box<Unsafe>),
    #[error("cannot read sequence reservation {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "sequence reservation {path} is corrupt; refusing to guess where the sequence stands, \
         since guessing low would reuse GCM nonces: roll this SA to a new key (esptun genkey)"
    )]
    Corrupt { path: PathBuf },
    #[error(
        "no sequence-number record for this outbound key and SPI in {dir}, and the key was not \
         generated on this host by `esptun genkey`: starting again at sequence number 1 would \
         reuse every GCM nonce the key was already used with, which reveals plaintext and lets \
         anyone forge packets. If the key has never carried traffic, declare it fresh with \
         `esptun declare-fresh`; otherwise generate a new one with `esptun genkey`"
    )]
    Unrecorded { dir: PathBuf },
    #[error(
        "state directory {dir} is in use by another running esptun: two daemons sharing \
         sequence records could reuse nonces; give each instance its own state_dir"
    )]
    InUse { dir: PathBuf },
    #[error("cannot record sequence reservation {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The reservation records in one state directory.
#[derive(Debug, Clone)]
pub struct ReservationStore {
    dir: PathBuf,
}

/// Names one key's record without revealing the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn new(material: &KeyMaterial) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, material.key().expose());
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(LABEL);
        ctx.update(&*material.salt);
        let tag = ctx.sign();
        Fingerprint(crate::hex::encode(&tag.as_ref()[..16]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How an outbound SA got its first reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A record existed: the SA continues above `after`.
    Resumed { after: u64 },
    /// A never-used key (generated here, or declared fresh): starts at 1.
    Fresh,
}

fn fresh_name(material: &KeyMaterial) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, material.key().expose());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(FRESH_LABEL);
    ctx.update(&*material.salt);
    format!("fresh-{}", crate::hex::encode(&ctx.sign().as_ref()[..16]))
}

impl ReservationStore {
    /// Opens (creating with mode 0700 if needed) the state directory.
    pub fn open(dir: &Path) -> Result<Self, ReservationError> {
        let dir_err = |source| ReservationError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
        fsperm::check_dir_chain(dir).map_err(|source| ReservationError::UnsafeDir {
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(ReservationStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Takes the directory for this process (released when the returned
    /// file closes, also on `kill -9`): one writer per set of records.
    pub fn lock(&self) -> Result<File, ReservationError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(NO_LINK_NO_BLOCK)
            .open(&path)
            .map_err(|source| open_err(&path, source, false))?;
        checked(&path, &file)?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(ReservationError::InUse {
                dir: self.dir.clone(),
            }),
            Err(std::fs::TryLockError::Error(source)) => {
                Err(ReservationError::Write { path, source })
            }
        }
    }

    fn path(&self, fp: &Fingerprint) -> PathBuf {
        self.dir.join(format!("seq-{}", fp.as_str()))
    }

    /// The recorded ceiling, or `None` if this key and SPI have no record.
    pub fn load(&self, fp: &Fingerprint) -> Result<Option<u64>, ReservationError> {
        let path = self.path(fp);
        let Some(file) = open_existing(&path)? else {
            return Ok(None);
        };
        // A fixed buffer and a cap: a record is a short line, and a huge
        // file is corrupt, not something to read into memory.
        let mut buf = [0u8; MAX_RECORD + 1];
        let mut len = 0;
        let mut reader = file.take(MAX_RECORD as u64 + 1);
        loop {
            match reader.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ReservationError::Read { path, source }),
            }
        }
        if len > MAX_RECORD {
            return Err(ReservationError::Corrupt { path });
        }
        std::str::from_utf8(&buf[..len])
            .ok()
            .and_then(|text| text.strip_prefix("ceiling "))
            .and_then(|rest| rest.trim_end().parse::<u64>().ok())
            .map(Some)
            .ok_or(ReservationError::Corrupt { path })
    }

    /// Durably records `ceiling` for this key and SPI.
    pub fn store(&self, fp: &Fingerprint, ceiling: u64) -> Result<(), ReservationError> {
        let path = self.path(fp);
        let tmp = self.dir.join(format!("seq-{}.tmp", fp.as_str()));
        let write_err = |source| ReservationError::Write {
            path: path.clone(),
            source,
        };
        // A temporary file left by a crash is ours to remove; anything
        // else at its name (a link, a FIFO, another account's file) is
        // refused, never written through.
        match std::fs::symlink_metadata(&tmp) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(unsafe_file(Unsafe::Symlink { path: tmp }));
            }
            Ok(meta) => {
                fsperm::check_file(&tmp, &meta, false).map_err(unsafe_file)?;
                std::fs::remove_file(&tmp).map_err(write_err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(e)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(NO_LINK_NO_BLOCK)
            .open(&tmp)
            .map_err(|source| open_err(&tmp, source, false))?;
        checked(&tmp, &file)?;
        file.write_all(format!("ceiling {ceiling}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_err)?;
        std::fs::rename(&tmp, &path).map_err(write_err)?;
        // The rename is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)
    }

    /// Grants `sa` the next block: records `last_used + block` durably,
    /// then raises the SA's ceiling to it. Call at start (after
    /// [`Self::resume`]) and whenever the SA reports `ReservationNeeded`,
    /// or a little before.
    pub fn reserve_block(
        &self,
        fp: &Fingerprint,
        sa: &mut OutboundSa,
        block: u64,
    ) -> Result<u64, ReservationError> {
        let ceiling = sa
            .last_used()
            .saturating_add(block.max(1))
            .min(super::hard_limit(sa.esn));
        self.store(fp, ceiling)?;
        sa.set_ceiling(ceiling);
        Ok(ceiling)
    }

    /// Records that `material` has never been used (it was just generated
    /// here, or the operator vouches for it), so an SA may start it at 1.
    pub fn mark_fresh(&self, material: &KeyMaterial) -> Result<(), ReservationError> {
        let path = self.dir.join(fresh_name(material));
        let write_err = |source| ReservationError::Write {
            path: path.clone(),
            source,
        };
        // No truncation needed: a mark is empty; an existing one is
        // checked like any record before it counts.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(NO_LINK_NO_BLOCK)
            .open(&path)
            .map_err(|source| open_err(&path, source, false))?;
        checked(&path, &file)?;
        file.sync_all().map_err(write_err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)
    }

    /// Gives an outbound SA its first block at start: above its record if
    /// it has one, from 1 if its key is marked fresh (the mark is consumed,
    /// after the record that replaces it is durable), and otherwise not at
    /// all: a key with no record may have been used before.
    pub fn claim(
        &self,
        fp: &Fingerprint,
        material: &KeyMaterial,
        sa: &mut OutboundSa,
        block: u64,
    ) -> Result<Claim, ReservationError> {
        let fresh = self.dir.join(fresh_name(material));
        if let Some(ceiling) = self.load(fp)? {
            sa.resume_after(ceiling);
            self.reserve_block(fp, sa, block)?;
            // A mark left by a crash between recording and removing it
            // must not outlive the record that supersedes it.
            self.remove_durably(&fresh)?;
            return Ok(Claim::Resumed { after: ceiling });
        }
        // The mark lets a key start at 1: it counts only if it is a
        // regular file of ours, like a record.
        if open_existing(&fresh)?.is_none() {
            return Err(ReservationError::Unrecorded {
                dir: self.dir.clone(),
            });
        }
        self.reserve_block(fp, sa, block)?;
        self.remove_durably(&fresh)?;
        Ok(Claim::Fresh)
    }

    /// Whether [`Self::claim`] would give this key its first block, without
    /// changing anything: it has a record, or a fresh mark. For
    /// `esptun check-config`, which must refuse what `run` refuses.
    pub fn can_claim(
        &self,
        fp: &Fingerprint,
        material: &KeyMaterial,
    ) -> Result<(), ReservationError> {
        if self.load(fp)?.is_some()
            || open_existing(&self.dir.join(fresh_name(material)))?.is_some()
        {
            return Ok(());
        }
        Err(ReservationError::Unrecorded {
            dir: self.dir.clone(),
        })
    }

    fn remove_durably(&self, path: &Path) -> Result<(), ReservationError> {
        let remove_err = |source| ReservationError::Write {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(remove_err(e)),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(remove_err)
    }

    /// After a restart: everything up to the recorded ceiling may have been
    /// used, so continue above it. Returns whether a record existed.
    pub fn resume(&self, fp: &Fingerprint, sa: &mut OutboundSa) -> Result<bool, ReservationError> {
        Ok(match self.load(fp)? {
            Some(ceiling) => {
                sa.resume_after(ceiling);
                true
            }
            None => false,
        })
    }
}

/// Opens an existing file of the state directory for reading, or `None`
/// if there is none.
fn open_existing(path: &Path) -> Result<Option<File>, ReservationError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(NO_LINK_NO_BLOCK)
        .open(path)
    {
        Ok(file) => {
            checked(path, &file)?;
            Ok(Some(file))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(open_err(path, source, true)),
    }
}

/// The opened file is a regular file of ours that others cannot write
/// (checked on the descriptor, not by looking the path up again).
fn checked(path: &Path, file: &File) -> Result<(), ReservationError> {
    let meta = file.metadata().map_err(|source| ReservationError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    fsperm::check_file(path, &meta, false).map_err(unsafe_file)
}

fn unsafe_file(problem: Unsafe) -> ReservationError {
    ReservationError::UnsafeFile(Box::new(problem))
}

fn open_err(path: &Path, source: std::io::Error, reading: bool) -> ReservationError {
    match fsperm::symlink_error(path, &source) {
        Some(link) => unsafe_file(link),
        None if reading => ReservationError::Read {
            path: path.to_path_buf(),
            source,
        },
        None => ReservationError::Write {
            path: path.to_path_buf(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::crypto::IcvLen;
    use crate::sa::{InnerAddrs, SaKeys, SeqError};
    use crate::testutil::TempDir;

    fn sa(material: &KeyMaterial) -> OutboundSa {
        sa_with_spi(material, 0x1001)
    }

    fn sa_with_spi(material: &KeyMaterial, spi: u32) -> OutboundSa {
        let selector = crate::sa::tests::selector();
        let keys = SaKeys::new(&selector, material, IcvLen::Icv16).expect("keys");
        let addrs = InnerAddrs::new(
            "198.18.0.1".parse().expect("ip"),
            "198.19.0.2".parse().expect("ip"),
        )
        .expect("addrs");
        OutboundSa::new(spi, keys, false, addrs).expect("sa")
    }

    #[test]
    fn only_recorded_or_fresh_keys_may_start() {
        let dir = TempDir::new("resv-claim");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[9u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);

        let mut unknown = sa(&material);
        let err = store
            .claim(&fp, &material, &mut unknown, 100)
            .expect_err("a key with no record is refused");
        assert!(matches!(err, ReservationError::Unrecorded { .. }), "{err}");
        assert!(err.to_string().contains("declare-fresh"), "{err}");
        assert_eq!(unknown.next_seq(), Err(SeqError::ReservationNeeded));

        store.mark_fresh(&material).expect("mark");
        let mut first = sa(&material);
        assert_eq!(
            store.claim(&fp, &material, &mut first, 100).expect("fresh"),
            Claim::Fresh
        );
        assert_eq!(first.next_seq(), Ok(1));
        assert_eq!(first.next_seq(), Ok(2));

        // The mark is spent: a second start resumes above the record.
        let mut second = sa(&material);
        assert_eq!(
            store
                .claim(&fp, &material, &mut second, 100)
                .expect("resume"),
            Claim::Resumed { after: 100 }
        );
        assert_eq!(second.next_seq(), Ok(101));
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with("fresh-")), "{names:?}");
    }

    #[test]
    fn a_restart_never_reuses_a_sequence_number() {
        let dir = TempDir::new("resv-restart");
        let material = KeyMaterial::from_bytes(&[5u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        let store = ReservationStore::open(&dir.0).expect("store");
        let mode = std::fs::metadata(&dir.0)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);

        // First run: no record; reserve a block of 10, use 7, then die.
        let mut first = sa(&material);
        assert!(!store.resume(&fp, &mut first).expect("resume"));
        assert_eq!(
            store.reserve_block(&fp, &mut first, 10).expect("reserve"),
            10
        );
        let used: Vec<u64> = (0..7).map(|_| first.next_seq().expect("seq")).collect();
        assert_eq!(used, (1..=7).collect::<Vec<_>>());
        drop(first); // kill -9: nothing else is written

        // Second run: continues above the recorded ceiling.
        let mut second = sa(&material);
        assert!(store.resume(&fp, &mut second).expect("resume"));
        assert_eq!(
            second.next_seq(),
            Err(SeqError::ReservationNeeded),
            "no block granted yet"
        );
        assert_eq!(
            store.reserve_block(&fp, &mut second, 10).expect("reserve"),
            20
        );
        assert_eq!(second.next_seq(), Ok(11));
        let file = dir.0.join(format!("seq-{}", fp.as_str()));
        assert_eq!(
            std::fs::read_to_string(&file).expect("record"),
            "ceiling 20\n"
        );
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn fingerprints_hide_the_key_and_name_the_nonce_space() {
        let a = KeyMaterial::from_bytes(&[0xAB; 20]).expect("material");
        let b = KeyMaterial::from_bytes(&[0xAC; 20]).expect("material");
        let mut salted = [0xAB; 20];
        salted[19] = 0;
        let c = KeyMaterial::from_bytes(&salted).expect("material");
        let fa = Fingerprint::new(&a);
        assert!(!fa.as_str().contains("abab"), "{fa:?}");
        assert_eq!(fa, Fingerprint::new(&a), "stable");
        assert_ne!(fa, Fingerprint::new(&b), "another key");
        assert_ne!(
            fa,
            Fingerprint::new(&c),
            "another salt: another nonce space"
        );
    }

    #[test]
    fn one_process_at_a_time_holds_the_directory() {
        let dir = TempDir::new("resv-lock");
        let store = ReservationStore::open(&dir.0).expect("store");
        let held = store.lock().expect("first");
        let second = ReservationStore::open(&dir.0).expect("store");
        assert!(matches!(second.lock(), Err(ReservationError::InUse { .. })));
        drop(held);
        second.lock().expect("free again once the holder is gone");
    }

    #[test]
    fn a_new_spi_on_a_used_key_resumes_its_record() {
        // The nonce has no SPI in it: a key's record follows the key.
        let dir = TempDir::new("resv-spi");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[4u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        store.mark_fresh(&material).expect("mark");
        let mut first = sa(&material);
        store.claim(&fp, &material, &mut first, 100).expect("fresh");
        assert_eq!(first.next_seq(), Ok(1));
        let mut other_spi = sa_with_spi(&material, 0x2002);
        assert_eq!(
            store
                .claim(&fp, &material, &mut other_spi, 100)
                .expect("resume"),
            Claim::Resumed { after: 100 }
        );
        assert_eq!(other_spi.next_seq(), Ok(101));
    }

    #[test]
    fn a_fresh_mark_left_beside_a_record_is_removed_not_used() {
        let dir = TempDir::new("resv-leftover");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[3u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        // As after a crash between writing the record and removing the mark.
        store.store(&fp, 500).expect("record");
        store.mark_fresh(&material).expect("mark");
        let mut sa1 = sa(&material);
        assert_eq!(
            store.claim(&fp, &material, &mut sa1, 100).expect("claim"),
            Claim::Resumed { after: 500 }
        );
        assert_eq!(sa1.next_seq(), Ok(501));
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("fresh-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_corrupt_record_fails_closed() {
        let dir = TempDir::new("resv-corrupt");
        let material = KeyMaterial::from_bytes(&[6u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        let store = ReservationStore::open(&dir.0).expect("store");
        for bad in ["", "ceiling", "ceiling -1\n", "ceiling 12x\n", "garbage"] {
            std::fs::write(dir.0.join(format!("seq-{}", fp.as_str())), bad).expect("write");
            let err = store.load(&fp).expect_err(bad);
            assert!(
                err.to_string().contains("roll this SA to a new key"),
                "{err}"
            );
            assert!(store.resume(&fp, &mut sa(&material)).is_err());
        }
        // A leftover temporary file from a crash mid-write is ignored.
        store.store(&fp, 42).expect("store");
        std::fs::write(
            dir.0.join(format!("seq-{}.tmp", fp.as_str())),
            "ceiling 1\n",
        )
        .expect("tmp");
        assert_eq!(store.load(&fp).expect("load"), Some(42));
    }

    // Hardening: the state directory and its files are trusted only when
    // no other account can change them (a rewritten record reuses nonces).

    fn record(dir: &TempDir, fp: &Fingerprint) -> PathBuf {
        dir.0.join(format!("seq-{}", fp.as_str()))
    }

    #[test]
    fn hardening_a_lax_or_shared_state_dir_is_refused_with_the_fix() {
        let dir = TempDir::new("resv-lax");
        ReservationStore::open(&dir.0).expect("created 0700");
        for mode in [0o777, 0o770, 0o1777] {
            std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = ReservationStore::open(&dir.0).expect_err("lax").to_string();
            assert!(
                err.contains("mkdir -m 700") || err.contains("chmod 700"),
                "{err}"
            );
            assert!(err.contains(&dir.0.display().to_string()), "{err}");
        }
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ReservationStore::open(&dir.0).expect("0755 is not writable by others");
    }

    #[test]
    fn hardening_links_at_record_temp_and_mark_names_are_refused_not_followed() {
        let dir = TempDir::new("resv-links");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[8u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        let target = dir.0.join("victim");
        std::fs::write(&target, "ceiling 0\n").expect("victim");

        let rec = record(&dir, &fp);
        std::os::unix::fs::symlink(&target, &rec).expect("link");
        let err = store.load(&fp).expect_err("link at record").to_string();
        assert!(
            err.contains("symbolic link") && err.contains("rm "),
            "{err}"
        );
        std::fs::remove_file(&rec).expect("unlink");

        let tmp = dir.0.join(format!("seq-{}.tmp", fp.as_str()));
        std::os::unix::fs::symlink(&target, &tmp).expect("link");
        let err = store.store(&fp, 77).expect_err("link at temp").to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&target).expect("victim"), b"ceiling 0\n");
        std::fs::remove_file(&tmp).expect("unlink");

        let mark = dir.0.join(fresh_name(&material));
        std::os::unix::fs::symlink(&target, &mark).expect("link");
        assert!(matches!(
            store.mark_fresh(&material),
            Err(ReservationError::UnsafeFile(e)) if matches!(*e, Unsafe::Symlink { .. })
        ));
        let err = store
            .claim(&fp, &material, &mut sa(&material), 10)
            .expect_err("a link is no fresh mark");
        assert!(matches!(err, ReservationError::UnsafeFile(_)), "{err}");
        assert_eq!(std::fs::read(&target).expect("victim"), b"ceiling 0\n");
    }

    #[test]
    fn hardening_a_fifo_or_writable_record_is_refused_without_blocking() {
        let dir = TempDir::new("resv-fifo");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[7u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        let rec = record(&dir, &fp);
        nix::unistd::mkfifo(&rec, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let started = std::time::Instant::now();
        let err = store.load(&fp).expect_err("fifo").to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(err.contains("FIFO"), "{err}");
        std::fs::remove_file(&rec).expect("unlink");

        store.store(&fp, 9).expect("store");
        std::fs::set_permissions(&rec, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = store.load(&fp).expect_err("writable").to_string();
        assert!(err.contains("chmod go-w"), "{err}");
    }

    #[test]
    fn hardening_a_stale_temp_of_ours_is_replaced() {
        let dir = TempDir::new("resv-stale");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[2u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        let tmp = dir.0.join(format!("seq-{}.tmp", fp.as_str()));
        std::fs::write(&tmp, "ceiling 1 and garbage from a crash").expect("tmp");
        store.store(&fp, 31).expect("store over a stale temp");
        assert_eq!(store.load(&fp).expect("load"), Some(31));
        assert!(!tmp.exists());
    }

    #[test]
    fn hardening_foreign_owned_dir_and_records_are_refused_root_only() {
        if !crate::fsperm::root_or_skip(
            "sa::reservation::hardening_foreign_owned_dir_and_records_are_refused_root_only",
        ) {
            return;
        }
        let dir = TempDir::new("resv-foreign");
        let store = ReservationStore::open(&dir.0).expect("store");
        let material = KeyMaterial::from_bytes(&[1u8; 20]).expect("material");
        let fp = Fingerprint::new(&material);
        store.store(&fp, 1000).expect("store");
        let rec = record(&dir, &fp);
        std::os::unix::fs::chown(&rec, Some(4242), Some(4242)).expect("chown");
        let err = store.load(&fp).expect_err("foreign record").to_string();
        assert!(err.contains("uid 4242") && err.contains("chown"), "{err}");
        let tmp = dir.0.join(format!("seq-{}.tmp", fp.as_str()));
        std::fs::write(&tmp, "x").expect("tmp");
        std::os::unix::fs::chown(&tmp, Some(4242), None).expect("chown");
        let err = store
            .store(&fp, 2000)
            .expect_err("foreign temp")
            .to_string();
        assert!(err.contains("uid 4242"), "{err}");
        assert_eq!(std::fs::read(&tmp).expect("tmp"), b"x", "left alone");

        std::os::unix::fs::chown(&dir.0, Some(4242), Some(4242)).expect("chown");
        let err = ReservationStore::open(&dir.0)
            .expect_err("foreign dir")
            .to_string();
        assert!(err.contains("uid 4242") && err.contains("chown"), "{err}");
    }
}
