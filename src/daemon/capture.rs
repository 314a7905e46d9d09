//! Post-mortem evidence for inner-checksum drops: the decrypted packets
//! written to a pcap file (LINKTYPE_RAW, so IPv4 and IPv6 mix), capped in
//! size and rotated, mode 0600; and the facts an investigation needs
//! first: the checksum found and the one the bytes call for, and which
//! 16-byte blocks repeat their neighbour (the corruption seen in the field,
//! where a block of plaintext was replaced by a copy of the one before it
//! before an otherwise valid seal).
//!
//! Decrypted traffic is as secret as the keys: the capture is opened
//! without following a link or blocking on a FIFO at its name, must be a
//! regular file of ours (one of ours that others could read is narrowed
//! to 0600 on the descriptor; anything else is refused), in a directory
//! no other account can use to swap it ([`crate::fsperm`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::DropCaptureConfig;
use crate::datapath::Flow;
use crate::fsperm::{self, DirError, Unsafe};
use crate::wire::inner::{Pseudo, checksum_mismatch};
use crate::wire::ip::{IPV6_HEADER_LEN, Ipv4Packet, Ipv6Packet};

/// pcap (not pcapng) global header fields: microsecond timestamps,
/// version 2.4, LINKTYPE_RAW (101): each record is an IP packet.
const MAGIC: u32 = 0xa1b2_c3d4;
const LINKTYPE_RAW: u32 = 101;
const SNAPLEN: u32 = 65535;
const RECORD_HEADER: u64 = 16;
const FILE_HEADER: u64 = 24;
/// Packets written per second at most: drops of this kind need a valid
/// ICV, so only a faulty sender (or a key holder) can cause them, but the
/// disk must not pay for a storm.
const MAX_PER_SECOND: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("drop capture {path}: {source} (check drop_capture.path: its directory must exist)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drop capture refused (it receives decrypted traffic): {0}")]
    Unsafe(Unsafe),
    #[error("drop capture directory refused (it receives decrypted traffic): {0}")]
    Dir(DirError),
}

