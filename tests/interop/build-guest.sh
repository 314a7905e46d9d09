#!/usr/bin/env bash
# Builds the guest for esptun's kernel-interop suite (tests/interop/) and
# its strongSwan interop (tests/strongswan.rs): a Debian kernel and a small
# initramfs (static busybox, iproute2's real `ip` with its libraries, the
# kernel modules ESP needs, nettool, and strongSwan's charon and swanctl
# with the few plugins IKEv2 with a PSK, AES-GCM, X25519 and ECP-256 need), cached in
# ${ESPTUN_INTEROP_CACHE:-/var/cache/esptun-interop}. Idempotent: a second run
# with the same inputs does nothing and prints the same paths.
#
# strongSwan comes from this machine's apt sources (`apt-get download`,
# `dpkg-deb -x`), never installed: libstrongswan, its standard plugins (gcm),
# its extra plugins (curve25519: X25519; ECP-256 comes from the openssl
# plugin and the host's libcrypto),
# strongswan-libcharon, strongswan-charon and strongswan-swanctl. Its shared
# libraries (libcap, libsystemd and what that pulls in) are the host's, as
# ldd finds them.
#
# Needs root (apt-get). Installs what is missing: qemu-system-x86,
# busybox-static, kmod (depmod), cpio, gcc, and the libraries strongSwan
# links (libcap2, libsystemd0).
#
# Prints, as its last lines on stdout:
#   kernel=/path/to/vmlinuz
#   initrd=/path/to/initrd.gz
#   kernel_version=6.1.0-NN-amd64
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${ESPTUN_INTEROP_CACHE:-/var/cache/esptun-interop}"
mkdir -p "$cache"
exec 9>"$cache/.lock"
# One builder at a time (parallel test binaries, two CI jobs).
flock -w 600 9

log() { echo "build-guest: $*" >&2; }

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || missing+=(kmod)
command -v cpio >/dev/null || missing+=(cpio)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
# libstrongswan's own libraries (the guest's copies come from the host);
# libsystemd0 brings the rest (libgcrypt, liblz4, liblzma, libzstd).
for lib in libcap2 libsystemd0; do
    dpkg -s "$lib" >/dev/null 2>&1 || missing+=("$lib")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
depmod=$(command -v depmod || echo /usr/sbin/depmod)

# The kernel: the version linux-image-amd64 currently depends on.
# (awk reads to the end: an early exit would kill apt-cache with SIGPIPE,
# which pipefail and set -e turn into the script's failure.)
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !p {p = $2} END {print p}'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq >&2 || true
    pkg=$(resolve)
fi
if [ -z "$pkg" ]; then
    # Offline with a cache: reuse the newest kernel already unpacked.
    pkg=$(ls -1 "$cache" | grep -E '^linux-image-[0-9].*-amd64$' | sort -V | tail -1 || true)
fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-amd64's kernel package"; exit 1; }
kver=${pkg#linux-image-}
kdir="$cache/$pkg"
if [ ! -f "$kdir/.unpacked" ]; then
    log "fetching $pkg"
    rm -rf "$kdir" "$cache/dl"
    mkdir -p "$cache/dl"
    chown _apt "$cache/dl" 2>/dev/null || true
    (cd "$cache/dl" && apt-get download "$pkg" >&2)
    dpkg-deb -x "$cache"/dl/"$pkg"_*.deb "$kdir"
    rm -rf "$cache/dl"
    touch "$kdir/.unpacked"
fi
vmlinuz="$kdir/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || { log "no $vmlinuz in $pkg"; exit 1; }
if [ ! -f "$kdir/lib/modules/$kver/modules.dep" ]; then
    "$depmod" -b "$kdir" "$kver"
fi

# strongSwan: the candidate version of its packages, unpacked once per
# version (only the files the guest takes are kept).
ss_pkgs="libstrongswan libstrongswan-standard-plugins libstrongswan-extra-plugins \
         strongswan-libcharon strongswan-charon strongswan-swanctl"
ss_ver=$(apt-cache show --no-all-versions strongswan-charon 2>/dev/null | awk '/^Version:/ && !v {v = $2} END {print v}')
if [ -z "$ss_ver" ]; then
    # Offline with a cache: the newest strongSwan already unpacked.
    ss_ver=$(ls -1 "$cache" | sed -n 's/^strongswan-//p' | sort -V | tail -1 || true)
fi
[ -n "$ss_ver" ] || { log "cannot resolve strongswan-charon's version"; exit 1; }
ssdir="$cache/strongswan-$ss_ver"
if [ ! -f "$ssdir/.unpacked" ]; then
    log "fetching strongSwan $ss_ver"
    rm -rf "$ssdir" "$cache/dl"
    mkdir -p "$cache/dl" "$ssdir.tmp"
    chown _apt "$cache/dl" 2>/dev/null || true
    # All six at one version: apt resolves each name to its candidate.
    (cd "$cache/dl" && apt-get download $(for p in $ss_pkgs; do echo "$p=$ss_ver"; done) >&2)
    for deb in "$cache"/dl/*.deb; do
        dpkg-deb -x "$deb" "$ssdir.tmp"
    done
    rm -rf "$cache/dl" "$ssdir.tmp/usr/share" "$ssdir.tmp/etc"
    mv "$ssdir.tmp" "$ssdir"
    touch "$ssdir/.unpacked"
fi
# charon's plugins: sockets and the kernel's xfrm (netlink), randomness and
# nonces, AES-GCM, HMAC-SHA2 PRFs and prf+ (kdf), X25519, SHA-1 (charon's
# SA managers and NAT detection require it), and vici for swanctl. A PSK
# needs no certificate or key parser. openssl (with the host's libcrypto)
# for ECP-256, which no other packaged plugin here offers
# (tests/strongswan_daemon/ negotiates it).
ss_plugins="random nonce aes gcm sha1 sha2 hmac kdf curve25519 openssl kernel-netlink socket-default vici"

# Everything the initramfs is made of decides whether to rebuild it.
stamp=$( {
    echo "$pkg"
    echo "strongswan $ss_ver $ss_plugins"
    cat "$0" "$here/nettool.c"
    sha256sum /bin/busybox "$(command -v ip)" 2>/dev/null
} | sha256sum | cut -c1-16)
initrd="$cache/initrd-$kver-$stamp.gz"
nettool="$cache/nettool-$stamp"

if [ ! -f "$initrd" ]; then
    log "building $initrd"
    gcc -static -O2 -Wall -o "$nettool.tmp" "$here/nettool.c"
    mv "$nettool.tmp" "$nettool"
    root=$(mktemp -d "$cache/root.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,lib,lib64,etc,usr/lib,var}
    cp /bin/busybox "$root/bin/busybox"
    # The kernel's request_module runs /sbin/modprobe.
    ln -s ../bin/busybox "$root/sbin/modprobe"
    for applet in sh mount modprobe insmod cat echo sleep stty ls ping ping6 kill ps grep sed head tail dmesg seq tr true false wc mkdir rm printf pidof; do
        ln -s busybox "$root/bin/$applet"
    done
    # The real iproute2 `ip` (busybox's applet has no xfrm), with its
    # libraries and the dynamic loader, at the paths ldd reports.
    ipbin=$(readlink -f "$(command -v ip)")
    cp "$ipbin" "$root/sbin/ip"
    # Copies the libraries $1 needs from the host, where ldd finds them;
    # strongSwan's own (in $ssdir) are copied with the binaries.
    host_libs() {
        local out
        out=$(LD_LIBRARY_PATH="$ssdir/usr/lib/ipsec" ldd "$1")
        if grep -q 'not found' <<<"$out"; then
            log "$1 needs libraries this machine lacks:"; grep 'not found' <<<"$out" >&2; exit 1
        fi
        awk '/=>/ {print $3} /^[ \t]*\// {print $1}' <<<"$out" | while read -r lib; do
            [ -f "$lib" ] || continue
            case "$lib" in "$ssdir"/*) continue ;; esac
            [ -f "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    }
    host_libs "$ipbin"
    # strongSwan at its packaged paths: charon, swanctl, their libraries
    # and the plugins charon loads (strongswan.conf below names them).
    mkdir -p "$root/usr/lib/ipsec/plugins" "$root/usr/sbin"
    cp -a "$ssdir/usr/lib/ipsec/charon" "$root/usr/lib/ipsec/"
    cp -a "$ssdir/usr/sbin/swanctl" "$root/usr/sbin/"
    for l in libstrongswan libcharon libvici; do
        cp -a "$ssdir/usr/lib/ipsec/$l.so.0" "$ssdir/usr/lib/ipsec/$l.so.0.0.0" "$root/usr/lib/ipsec/"
    done
    for p in $ss_plugins; do
        cp "$ssdir/usr/lib/ipsec/plugins/libstrongswan-$p.so" "$root/usr/lib/ipsec/plugins/"
        host_libs "$ssdir/usr/lib/ipsec/plugins/libstrongswan-$p.so"
    done
    host_libs "$ssdir/usr/lib/ipsec/charon"
    host_libs "$ssdir/usr/sbin/swanctl"
    # glibc dlopens libgcc_s for pthread_cancel (charon's threads): ldd
    # cannot see it.
    gcc_s=$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ && !p {p = $NF} END {print p}')
    [ -n "$gcc_s" ] || { log "no libgcc_s.so.1 on this machine"; exit 1; }
    mkdir -p "$root$(dirname "$gcc_s")"
    cp -L "$gcc_s" "$root$gcc_s"
    ln -s ../run "$root/var/run"
    mkdir -p "$root/etc/swanctl"/{conf.d,x509,x509ca,private,rsa,ecdsa,pkcs8,pkcs12}
    # No include of strongswan.d: every setting is here. Logs: a file the
    # test reads (and prints on failure), IKE and configuration (received
    # and configured proposals) at level 2.
    cat > "$root/etc/strongswan.conf" <<CONF
charon {
    load = $ss_plugins
    install_routes = no
    install_virtual_ip = no
    filelog {
        charon {
            path = /tmp/charon.log
            # Whole lines on disk: the test reads the file while charon runs.
            flush_line = yes
            time_format = %T
            ike_name = yes
            default = 1
            ike = 2
            cfg = 2
        }
    }
}
swanctl {
    load = random nonce
}
CONF
    cp "$nettool" "$root/bin/nettool"
    # Modules and their dependencies (modules.dep), uncompressed.
    # The default RNG first (AES-GCM SAs need it), in dependency order:
    # jitterentropy_rng allocates "sha3-256-generic" at load, a dependency
    # modules.dep cannot list.
    mods="sha512_generic sha3_generic jitterentropy_rng drbg esp4 esp6 xfrm_user xfrm_algo aesni_intel gcm \
          ghash_generic ghash_clmulni_intel ctr seqiv virtio_net virtio_pci"
    mdir="$kdir/lib/modules/$kver"
    want=()
    for m in $mods; do
        line=$(grep -E "(^|/)${m//_/[_-]}\.ko(\.[a-z]+)?:" "$mdir/modules.dep" || true)
        if [ -z "$line" ]; then
            if grep -qE "(^|/)${m//_/[_-]}\.ko" "$mdir/modules.builtin" 2>/dev/null; then
                continue
            fi
            log "module $m is neither a module nor built in"; exit 1
        fi
        want+=(${line//:/})
    done
    printf '%s\n' "${want[@]}" | sort -u | while read -r rel; do
        mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
        case "$rel" in
            *.ko.xz) xz -dc "$mdir/$rel" > "$root/lib/modules/$kver/${rel%.xz}" ;;
            *.ko.zst) zstd -qdc "$mdir/$rel" > "$root/lib/modules/$kver/${rel%.zst}" ;;
            *.ko.gz) gzip -dc "$mdir/$rel" > "$root/lib/modules/$kver/${rel%.gz}" ;;
            *) cp "$mdir/$rel" "$root/lib/modules/$kver/$rel" ;;
        esac
    done
    cp "$mdir/modules.builtin" "$mdir/modules.order" "$root/lib/modules/$kver/" 2>/dev/null || true
    "$depmod" -b "$root" "$kver"
    echo "$mods" > "$root/etc/modules"
    cat > "$root/init" <<'INIT'
#!/bin/sh
# esptun interop guest. Console (kernel and this script's log): ttyS0.
# Control channel: ttyS1, one shell command per line; each answer is the
# command's output followed by the line "@@RC <exit status>".
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp/out
for m in $(cat /etc/modules); do
    modprobe "$m" || echo "esptun-guest: modprobe $m failed"
done
/sbin/ip link set lo up
echo "esptun-guest: modules loaded; control on ttyS1"
# The control loop must not be PID 1: background commands are reparented
# to PID 1 when their `sh -c` exits, and their SIGCHLD would interrupt the
# shell's `read` in the middle of a command line.
/bin/sh /bin/control &
while true; do
    wait
    sleep 1
done
INIT
    cat > "$root/bin/control" <<'CONTROL'
#!/bin/sh
# One descriptor for the whole session: closing the last one would flush
# input the host already sent.
exec 3<>/dev/ttyS1
stty raw -echo <&3
echo "@@READY" >&3
while read -r line <&3; do
    sh -c "$line" > /tmp/cmd.out 2>&1 < /dev/null 3>&-
    rc=$?
    cat /tmp/cmd.out >&3
    echo "@@RC $rc" >&3
done
echo "esptun-guest: control channel closed"
CONTROL
    chmod 755 "$root/init" "$root/bin/control"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$root"
    trap - EXIT
    # Older initramfs builds of this cache are stale now.
    # Not all at once: builds of other branches sharing this cache (whose
    # scripts differ) stay until unused for a day.
    find "$cache" -maxdepth 1 \( -name 'initrd-*.gz' -o -name 'nettool-*' \) -mtime +0 \
        ! -name "$(basename "$initrd")" ! -name "$(basename "$nettool")" -delete
    find "$cache" -maxdepth 1 -name 'strongswan-*' -mtime +0 ! -name "$(basename "$ssdir")" \
        -exec rm -rf {} +
fi
# Used now: not stale (see above).
touch "$initrd" "$nettool" "$ssdir"

echo "kernel=$vmlinuz"
echo "initrd=$initrd"
echo "kernel_version=$kver"
