//! `esptun wireshark-keys`: a configuration's SAs as records of Wireshark's
//! ESP SA table, so that a capture of the wire can be decrypted.
//!
//! **The output contains the SAs' secret keys, on purpose.** Anyone holding
//! it can decrypt every packet ever sent on those SAs and forge new ones.
//! It is produced only on request and is never logged.
//!
//! # The record format
//!
//! Wireshark keeps the table as the UAT (user access table) `esp_sa`: the
//! file `esp_sa` in the profile directory (`~/.config/wireshark/esp_sa`),
//! the GUI's Preferences > Protocols > ESP > ESP SAs, or one record per
//! `tshark -o "uat:esp_sa:RECORD"`. A record is one line of comma-separated,
//! double-quoted fields, in the order of `esp_uat_flds[]` in Wireshark's
//! `epan/dissectors/packet-ipsec.c` (3.x and 4.0, which Debian 12 ships as
//! 4.0.17):
//!
//! ```text
//! "IPv4","198.18.0.1","198.18.0.2","0x0000a001","AES-GCM with 16 octet ICV [RFC4106]","0x<key><salt>","NULL",""
//! ```
//!
//! 1. protocol: `IPv4` or `IPv6` (`esp_proto_type_vals`);
//! 2. source and 3. destination address, as they appear in the IP header
//!    that carries the ESP packet;
//! 4. SPI, parsed by `strtoul(.., 0)`, so `0x` hex works;
//! 5. encryption algorithm, by its name in `esp_encryption_type_vals`:
//!    `AES-GCM with 8|12|16 octet ICV [RFC4106]`;
//! 6. encryption key: `0x` and hex of the RFC 4106 key material, key then
//!    4-byte salt (Wireshark takes the last 4 bytes of the key as the salt
//!    for AES-GCM and AES-CTR);
//! 7. authentication algorithm: `NULL`, the only one Wireshark accepts
//!    with AES-GCM (the ICV is GCM's tag);
//! 8. authentication key: empty.
//!
//! Wireshark 4.0 has no field for extended sequence numbers: its GCM tag
//! check (`esp.enable_authentication_check`) authenticates only the 8-byte
//! ESP header (SPI, low 32 bits of the sequence number), while an ESN SA
//! (esptun's default, `esn = true`) authenticates SPI || high || low
//! (RFC 4106 section 5). Decryption does not depend on the AAD, so with ESN
//! Wireshark decrypts and dissects the inner packets correctly but, if its
//! authentication check is enabled, reports their ICVs as wrong. For SAs
//! with `esn = false` the check passes.
//!
//! # Which addresses
//!
//! Wireshark matches an SA by the addresses of the IP header in front of
//! the ESP packet (also for UDP-encapsulated ESP, which keeps that IP
//! header), so the records carry the *outer* addresses: outbound from
//! `local` to `endpoint`, inbound from `endpoint` to `local`. With overlay
//! inner addresses these differ from the addresses inside the tunnel.
//!
//! # NAT-T
//!
//! ESP in UDP (`outer = "udp"`) is recognised by Wireshark's UDPENCAP
//! dissector, which Wireshark (4.0) attaches to UDP port 4500 by default
//! (Decode As table `udp.port`, entry 4500 -> `udpencap`; there is no
//! separate preference to enable). If the peers use another `port`, tell
//! Wireshark with Decode As: `tshark -d udp.port==PORT,udpencap`. Decryption
//! itself needs the ESP preference `esp.enable_encryption_decode: TRUE`
//! (Preferences > Protocols > ESP > "Attempt to detect/decode encrypted ESP
//! payloads").

use std::fmt::Write as _;
use std::net::IpAddr;

use zeroize::Zeroizing;

use crate::config::Valid;
use crate::crypto::IcvLen;
use crate::keyfile::{self, KeyFileError};
use crate::sa::KeyMaterial;

/// The name of Wireshark's ESP SA table (the UAT file and `-o uat:` name).
pub const UAT_NAME: &str = "esp_sa";

/// Wireshark's name for AES-GCM (RFC 4106) with an ICV of `icv` bytes.
pub fn encryption_algorithm(icv: IcvLen) -> &'static str {
    match icv {
        IcvLen::Icv8 => "AES-GCM with 8 octet ICV [RFC4106]",
        IcvLen::Icv12 => "AES-GCM with 12 octet ICV [RFC4106]",
        IcvLen::Icv16 => "AES-GCM with 16 octet ICV [RFC4106]",
    }
}

/// One `esp_sa` record (no line end) for packets from `src` to `dst` on
/// SPI `spi`. Secret: it contains the key.
pub fn esp_sa_record(
    src: IpAddr,
    dst: IpAddr,
    spi: u32,
    icv: IcvLen,
    material: &KeyMaterial,
) -> Zeroizing<String> {
    let protocol = if src.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut key = Zeroizing::new(String::with_capacity(2 + 2 * 36));
    key.push_str("0x");
    key.push_str(&Zeroizing::new(crate::hex::encode(material.key().expose())));
    key.push_str(&Zeroizing::new(crate::hex::encode(material.salt())));
    // Every field is quoted; none can contain a quote, backslash or
    // non-printable byte that UAT would need escaped. Sized for the longest
    // record (two full IPv6 addresses), so the string never grows and
    // leaves no copy of the key behind in freed memory.
    let mut record = Zeroizing::new(String::with_capacity(512));
    let _ = write!(
        *record,
        "\"{protocol}\",\"{src}\",\"{dst}\",\"0x{spi:08x}\",\"{}\",\"{}\",\"NULL\",\"\"",
        encryption_algorithm(icv),
        key.as_str()
    );
    record
}

