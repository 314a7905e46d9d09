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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;

use super::{KeyMaterial, OutboundSa};

/// Sequence numbers reserved per durable write.
pub const DEFAULT_BLOCK: u64 = 1 << 20;
const LABEL: &[u8] = b"esptun sequence reservation v2";
const FRESH_LABEL: &[u8] = b"esptun fresh key v1";

#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error(
        "cannot use state directory {path}: {source} (create it, owned by root with mode 0700, or set state_dir)"
    )]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
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
        if !std::fs::metadata(dir).map_err(dir_err)?.is_dir() {
            return Err(dir_err(std::io::Error::other("not a directory")));
        }
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
            .open(&path)
            .map_err(|source| ReservationError::Write {
                path: path.clone(),
                source,
            })?;
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
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ReservationError::Read { path, source }),
        };
        text.strip_prefix("ceiling ")
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
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write_err)?;
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
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|f| f.sync_all())
            .map_err(write_err)?;
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
        match std::fs::metadata(&fresh) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReservationError::Unrecorded {
                    dir: self.dir.clone(),
                });
            }
            Err(source) => {
                return Err(ReservationError::Read {
                    path: fresh,
                    source,
                });
            }
        }
        self.reserve_block(fp, sa, block)?;
        self.remove_durably(&fresh)?;
        Ok(Claim::Fresh)
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
}
