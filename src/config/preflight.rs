//! What `esptun run` checks before it changes anything on the system, in
//! one place, so that `esptun check-config` says "valid" exactly when the
//! daemon would go on to create its interface: the key files can be read
//! and are private, no key material serves two SAs, and the state
//! directory exists safely or can be created safely (the rules of
//! [`crate::fsperm`]). Nothing is created: no TUN, no sockets, no rules,
//! no directory. No privilege is needed beyond reading the key files,
//! which belong to the daemon's user.

use std::io::ErrorKind;
use std::path::Path;

use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::unistd::AccessFlags;

use super::Config;
use crate::keyfile::{self, KeyFileError};
use crate::sa::reservation::{Fingerprint, ReservationStore};

/// Added to a permission error: who may read what the daemon reads.
const AS_DAEMON_USER: &str = "run esptun check-config as the daemon's user (e.g. `runuser \
     -u esptun -- esptun check-config -c FILE`, as the systemd unit's ExecStartPre= does), or \
     as root if root owns the key files";

impl Config {
    /// Every check `esptun run` makes before it changes the system; `Err`
    /// lists every problem found, each naming the file and the fix.
    pub fn preflight(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        self.check_keys(&mut problems);
        self.check_psk_files(&mut problems);
        match state_dir_problem(&self.operations.state_dir) {
            Some(p) => problems.push(p),
            None => self.check_records(&mut problems),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Reads every key file once and refuses one key material in two
    /// places: GCM nonces are salt || sequence number, without the SPI
    /// (RFC 4106 section 4), so two SAs over one key, or both directions
    /// of one peer, would reuse nonces. A copied file is caught too.
    fn check_keys(&self, problems: &mut Vec<String>) {
        let mut seen: Vec<(Fingerprint, String)> = Vec::new();
        for peer in &self.peers {
            for (direction, sa) in [("outbound", &peer.outbound), ("inbound", &peer.inbound)] {
                let what = format!(
                    "peer {} {direction} SA {:#x} (key file {})",
                    peer.name,
                    sa.spi,
                    sa.key_file.display()
                );
                match keyfile::load(&sa.key_file) {
                    Ok(material) => {
                        let fp = Fingerprint::new(&material);
                        if let Some((_, first)) = seen.iter().find(|(f, _)| *f == fp) {
                            problems.push(format!(
                                "{first} and {what} use the same key material: GCM nonces \
                                 are salt || sequence number, so two SAs (or both directions) \
                                 sharing a key would reuse nonces; give every SA its own key \
                                 with `esptun genkey`"
                            ));
                        } else {
                            seen.push((fp, what));
                        }
                    }
                    Err(e @ KeyFileError::Read { .. }) if denied(&e) => {
                        problems.push(format!("{e}; {AS_DAEMON_USER}"));
                    }
                    Err(e) => problems.push(e.to_string()),
                }
            }
        }
    }
}

impl Config {
    /// Every `[peer.ike]` PSK file can be read and is private (the rules
    /// of key files: [`super::ike::load_psk`]).
    fn check_psk_files(&self, problems: &mut Vec<String>) {
        for peer in &self.ike_peers {
            match super::ike::load_psk(&peer.ike.psk_file) {
                Ok(_) => {}
                Err(e @ super::ike::PskError::Read { .. })
                    if matches!(&e, super::ike::PskError::Read { source, .. }
                        if source.kind() == ErrorKind::PermissionDenied) =>
                {
                    problems.push(format!("peer {}: {e}; {AS_DAEMON_USER}", peer.name));
                }
                Err(e) => problems.push(format!("peer {}: {e}", peer.name)),
            }
        }
    }

    /// Every outbound key must have a sequence record or a fresh mark, as
    /// `run` requires when it claims its first block. Read only; skipped
    /// while the state directory does not exist yet (`run` creates it, and
    /// then refuses an unrecorded key the same way).
    fn check_records(&self, problems: &mut Vec<String>) {
        if !self.operations.state_dir.is_dir() {
            return;
        }
        let store = match ReservationStore::open(&self.operations.state_dir) {
            Ok(store) => store,
            Err(e) => return problems.push(e.to_string()),
        };
        for peer in &self.peers {
            let Ok(material) = keyfile::load(&peer.outbound.key_file) else {
                continue; // reported by check_keys
            };
            if let Err(e) = store.can_claim(&Fingerprint::new(&material), &material) {
                problems.push(format!(
                    "peer {} outbound SA {:#x} (key file {}): {e}",
                    peer.name,
                    peer.outbound.spi,
                    peer.outbound.key_file.display()
                ));
            }
        }
    }
}

fn denied(e: &KeyFileError) -> bool {
    matches!(e, KeyFileError::Read { source, .. } if source.kind() == ErrorKind::PermissionDenied)
}

/// Whether the state directory can be used as `ReservationStore::open`
/// uses it: an existing one must pass [`crate::fsperm::check_dir_chain`]
/// and be writable; a missing one must have an existing ancestor this user
/// can create directories in, itself under safe ancestors.
fn state_dir_problem(dir: &Path) -> Option<String> {
    let problem = |why: String| Some(format!("state_dir {}: {why}", dir.display()));
    match std::fs::metadata(dir) {
        Ok(_) => {
            if let Err(e) = crate::fsperm::check_dir_chain(dir) {
                return problem(e.to_string());
            }
            writable(dir).err().and_then(problem)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // The deepest ancestor that exists is where creation starts.
            let Some(base) = dir.ancestors().skip(1).find(|a| a.exists()) else {
                return problem("no ancestor exists".into());
            };
            let real = match std::fs::canonicalize(base) {
                Ok(real) => real,
                Err(e) => return problem(format!("{}: {e}", base.display())),
            };
            if !real.is_dir() {
                return problem(format!(
                    "it cannot be created: {} is not a directory",
                    real.display()
                ));
            }
            if let Err(why) = writable(&real) {
                return problem(format!("it does not exist and cannot be created: {why}"));
            }
            // `base` becomes an ancestor of the state directory.
            crate::fsperm::check_ancestors(&real.join("_"))
                .err()
                .and_then(|e| {
                    problem(format!(
                        "it would be created under an unsafe directory: {e}"
                    ))
                })
        }
        Err(e) if e.kind() == ErrorKind::NotADirectory => {
            problem("it cannot be created: part of the path is a file, not a directory".into())
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            problem(format!("{e}; {AS_DAEMON_USER}"))
        }
        Err(e) => problem(e.to_string()),
    }
}

/// This process (effective ids) may add entries to `dir`.
fn writable(dir: &Path) -> Result<(), String> {
    nix::unistd::faccessat(
        AT_FDCWD,
        dir,
        AccessFlags::W_OK | AccessFlags::X_OK,
        AtFlags::AT_EACCESS,
    )
    .map_err(|errno| {
        format!(
            "{} is not writable by this user (uid {}): {errno}; create the directory for the \
             daemon's user (`install -d -m 700 -o esptun -g esptun DIR`, which the systemd \
             unit's StateDirectory= does), or {AS_DAEMON_USER}",
            dir.display(),
            crate::fsperm::euid()
        )
    })
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
    fn a_state_dir_is_checked_without_being_created() {
        let dir = TempDir::new("preflight-state");
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        chmod(&dir.0, 0o755);
        let missing = dir.0.join("a").join("b");
        assert_eq!(state_dir_problem(&missing), None);
        assert!(!dir.0.join("a").exists(), "nothing is created");

        // An existing one must be private.
        let existing = dir.0.join("state");
        std::fs::create_dir(&existing).expect("mkdir");
        chmod(&existing, 0o700);
        assert_eq!(state_dir_problem(&existing), None);
        chmod(&existing, 0o777);
        let p = state_dir_problem(&existing).expect("world-writable");
        assert!(p.contains("chmod 700"), "{p}");

        // Under a directory others can write, it would be swappable.
        chmod(&dir.0, 0o777);
        let p = state_dir_problem(&missing).expect("unsafe ancestor");
        assert!(
            p.contains("unsafe directory") && p.contains("chmod go-w"),
            "{p}"
        );
        chmod(&dir.0, 0o755);

        // A file where a directory should be.
        let file = dir.0.join("file");
        std::fs::write(&file, "").expect("write");
        let p = state_dir_problem(&file.join("state")).expect("file");
        assert!(p.contains("not a directory"), "{p}");
    }
}