/// Every SA of `config`, both directions of each peer (outbound, then
/// inbound), one `esp_sa` record per line, each ending in `\n`. Reads the
/// key files (so it needs the daemon's privileges). Secret: it contains
/// the keys.
pub fn esp_sa_records(config: &Valid) -> Result<Zeroizing<String>, KeyFileError> {
    let mut out = Zeroizing::new(String::new());
    for peer in &config.peers {
        for (sa, src, dst) in [
            (&peer.outbound, peer.local, peer.endpoint),
            (&peer.inbound, peer.endpoint, peer.local),
        ] {
            let material = keyfile::load(&sa.key_file)?;
            out.push_str(&esp_sa_record(src, dst, sa.spi, sa.icv, &material));
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::Config;
    use crate::testutil::TempDir;

    /// 32-byte key 00..1f, salt cafebabe.
    const KEY256: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fcafebabe";
    /// 16-byte key f0..ff, salt 01020304.
    const KEY128: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff01020304";

    fn material(hex: &str) -> KeyMaterial {
        KeyMaterial::from_bytes(&crate::hex::decode(hex).expect("hex")).expect("material")
    }

    #[test]
    fn a_record_is_what_wireshark_4_0_parses() {
        let r = esp_sa_record(
            "198.18.30.1".parse().expect("ip"),
            "198.18.30.2".parse().expect("ip"),
            0xa001,
            IcvLen::Icv16,
            &material(KEY256),
        );
        assert_eq!(
            r.as_str(),
            "\"IPv4\",\"198.18.30.1\",\"198.18.30.2\",\"0x0000a001\",\
             \"AES-GCM with 16 octet ICV [RFC4106]\",\
             \"0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fcafebabe\",\
             \"NULL\",\"\""
        );
        let r = esp_sa_record(
            "2001:db8:1e::2".parse().expect("ip"),
            "2001:db8:1e::1".parse().expect("ip"),
            0xdead_beef,
            IcvLen::Icv8,
            &material(KEY128),
        );
        assert_eq!(
            r.as_str(),
            "\"IPv6\",\"2001:db8:1e::2\",\"2001:db8:1e::1\",\"0xdeadbeef\",\
             \"AES-GCM with 8 octet ICV [RFC4106]\",\
             \"0xf0f1f2f3f4f5f6f7f8f9fafbfcfdfeff01020304\",\"NULL\",\"\""
        );
        assert_eq!(
            encryption_algorithm(IcvLen::Icv12),
            "AES-GCM with 12 octet ICV [RFC4106]"
        );
    }

    #[test]
    fn every_sa_of_every_peer_in_both_directions_with_outer_addresses() {
        let dir = TempDir::new("wireshark-records");
        fs::create_dir_all(&dir.0).expect("dir");
        let key = |name: &str, hex: &str| {
            let path = dir.0.join(name);
            fs::write(&path, format!("{hex}\n")).expect("write key");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
            path.display().to_string()
        };
        let (out_b, in_b) = (key("ob", KEY256), key("ib", KEY128));
        let (out_c, in_c) = (key("oc", KEY128), key("ic", KEY256));
        let text = format!(
            r#"
[[peer]]
name = "b"
local = "198.18.30.1"
endpoint = "198.18.30.2"
inner_local = "10.0.0.1"
inner_remote = "10.0.0.2"
outbound = {{ spi = 0xa001, key_file = "{out_b}" }}
inbound = {{ spi = 0xb001, key_file = "{in_b}", icv = 12 }}

[[peer]]
name = "c"
local = "2001:db8::1"
endpoint = "2001:db8::3"
outbound = {{ spi = 0x1234, key_file = "{out_c}", icv = 8, esn = false }}
inbound = {{ spi = 0x5678, key_file = "{in_c}" }}
"#
        );
        let config = Config::parse(&text).expect("valid config");
        let out = esp_sa_records(&config).expect("records");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                esp_sa_record(
                    "198.18.30.1".parse().expect("ip"),
                    "198.18.30.2".parse().expect("ip"),
                    0xa001,
                    IcvLen::Icv16,
                    &material(KEY256)
                )
                .as_str(),
                esp_sa_record(
                    "198.18.30.2".parse().expect("ip"),
                    "198.18.30.1".parse().expect("ip"),
                    0xb001,
                    IcvLen::Icv12,
                    &material(KEY128)
                )
                .as_str(),
                esp_sa_record(
                    "2001:db8::1".parse().expect("ip"),
                    "2001:db8::3".parse().expect("ip"),
                    0x1234,
                    IcvLen::Icv8,
                    &material(KEY128)
                )
                .as_str(),
                esp_sa_record(
                    "2001:db8::3".parse().expect("ip"),
                    "2001:db8::1".parse().expect("ip"),
                    0x5678,
                    IcvLen::Icv16,
                    &material(KEY256)
                )
                .as_str(),
            ]
        );
        assert!(out.ends_with('\n'));
        assert!(
            !out.contains("10.0.0."),
            "inner addresses never: {}",
            out.as_str()
        );

        // A key file others can read is refused here as everywhere.
        fs::set_permissions(&in_b, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = esp_sa_records(&config)
            .expect_err("exposed key")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
