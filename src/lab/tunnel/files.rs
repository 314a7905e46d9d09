//! The files the lab writes for its endpoints: keys, PSKs and configurations.

use std::net::IpAddr;
use std::path::PathBuf;

use super::{DemoError, METRICS_ADDR, Side, TunnelLab, io_err};
use crate::crypto::KeySize;
use crate::sa::KeyMaterial;
use crate::sa::reservation::ReservationStore;
use crate::wire::outer::Encap;

impl TunnelLab {
    pub fn key_file(&self, from: Side) -> PathBuf {
        match from {
            Side::A => self.dir.join("a-to-b.key"),
            Side::B => self.dir.join("b-to-a.key"),
        }
    }

    pub fn spi(from: Side) -> u32 {
        match from {
            Side::A => 0xa001,
            Side::B => 0xb001,
        }
    }

    /// New keys, as `esptun genkey` makes them: each recorded as fresh in
    /// the state directory of the host that sends with it.
    pub(super) fn write_keys(&self) -> Result<(), DemoError> {
        let size = if self.options.key_bits == 128 {
            KeySize::Aes128
        } else {
            KeySize::Aes256
        };
        for (from, state) in [(Side::A, &self.a.state_dir), (Side::B, &self.b.state_dir)] {
            let material =
                crate::keyfile::generate(size).map_err(|e| DemoError::Other(e.to_string()))?;
            let parsed =
                KeyMaterial::from_bytes(&material).map_err(|e| DemoError::Other(e.to_string()))?;
            ReservationStore::open(state)
                .and_then(|s| s.mark_fresh(&parsed))
                .map_err(|e| DemoError::Other(e.to_string()))?;
            crate::keyfile::write_new(&self.key_file(from), &material)
                .map_err(|e| DemoError::Other(e.to_string()))?;
        }
        Ok(())
    }

    /// Where a side's PSK file is (with [`LabOptions::ike`]).
    pub fn psk_file(&self, side: Side) -> PathBuf {
        self.dir.join(format!("{}.psk", side.name()))
    }

    /// One random PSK for both sides (mode 0600), or two with `wrong_psk`.
    pub(super) fn write_psks(&self) -> Result<(), DemoError> {
        let Some(ike) = self.options.ike else {
            return Ok(());
        };
        let psk = |tag: &str| -> Result<String, DemoError> {
            let bytes = crate::keyfile::generate(KeySize::Aes256)
                .map_err(|e| DemoError::Other(e.to_string()))?;
            Ok(format!("{}{tag}\n", crate::hex::encode(&bytes)))
        };
        let a = psk("")?;
        let b = if ike.wrong_psk { psk("x")? } else { a.clone() };
        for (side, text) in [(Side::A, a), (Side::B, b)] {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path = self.psk_file(side);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(io_err(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    /// Rewrites one side's configuration, e.g. to test bad inputs.
    pub fn write_config_text(&self, side: Side, text: &str) -> Result<(), DemoError> {
        let path = &self.endpoint(side).config;
        std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    /// The configuration a side was created with.
    pub fn config_text(&self, side: Side, local: IpAddr, remote: IpAddr) -> String {
        let me = self.endpoint(side);
        let (peer, out_from, in_from) = match side {
            Side::A => ("b", Side::A, Side::B),
            Side::B => ("a", Side::B, Side::A),
        };
        let (inner_local, inner_remote) = match side {
            Side::A => (self.a_inner, self.b_inner),
            Side::B => (self.b_inner, self.a_inner),
        };
        let mut extra = String::new();
        if let Encap::Udp { port } = self.options.encap
            && port != crate::wire::outer::NATT_PORT
        {
            extra.push_str(&format!("port = {port}\n"));
        }
        if self.options.metrics {
            extra.push_str(&format!("metrics_listen = \"{METRICS_ADDR}\"\n"));
        }
        if self.options.drop_capture {
            extra.push_str(&format!(
                "\n[drop_capture]\npath = \"{}\"\n",
                self.drop_capture_path(side).display()
            ));
        }
        if !self.options.inner_extra.is_empty() {
            extra.push_str(&format!("\n[inner]\n{}\n", self.options.inner_extra));
        }
        if self.options.offloads_off {
            extra.push_str(
                "\n[offloads]\ntun_checksum = \"off\"\ntso = \"off\"\nuso = \"off\"\n\
                 coalesce = \"off\"\nudp_gso = \"off\"\nudp_gro = \"off\"\n",
            );
        }
        let overlay = if self.options.overlay {
            format!("inner_local = \"{inner_local}\"\ninner_remote = \"{inner_remote}\"\n")
        } else {
            String::new()
        };
        let keys = match self.options.ike {
            None => format!(
                "outbound = {{ spi = {out_spi:#x}, key_file = \"{out_key}\", icv = {icv} }}\n\
                 inbound = {{ spi = {in_spi:#x}, key_file = \"{in_key}\", icv = {icv} }}\n",
                out_spi = Self::spi(out_from),
                out_key = self.key_file(out_from).display(),
                in_spi = Self::spi(in_from),
                in_key = self.key_file(in_from).display(),
                icv = self.options.icv,
            ),
            Some(ike) => format!(
                "[peer.ike]\npsk_file = \"{}\"\ninitiate = {}\n{}{}\n",
                self.psk_file(side).display(),
                ike.initiator == side,
                // Behind the NAT, a's identity is still its own address,
                // not the endpoint b sees it at (RFC 7296 section 2.23).
                if self.options.nat && side == Side::B {
                    format!("remote_id = \"{}\"\n", self.hosts.a_v4)
                } else {
                    String::new()
                },
                self.options.ike_extra
            ),
        };
        format!(
            "# Written by esptun's lab ({side:?}).\n\
             interface = \"esptun0\"\n\
             outer = \"{outer}\"\n\
             state_dir = \"{state}\"\n\
             control_socket = \"{control}\"\n\
             crypto = \"{crypto}\"\n\
             selftest_interval_secs = {interval}\n\
             rekey_switch_secs = {switch}\n\
             rekey_retire_secs = {retire}\n\
             {extra}\n\
             [[peer]]\n\
             name = \"{peer}\"\n\
             local = \"{local}\"\n\
             endpoint = \"{remote}\"\n\
             {overlay}\
             {keys}",
            outer = self.options.encap.mode(),
            state = me.state_dir.display(),
            control = me.control.display(),
            crypto = self.options.crypto,
            interval = self.options.selftest_interval_secs,
            switch = self.options.rekey_switch_secs,
            retire = self.options.rekey_retire_secs,
        )
    }

    pub(super) fn write_config(
        &self,
        side: Side,
        local: IpAddr,
        remote: IpAddr,
    ) -> Result<(), DemoError> {
        self.write_config_text(side, &self.config_text(side, local, remote))
    }

    /// Where a side captures inner-checksum drops (with `drop_capture`).
    pub fn drop_capture_path(&self, side: Side) -> PathBuf {
        self.dir.join(format!("{}-drops.pcap", side.name()))
    }
}
