//! The guest kernel's SAs and policies (`ip xfrm`) for a case.

use crate::cases::Case;
use crate::host::Keys;
use crate::{SPI_IN, SPI_OUT, Suite};

impl Suite {
    /// The guest's SAs and policies for `case`, with the keys esptun uses.
    pub fn guest_xfrm(&mut self, case: Case, keys: &Keys) -> Result<(), String> {
        self.guest_sh("/sbin/ip xfrm state flush && /sbin/ip xfrm policy flush")?;
        let (host, guest) = (case.host(), case.guest());
        let encap = match (case.natt, case.v6) {
            (false, _) => "",
            (true, false) => " encap espinudp 4500 4500 0.0.0.0",
            (true, true) => " encap espinudp 4500 4500 ::",
        };
        let esn = if case.esn {
            " flag esn replay-window 128"
        } else {
            " replay-window 64"
        };
        let aead = |k: &str| format!("aead 'rfc4106(gcm(aes))' 0x{k} 128");
        // Guest -> host: the guest's outbound (esptun's inbound key).
        self.guest_sh(&format!(
            "/sbin/ip xfrm state add src {guest} dst {host} proto esp spi {SPI_IN:#x} reqid 1 \
             mode transport{esn} {}{encap}",
            aead(&keys.inb_hex)
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm state add src {host} dst {guest} proto esp spi {SPI_OUT:#x} reqid 1 \
             mode transport{esn} {}{encap}",
            aead(&keys.out_hex)
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm policy add src {guest} dst {host} dir out priority 10 \
             tmpl src {guest} dst {host} proto esp reqid 1 mode transport"
        ))?;
        self.guest_sh(&format!(
            "/sbin/ip xfrm policy add src {host} dst {guest} dir in priority 10 \
             tmpl src {host} dst {guest} proto esp reqid 1 mode transport"
        ))?;
        if case.v6 {
            // Neighbour solicitations and advertisements (ICMPv6, protocol
            // 58: the guest has no /etc/protocols) stay in the clear
            // (the unicast ones match the selectors above): the host's
            // kernel sends its own on the TAP, outside esptun, and IKE
            // daemons install the same bypass.
            for ty in [135, 136] {
                for dir in ["out", "in"] {
                    self.guest_sh(&format!(
                        "/sbin/ip xfrm policy add src ::/0 dst ::/0 proto 58 type {ty} \
                         dir {dir} priority 1"
                    ))?;
                }
            }
        }
        Ok(())
    }
}