/// The open capture file and its rotation state.
#[derive(Debug)]
pub struct DropCapture {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
    window: Instant,
    in_window: u32,
    /// Packets not written because of the per-second cap.
    pub skipped: u64,
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl DropCapture {
    /// Starts a new file; an existing one (from an earlier run) is rotated
    /// away, not overwritten: it may be the evidence.
    pub fn open(config: &DropCaptureConfig) -> Result<DropCapture, CaptureError> {
        fsperm::check_parent_of(&config.path).map_err(CaptureError::Dir)?;
        let (file, len) = new_file(&config.path)?;
        let mut capture = DropCapture {
            path: config.path.clone(),
            max_bytes: config.max_bytes,
            max_files: config.max_files.max(1),
            file,
            size: FILE_HEADER,
            window: Instant::now(),
            in_window: 0,
            skipped: 0,
        };
        if len > FILE_HEADER {
            capture.rotate()?;
        }
        Ok(capture)
    }

    /// Appends one packet (rotating first if it would not fit); false if
    /// the per-second cap skipped it.
    pub fn record(&mut self, packet: &[u8]) -> Result<bool, CaptureError> {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window >= MAX_PER_SECOND {
            self.skipped += 1;
            return Ok(false);
        }
        self.in_window += 1;
        let len = packet.len().min(SNAPLEN as usize);
        let needed = RECORD_HEADER + len as u64;
        if self.size + needed > self.max_bytes {
            self.rotate()?;
        }
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut record = Vec::with_capacity(RECORD_HEADER as usize + len);
        record.extend_from_slice(&(since.as_secs() as u32).to_le_bytes());
        record.extend_from_slice(&since.subsec_micros().to_le_bytes());
        record.extend_from_slice(&(len as u32).to_le_bytes());
        record.extend_from_slice(&(packet.len() as u32).to_le_bytes());
        record.extend_from_slice(&packet[..len]);
        self.file
            .write_all(&record)
            .map_err(|source| CaptureError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.size += needed;
        Ok(true)
    }

    /// PATH -> PATH.1 -> ... -> PATH.(max_files - 1); the oldest goes.
    fn rotate(&mut self) -> Result<(), CaptureError> {
        self.shift().map_err(|source| CaptureError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.file = new_file(&self.path)?.0;
        self.size = FILE_HEADER;
        Ok(())
    }

    /// Renames (never follows) the files one step down the line.
    fn shift(&self) -> std::io::Result<()> {
        if self.max_files > 1 {
            for n in (1..self.max_files - 1).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        Ok(())
    }
}

/// Opens (creating, mode 0600: decrypted traffic is as secret as the
/// keys) a capture file, writing the pcap header if it is empty; returns
/// the file and its length before.
fn new_file(path: &Path) -> Result<(File, u64), CaptureError> {
    let io_err = |source| CaptureError::Io {
        path: path.to_path_buf(),
        source,
    };
    let not_regular = |meta: &std::fs::Metadata| {
        CaptureError::Unsafe(Unsafe::Type {
            path: path.to_path_buf(),
            kind: fsperm::kind(meta),
            want: "a regular file",
        })
    };
    // Looked at first too, for the message: opening a FIFO for writing
    // without a reader fails with ENXIO, which says nothing useful. The
    // descriptor is what is checked below.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.is_file()
        && !meta.file_type().is_symlink()
    {
        return Err(not_regular(&meta));
    }
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match fsperm::symlink_error(path, &e) {
            Some(link) => CaptureError::Unsafe(link),
            None => io_err(e),
        })?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    fsperm::check_owner(path, &meta, false).map_err(CaptureError::Unsafe)?;
    if meta.mode() & 0o077 != 0 {
        // Ours, so ours to narrow: on the descriptor (fchmod), not the
        // path, so it is this file that stops being readable.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
        tracing::warn!(
            path = %path.display(),
            "drop capture had mode {:04o}; narrowed to 0600",
            meta.mode() & 0o7777
        );
    }
    if meta.len() == 0 {
        let mut header = Vec::with_capacity(FILE_HEADER as usize);
        header.extend_from_slice(&MAGIC.to_le_bytes());
        header.extend_from_slice(&2u16.to_le_bytes());
        header.extend_from_slice(&4u16.to_le_bytes());
        header.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        header.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        header.extend_from_slice(&SNAPLEN.to_le_bytes());
        header.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
        file.write_all(&header).map_err(io_err)?;
    }
    Ok((file, meta.len()))
}

/// What a decrypted, dropped packet says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub flow: Option<Flow>,
    /// (checksum found in the packet, checksum its bytes call for).
    pub checksums: Option<(u16, u16)>,
    /// 16-byte blocks of the transport segment (aligned as the cipher saw
    /// them: transport mode encrypts from the segment's first byte) that
    /// equal the block before them, as block indices, at most 8 listed.
    pub repeated_blocks: Vec<usize>,
    pub repeated_total: usize,
}

/// Explains a rebuilt IP packet dropped for its inner checksum.
pub fn explain(packet: &[u8]) -> Explanation {
    let flow = Flow::of_packet(packet);
    let (pseudo, segment) = match packet.first().map(|b| b >> 4) {
        Some(4) => match Ipv4Packet::new_checked(packet) {
            Ok(ip) => (
                Some(Pseudo::V4(ip.src(), ip.dst())),
                packet.get(ip.header_len()..).unwrap_or(&[]),
            ),
            Err(_) => (None, &[][..]),
        },
        Some(6) => match Ipv6Packet::new_checked(packet) {
            Ok(ip) => (
                Some(Pseudo::V6(ip.src(), ip.dst())),
                packet.get(IPV6_HEADER_LEN..).unwrap_or(&[]),
            ),
            Err(_) => (None, &[][..]),
        },
        _ => (None, &[][..]),
    };
    let checksums = match (pseudo, flow) {
        (Some(p), Some(f)) => checksum_mismatch(p, f.protocol, segment),
        _ => None,
    };
    let blocks: Vec<&[u8]> = segment.chunks_exact(16).collect();
    let repeats: Vec<usize> = (1..blocks.len())
        .filter(|&i| blocks[i] == blocks[i - 1])
        .collect();
    Explanation {
        flow,
        checksums,
        repeated_total: repeats.len(),
        repeated_blocks: repeats.into_iter().take(8).collect(),
    }
}

impl Explanation {
    /// The hint part of the log line.
    pub fn hint(&self) -> String {
        match self.repeated_total {
            0 => "no 16-byte block repeats its neighbour".into(),
            n => format!(
                "{n} 16-byte block(s) of the segment repeat the one before: {:?}{} (as in the field failure; \
                 in all-zero or padded data this is expected)",
                self.repeated_blocks,
                if n > self.repeated_blocks.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use crate::wire::inner::build;
    use crate::wire::ip::protocol;

    #[test]
    fn explains_a_replaced_block_and_the_checksums() {
        let payload: Vec<u8> = (0..96u8).collect();
        let mut packet = build::ipv4([198, 18, 0, 2], [198, 18, 0, 1], protocol::UDP, &payload);
        let good = packet.clone();
        // Segment blocks: 0 = UDP header + 8 payload bytes, 1.. = payload.
        let seg = 20;
        let (b2, b3) = (seg + 32, seg + 48);
        let copy: Vec<u8> = packet[b2..b2 + 16].to_vec();
        packet[b3..b3 + 16].copy_from_slice(&copy);
        let e = explain(&packet);
        assert_eq!(e.repeated_blocks, vec![3]);
        let (found, computed) = e.checksums.expect("UDP checksums");
        assert_eq!(found, u16::from_be_bytes([good[seg + 6], good[seg + 7]]));
        assert_ne!(found, computed);
        assert_eq!(e.flow.map(|f| f.protocol), Some(protocol::UDP));
        assert!(e.hint().contains("[3]"), "{}", e.hint());
    }

    #[test]
    fn writes_a_pcap_rotates_it_and_keeps_it_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("capture");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let config = DropCaptureConfig {
            path: dir.0.join("drops.pcap"),
            max_bytes: 1000,
            max_files: 3,
        };
        let mut c = DropCapture::open(&config).expect("open");
        let packet = build::ipv4([198, 18, 0, 2], [198, 18, 0, 1], protocol::UDP, &[7; 172]);
        assert_eq!(packet.len(), 200);
        for _ in 0..12 {
            assert!(c.record(&packet).expect("record"));
        }
        // 24 + 4 x 216 fit in 1000 bytes: 12 packets make three files.
        let sizes: Vec<u64> = ["drops.pcap", "drops.pcap.1", "drops.pcap.2"]
            .iter()
            .map(|n| std::fs::metadata(dir.0.join(n)).expect(n).len())
            .collect();
        assert_eq!(sizes, vec![24 + 4 * 216; 3]);
        assert!(!dir.0.join("drops.pcap.3").exists(), "at most max_files");
        let mode = std::fs::metadata(&config.path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let bytes = std::fs::read(&config.path).expect("read");
        assert_eq!(&bytes[..4], &MAGIC.to_le_bytes());
        assert_eq!(&bytes[20..24], &LINKTYPE_RAW.to_le_bytes());
        assert_eq!(&bytes[24 + 8..24 + 12], &200u32.to_le_bytes(), "incl_len");
        assert_eq!(&bytes[24 + 16..24 + 16 + 200], &packet[..]);

        // A restart keeps the earlier evidence.
        drop(c);
        let _again = DropCapture::open(&config).expect("reopen");
        assert_eq!(std::fs::metadata(&config.path).expect("meta").len(), 24);
        assert_eq!(
            std::fs::metadata(dir.0.join("drops.pcap.1"))
                .expect("rotated")
                .len(),
            24 + 4 * 216
        );
    }

    // Hardening: decrypted packets go only into a private regular file of
    // ours.

    fn capture_config(dir: &TempDir) -> DropCaptureConfig {
        std::fs::create_dir_all(&dir.0).expect("dir");
        DropCaptureConfig {
            path: dir.0.join("drops.pcap"),
            max_bytes: 1 << 20,
            max_files: 2,
        }
    }

    #[test]
    fn hardening_an_existing_readable_capture_is_narrowed_to_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("capture-mode");
        let config = capture_config(&dir);
        std::fs::write(&config.path, "").expect("write");
        std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let mut c = DropCapture::open(&config).expect("open");
        let packet = build::ipv4([198, 18, 0, 2], [198, 18, 0, 1], protocol::UDP, &[1; 8]);
        assert!(c.record(&packet).expect("record"));
        let mode = std::fs::metadata(&config.path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn hardening_a_link_fifo_or_shared_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("capture-link");
        let config = capture_config(&dir);
        let victim = dir.0.join("victim");
        std::fs::write(&victim, "keep").expect("victim");
        std::os::unix::fs::symlink(&victim, &config.path).expect("link");
        let err = DropCapture::open(&config).expect_err("link").to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"keep");
        std::fs::remove_file(&config.path).expect("unlink");

        nix::unistd::mkfifo(
            &config.path,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let err = DropCapture::open(&config).expect_err("fifo").to_string();
        assert!(err.contains("FIFO"), "{err}");
        std::fs::remove_file(&config.path).expect("unlink");

        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = DropCapture::open(&config)
            .expect_err("shared dir")
            .to_string();
        assert!(err.contains("chmod go-w"), "{err}");
    }

    #[test]
    fn hardening_a_capture_of_another_account_is_refused_root_only() {
        if !crate::fsperm::root_or_skip(
            "daemon::capture::hardening_a_capture_of_another_account_is_refused_root_only",
        ) {
            return;
        }
        let dir = TempDir::new("capture-foreign");
        let config = capture_config(&dir);
        std::fs::write(&config.path, "theirs").expect("write");
        std::os::unix::fs::chown(&config.path, Some(4242), Some(4242)).expect("chown");
        let err = DropCapture::open(&config).expect_err("foreign").to_string();
        assert!(err.contains("uid 4242"), "{err}");
        assert_eq!(std::fs::read(&config.path).expect("read"), b"theirs");
    }
}
