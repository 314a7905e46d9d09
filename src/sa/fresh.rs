//! Keys that have never carried traffic, and the order of steps that keeps
//! it so: the one place that records a key as fresh (`esptun genkey`,
//! `esptun declare-fresh`). The daemon starts a fresh key at sequence
//! number 1 exactly once; every other key resumes above its durable
//! reservation record ([`super::reservation`]).

use std::path::Path;

use zeroize::Zeroizing;

use super::KeyMaterial;
use super::reservation::{Fingerprint, ReservationError, ReservationStore};
use crate::crypto::KeySize;
use crate::keyfile::{self, KeyFileError};

#[derive(Debug, thiserror::Error)]
pub enum FreshError {
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error(transparent)]
    Record(#[from] ReservationError),
    #[error("new key material is malformed: {0}")]
    Material(#[from] super::SaError),
    #[error(
        "the key already has a record (sequence numbers up to {ceiling} reserved): it has been \
         used, so it is not fresh; nothing to do, the daemon resumes above it"
    )]
    AlreadyUsed { ceiling: u64 },
}

/// Generates key material of `size`, records it as never used in `store`,
/// then writes it to `output` (mode 0600, never over an existing file).
///
/// The order matters: the mark comes before the key exists, so a crash in
/// between leaves a mark for a key nobody has (harmless), never a key
/// without its mark (which the daemon would refuse until declared fresh).
/// An existing `output` is refused before any mark is made.
pub fn generate(
    size: KeySize,
    output: &Path,
    store: &ReservationStore,
) -> Result<Zeroizing<Vec<u8>>, FreshError> {
    let material = keyfile::generate(size)?;
    if output.exists() {
        // write_new refuses it, with its own message.
        keyfile::write_new(output, &material)?;
    }
    let parsed = KeyMaterial::from_bytes(&material)?;
    store.mark_fresh(&parsed)?;
    keyfile::write_new(output, &material)?;
    Ok(material)
}

/// Declares the key material made elsewhere as never used: refused if it
/// has a reservation record, which proves it has been used.
pub fn declare(material: &KeyMaterial, store: &ReservationStore) -> Result<(), FreshError> {
    if let Some(ceiling) = store.load(&Fingerprint::new(material))? {
        return Err(FreshError::AlreadyUsed { ceiling });
    }
    store.mark_fresh(material)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn a_generated_key_is_recorded_fresh_and_never_overwritten() {
        let dir = TempDir::new("fresh-generate");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let store = ReservationStore::open(&dir.0.join("state")).expect("store");
        let out = dir.0.join("a.key");
        let material = generate(KeySize::Aes256, &out, &store).expect("generate");
        let loaded = keyfile::load(&out).expect("load");
        assert_eq!(
            Fingerprint::new(&loaded),
            Fingerprint::new(&KeyMaterial::from_bytes(&material).expect("material"))
        );
        // A second genkey to the same file changes nothing.
        assert!(generate(KeySize::Aes256, &out, &store).is_err());
        assert_eq!(
            Fingerprint::new(&keyfile::load(&out).expect("load")),
            Fingerprint::new(&loaded)
        );
        // Fresh: declaring it again is allowed (no record yet).
        declare(&loaded, &store).expect("still fresh");
    }
}
