//! The host side: the namespace with the TAP, esptun's configuration and
//! keys for a case, and the esptun process.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use esptun::crypto::KeySize;
use esptun::lab::Netns;
use esptun::sa::KeyMaterial;
use esptun::sa::reservation::ReservationStore;

use crate::cases::Case;
use crate::common::wait_bounded;
use crate::{READY_TIMEOUT, SPI_IN, SPI_OUT};

/// The host side: namespace with the TAP, esptun, files.
pub struct Host {
    pub ns: Netns,
    pub dir: PathBuf,
    pub esptun: Option<Child>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.esptun.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keys of one case: what esptun sends with, and what the guest sends with.
pub struct Keys {
    pub out: KeyMaterial,
    pub out_hex: String,
    pub inb: KeyMaterial,
    pub inb_hex: String,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl Host {
    pub fn case_dir(&self, case: usize) -> PathBuf {
        self.dir.join(format!("case{case}"))
    }

    /// Fresh keys and esptun's configuration for `case`.
    pub fn configure(&self, index: usize, case: Case) -> (PathBuf, Keys) {
        let dir = self.case_dir(index);
        std::fs::create_dir_all(&dir).expect("case dir");
        let state = dir.join("state");
        let size = if case.key_bits == 128 {
            KeySize::Aes128
        } else {
            KeySize::Aes256
        };
        let mut material = Vec::new();
        for name in ["out.key", "in.key"] {
            let m = esptun::keyfile::generate(size).expect("random key");
            esptun::keyfile::write_new(&dir.join(name), &m).expect("key file");
            let parsed = KeyMaterial::from_bytes(&m).expect("key material");
            material.push((parsed, hex(&m)));
        }
        let (inb, inb_hex) = material.pop().expect("two keys");
        let (out, out_hex) = material.pop().expect("two keys");
        ReservationStore::open(&state)
            .and_then(|s| s.mark_fresh(&out))
            .expect("marking the outbound key fresh");
        let config = dir.join("esptun.toml");
        let text = format!(
            "# esptun interop test: the peer is the Linux kernel in a qemu guest.\n\
             interface = \"esptun0\"\n\
             outer = \"{outer}\"\n\
             state_dir = \"{state}\"\n\
             control_socket = \"{control}\"\n\
             \n\
             [[peer]]\n\
             name = \"kernel\"\n\
             local = \"{local}\"\n\
             endpoint = \"{endpoint}\"\n\
             outbound = {{ spi = {SPI_OUT:#x}, key_file = \"{out_key}\", icv = 16, esn = {esn} }}\n\
             inbound = {{ spi = {SPI_IN:#x}, key_file = \"{in_key}\", icv = 16, esn = {esn} }}\n",
            outer = if case.natt { "udp" } else { "esp" },
            local = case.host(),
            endpoint = case.guest(),
            state = state.display(),
            control = dir.join("esptun.sock").display(),
            out_key = dir.join("out.key").display(),
            in_key = dir.join("in.key").display(),
            esn = case.esn,
        );
        std::fs::write(&config, text).expect("config");
        (
            config,
            Keys {
                out,
                out_hex,
                inb,
                inb_hex,
            },
        )
    }

    pub fn start_esptun(&mut self, index: usize, config: &Path) -> Result<(), String> {
        let log = self.case_dir(index).join("esptun.log");
        let file = File::create(&log).map_err(|e| e.to_string())?;
        let child = self
            .ns
            .command(env!("CARGO_BIN_EXE_esptun"))
            .args(["run", "--log-level", "debug", "-c"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("starting esptun: {e}"))?;
        self.esptun = Some(child);
        let sock = self.case_dir(index).join("esptun.sock");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if esptun::daemon::control::query(&sock, "status").is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.esptun.as_mut().map(Child::try_wait) {
                self.esptun = None;
                return Err(format!(
                    "esptun exited with {status}: {}",
                    self.esptun_log(index)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("esptun not ready within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_esptun(&mut self) -> Result<ExitStatus, String> {
        let mut child = self.esptun.take().ok_or("esptun is not running")?;
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // Our own child, not yet reaped; a failure means it is gone.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        wait_bounded(&mut child, Duration::from_secs(15))
    }

    pub fn status(&self, index: usize) -> Result<serde_json::Value, String> {
        let sock = self.case_dir(index).join("esptun.sock");
        let reply = esptun::daemon::control::query(&sock, "status").map_err(|e| e.to_string())?;
        serde_json::from_str(&reply).map_err(|e| e.to_string())
    }

    pub fn esptun_log(&self, index: usize) -> String {
        let text =
            std::fs::read_to_string(self.case_dir(index).join("esptun.log")).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_string()
    }
}
