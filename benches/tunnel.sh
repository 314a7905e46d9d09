#!/usr/bin/env bash
# Whole-tunnel throughput benchmark: iperf3 over TCP through two real
# `esptun run` daemons in a two-namespace lab, next to the plain veth figure
# measured in the same run, with the CPU time of every esptun thread.
#
#   sudo benches/tunnel.sh [--seconds N] [--outer udp|esp] [--crypto auto|hardware|soft]
#                          [--offloads auto|off] [--json]
#
# Needs root, iproute2 and iperf3 (`apt-get install iperf3`), and ping
# (iputils-ping) for the idle RTT figures; installs nothing. Builds the
# release binary with cargo unless ESPTUN_BIN names one.
# Everything it creates (two namespaces and their veth pair, a 0700 temp dir
# with keys, state and configs, the daemons and iperf3 servers) is removed
# on exit, on failure and on Ctrl-C. The root namespace's addresses, routes
# and rules are never touched; all addresses are in 198.18.0.0/15 (RFC 2544).
#
# Figures depend on the machine: read them as ratios to the plain veth
# figure measured in the same run.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sudo benches/tunnel.sh [--seconds N] [--outer udp|esp] [--crypto auto|hardware|soft]
                              [--offloads auto|off] [--json]

  --seconds N     length of each iperf3 run (default 10)
  --outer MODE    udp (NAT-T, port 4500; default) or esp (IP protocol 50)
  --crypto SEL    the daemons' crypto selection: auto (default), hardware, soft
  --offloads SEL  auto (default: TUN TSO/USO/checksum, coalescing, UDP GSO/GRO
                  where the kernel offers them) or off (every [offloads] switch off)
  --json          one JSON object per tunnel run on stdout:
                  {"case","outer","crypto","streams","gbit_s","plain_gbit_s",...}
                  (progress and tables go to stderr)

Environment: ESPTUN_BIN=path/to/esptun skips `cargo build --release`.
EOF
}

seconds=10
outer=udp
crypto=auto
offloads=auto
json=0
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="${2:?--seconds needs a value}"; shift 2 ;;
        --seconds=*) seconds="${1#*=}"; shift ;;
        --outer) outer="${2:?--outer needs a value}"; shift 2 ;;
        --outer=*) outer="${1#*=}"; shift ;;
        --crypto) crypto="${2:?--crypto needs a value}"; shift 2 ;;
        --crypto=*) crypto="${1#*=}"; shift ;;
        --offloads) offloads="${2:?--offloads needs a value}"; shift 2 ;;
        --offloads=*) offloads="${1#*=}"; shift ;;
        --json) json=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "tunnel.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$seconds" in ''|*[!0-9]*|0) echo "tunnel.sh: --seconds must be a positive integer, not '$seconds'" >&2; exit 2 ;; esac
case "$outer" in udp|esp) ;; *) echo "tunnel.sh: --outer must be udp or esp, not '$outer'" >&2; exit 2 ;; esac
case "$crypto" in auto|hardware|soft) ;; *) echo "tunnel.sh: --crypto must be auto, hardware or soft, not '$crypto'" >&2; exit 2 ;; esac
case "$offloads" in auto|off) ;; *) echo "tunnel.sh: --offloads must be auto or off, not '$offloads'" >&2; exit 2 ;; esac

# With --json, stdout carries only the JSON document.
if [ "$json" = 1 ]; then exec 3>&1 1>&2; else exec 3>&1; fi

log() { echo "tunnel.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, TUN, raw sockets): sudo $0 $*"
command -v ip >/dev/null || die "ip not found: apt-get install iproute2"
command -v iperf3 >/dev/null || die "iperf3 not found: apt-get install iperf3"
if command -v jq >/dev/null; then
    json_tool=jq
elif command -v python3 >/dev/null; then
    json_tool=python3
else
    die "need jq or python3 to read iperf3's JSON: apt-get install jq"
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${ESPTUN_BIN:-}" ]; then
    esptun="$ESPTUN_BIN"
else
    command -v cargo >/dev/null \
        || die "cargo not found (sudo may reset PATH): build first and set ESPTUN_BIN=target/release/esptun"
    log "building the release binary (cargo build --release)"
    (cd "$repo" && cargo build --release --quiet) || die "cargo build --release failed"
    esptun="${CARGO_TARGET_DIR:-$repo/target}/release/esptun"
fi
[ -x "$esptun" ] || die "no executable esptun at $esptun"
esptun="$(cd "$(dirname "$esptun")" && pwd)/$(basename "$esptun")"

# ---------------------------------------------------------------- cleanup

ns_a="esptb$$a"
ns_b="esptb$$b"
veth_a="esptb$$va"
veth_b="esptb$$vb"
tmp=""
created_a=0
created_b=0
pids=()         # background processes we started (daemons, iperf3)

stop_pid() {    # stop_pid PID: TERM, up to 5 s, then KILL; reaps it
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    set +e
    for pid in "${pids[@]}"; do
        stop_pid "$pid"
    done
    # Deleting the namespaces removes the veth pair and everything in them.
    [ "$created_a" = 1 ] && ip netns del "$ns_a"
    [ "$created_b" = 1 ] && ip netns del "$ns_b"
    [ -n "$tmp" ] && rm -rf -- "$tmp"
    if [ "$rc" != 0 ]; then
        log "cleaned up after exit status $rc"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

forget_pid() {  # forget_pid PID: it has been reaped; never signal it again
    local keep=() p
    for p in "${pids[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

# ---------------------------------------------------------------- the lab

tmp="$(mktemp -d /tmp/esptun-bench.XXXXXX)"
chmod 0700 "$tmp"

# Tunnel pair: esptun routes the peer's address into its TUN (classic
# transport mode, inner = outer address). Plain pair: a second address pair
# on the same veth that esptun does not route (its policy table holds only
# a /32 route to the peer's tunnel address), so the plain figure goes over
# the very same veth, at the same time of the run, with the daemons up
# (idle): plain and tunnel runs alternate, which keeps the noise of a shared
# machine out of the ratio better than measuring plain once before esptun
# starts. The script checks the routing before measuring.
a_tun=198.18.200.1
b_tun=198.18.200.2
a_plain=198.18.201.1
b_plain=198.18.201.2

log "creating namespaces $ns_a and $ns_b"
ip netns add "$ns_a" && created_a=1
ip netns add "$ns_b" && created_b=1
# Created inside A and moved to B in one step: never in the root namespace.
ip -n "$ns_a" link add "$veth_a" type veth peer name "$veth_b" netns "$ns_b"
ip -n "$ns_a" addr add "$a_tun/24" dev "$veth_a"
ip -n "$ns_a" addr add "$a_plain/24" dev "$veth_a"
ip -n "$ns_b" addr add "$b_tun/24" dev "$veth_b"
ip -n "$ns_b" addr add "$b_plain/24" dev "$veth_b"
for ns_dev in "$ns_a:$veth_a" "$ns_b:$veth_b"; do
    ip -n "${ns_dev%%:*}" link set lo up
    ip -n "${ns_dev%%:*}" link set "${ns_dev#*:}" up
done
for i in $(seq 50); do
    if ip -n "$ns_a" link show "$veth_a" | grep -q LOWER_UP \
        && ip -n "$ns_b" link show "$veth_b" | grep -q LOWER_UP; then
        break
    fi
    [ "$i" = 50 ] && die "the veth pair has no carrier after 5 s"
    sleep 0.1
done

mkdir -m 0700 "$tmp/a" "$tmp/b" "$tmp/keys"
# Each host generates its outbound key with its own state directory (which
# records the key as never used); the peer reads it as its inbound key.
"$esptun" genkey -o "$tmp/keys/a-to-b.key" --state-dir "$tmp/a/state" >/dev/null
"$esptun" genkey -o "$tmp/keys/b-to-a.key" --state-dir "$tmp/b/state" >/dev/null

# Only written to turn offloads off, so that a binary from before the
# [offloads] table (ESPTUN_BIN) still reads the file.
offload_table=""
if [ "$offloads" = off ]; then
    offload_table="
[offloads]
tun_checksum = \"off\"
tso = \"off\"
uso = \"off\"
coalesce = \"off\"
udp_gso = \"off\"
udp_gro = \"off\"
"
fi

write_config() {  # write_config SIDE LOCAL REMOTE OUT_SPI OUT_KEY IN_SPI IN_KEY PEER
    cat >"$tmp/$1/esptun.toml" <<EOF
# Written by benches/tunnel.sh ($1).
interface = "esptun0"
outer = "$outer"
state_dir = "$tmp/$1/state"
control_socket = "$tmp/$1/control.sock"
crypto = "$crypto"
selftest_interval_secs = 60
$offload_table
[[peer]]
name = "$8"
local = "$2"
endpoint = "$3"
outbound = { spi = $4, key_file = "$5" }
inbound = { spi = $6, key_file = "$7" }
EOF
}
write_config a "$a_tun" "$b_tun" 0xa001 "$tmp/keys/a-to-b.key" 0xb001 "$tmp/keys/b-to-a.key" b
write_config b "$b_tun" "$a_tun" 0xb001 "$tmp/keys/b-to-a.key" 0xa001 "$tmp/keys/a-to-b.key" a

# `ip netns exec` execs the program, so $! is esptun's own pid.
start_daemon() {  # start_daemon SIDE NS -> sets daemon_pid
    ip netns exec "$2" "$esptun" run -c "$tmp/$1/esptun.toml" \
        </dev/null >"$tmp/$1/log" 2>&1 &
    daemon_pid=$!
    pids+=("$daemon_pid")
}
wait_ready() {    # wait_ready SIDE PID: until `esptun status` answers, 60 s at most
    local i
    for i in $(seq 600); do
        if "$esptun" status --socket "$tmp/$1/control.sock" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$2" 2>/dev/null; then
            cat "$tmp/$1/log" >&2
            die "esptun on $1 exited during start-up (its log is above)"
        fi
        sleep 0.1
    done
    cat "$tmp/$1/log" >&2
    die "esptun on $1 did not answer on its control socket within 60 s (its log is above)"
}

log "starting esptun in both namespaces (outer $outer, crypto $crypto)"
start_daemon a "$ns_a"; pid_a=$daemon_pid
start_daemon b "$ns_b"; pid_b=$daemon_pid
wait_ready a "$pid_a"
wait_ready b "$pid_b"

provider_of() {   # provider_of SIDE: the provider the daemon is using
    "$esptun" status --socket "$tmp/$1/control.sock" 2>/dev/null \
        | sed -n 's/.*, provider \([^ ]*\).*/\1/p' | head -n 1
}
provider_a="$(provider_of a)" || true
provider_b="$(provider_of b)" || true

# Tunnel traffic must go into esptun0, plain traffic straight to the veth.
route_dev() { ip -n "$1" -o route get "$2" | sed -n 's/.* dev \([^ ]*\).*/\1/p'; }
[ "$(route_dev "$ns_a" "$b_tun")" = esptun0 ] || die "$b_tun is not routed into esptun0 in $ns_a"
[ "$(route_dev "$ns_b" "$a_tun")" = esptun0 ] || die "$a_tun is not routed into esptun0 in $ns_b"
[ "$(route_dev "$ns_a" "$b_plain")" = "$veth_a" ] || die "$b_plain is not routed to $veth_a in $ns_a"

# ---------------------------------------------------------------- iperf3

start_server() {  # start_server ADDR
    ip netns exec "$ns_b" iperf3 -s -B "$1" -p 5201 >"$tmp/iperf3-server-$1.log" 2>&1 &
    pids+=("$!")
}
start_server "$b_tun"
start_server "$b_plain"
for i in $(seq 100); do
    listening="$(ip netns exec "$ns_b" ss -Hltn 'sport = :5201')"
    if grep -q "$b_tun:5201" <<<"$listening" && grep -q "$b_plain:5201" <<<"$listening"; then
        break
    fi
    [ "$i" = 100 ] && die "iperf3 servers not listening after 10 s: $(cat "$tmp"/iperf3-server-*.log)"
    sleep 0.1
done

clk_tck="$(getconf CLK_TCK)"
now() { date +%s.%N; }

# cpu_snapshot PID: one line per thread, "name:tid ticks wait_ns": CPU time
# (utime + stime, in clock ticks) and the time it was runnable but waiting
# for a CPU (schedstat's run delay). The main thread is called main, the
# others by their name (comm).
cpu_snapshot() {
    local pid="$1" task tid name stat rest f sched
    for task in /proc/"$pid"/task/*; do
        tid="${task##*/}"
        stat="$(cat "$task/stat" 2>/dev/null)" || continue
        name="$(cat "$task/comm" 2>/dev/null)" || continue
        read -ra sched <"$task/schedstat" 2>/dev/null || sched=(0 0 0)
        [ "$tid" = "$pid" ] && name=main
        # comm may hold spaces and parentheses: fields start after the last ')'.
        rest="${stat##*) }"
        read -ra f <<<"$rest"
        # After ')' the fields are state (3), ppid (4), ..., utime (14), stime (15).
        echo "$name:$tid $((f[11] + f[12])) ${sched[1]:-0}"
    done
}

bps_of() {        # bps_of FILE: receiver-side bits per second of an iperf3 --json run
    if [ "$json_tool" = jq ]; then
        jq -r '.end.sum_received.bits_per_second // empty' "$1"
    else
        python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"])' "$1" 2>/dev/null
    fi
}
retr_of() {       # retr_of FILE: sender retransmits
    if [ "$json_tool" = jq ]; then
        jq -r '.end.sum_sent.retransmits // "-"' "$1"
    else
        python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_sent"].get("retransmits","-"))' "$1" 2>/dev/null
    fi
}

cpu_of() {        # cpu_of FILE: iperf3's own CPU use, "sender% receiver%"
    if [ "$json_tool" = jq ]; then
        jq -r '.end.cpu_utilization_percent | "\(.host_total|floor) \(.remote_total|floor)"' "$1"
    else
        python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["end"]["cpu_utilization_percent"]; print(int(c["host_total"]), int(c["remote_total"]))' "$1" 2>/dev/null
    fi
}

results=()        # "case streams bps retransmits sender-cpu% receiver-cpu%"
cpu_rows=()       # "streams host thread seconds percent wait-percent"

# run_iperf CASE STREAMS
run_iperf() {
    local case="$1" streams="$2" src dst out t0 t1 wall bps retr cpid
    if [ "$case" = tunnel ]; then src="$a_tun"; dst="$b_tun"; else src="$a_plain"; dst="$b_plain"; fi
    out="$tmp/iperf3-$case-P$streams.json"
    log "iperf3 $case, $streams stream(s), $seconds s ($src -> $dst)"
    if [ "$case" = tunnel ]; then
        cpu_snapshot "$pid_a" >"$tmp/cpu-a-before"
        cpu_snapshot "$pid_b" >"$tmp/cpu-b-before"
    fi
    t0="$(now)"
    # In the background and waited for, so Ctrl-C interrupts the wait at once.
    ip netns exec "$ns_a" iperf3 -c "$dst" -B "$src" -p 5201 -t "$seconds" -P "$streams" --json \
        >"$out" 2>"$out.err" &
    cpid=$!
    pids+=("$cpid")
    if ! wait "$cpid"; then
        forget_pid "$cpid"
        die "iperf3 client failed ($case, -P $streams): $(cat "$out.err") $(jq -r '.error // empty' "$out" 2>/dev/null || true)"
    fi
    forget_pid "$cpid"
    t1="$(now)"
    if [ "$case" = tunnel ]; then
        cpu_snapshot "$pid_a" >"$tmp/cpu-a-after"
        cpu_snapshot "$pid_b" >"$tmp/cpu-b-after"
        wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
        local host row
        for host in a b; do
            while read -r row; do
                cpu_rows+=("$streams ${host^^} $row")
            done < <(awk -v tck="$clk_tck" -v wall="$wall" '
                NR == FNR { before[$1] = $2; wbefore[$1] = $3; next }
                {
                    split($1, k, ":"); name = k[1]
                    secs[name] += ($2 - before[$1]) / tck
                    waits[name] += ($3 - wbefore[$1]) / 1e9
                    if (!(name in seen)) { seen[name] = 1; order[++n] = name }
                }
                END {
                    for (i = 1; i <= n; i++) {
                        t = order[i]
                        printf "%s %.2f %.1f %.1f\n", t, secs[t], 100 * secs[t] / wall, 100 * waits[t] / wall
                    }
                }' "$tmp/cpu-$host-before" "$tmp/cpu-$host-after")
        done
    fi
    bps="$(bps_of "$out")"
    [ -n "$bps" ] || die "no sum_received in iperf3's output for $case -P $streams: $(head -c 500 "$out")"
    retr="$(retr_of "$out")"
    results+=("$case $streams $bps $retr $(cpu_of "$out" || echo '- -')")
}

# Idle round-trip time, before any load: batching must not delay a lone
# packet. 40 pings 50 ms apart on each path; the average in ms.
ping_avg() {      # ping_avg ADDR
    ip netns exec "$ns_a" ping -q -c 40 -i 0.05 -W 1 "$1" 2>/dev/null \
        | awk -F/ '/^rtt|^round-trip/ { print $5 }'
}
rtt_tunnel=null
rtt_plain=null
if command -v ping >/dev/null; then
    log "idle ping RTT, tunnel and plain (40 pings each)"
    rtt_tunnel="$(ping_avg "$b_tun" || true)"
    rtt_plain="$(ping_avg "$b_plain" || true)"
    [ -n "$rtt_tunnel" ] || die "no ping reply through the tunnel"
    [ -n "$rtt_plain" ] || rtt_plain=null
else
    log "ping not found (apt-get install iputils-ping): no idle RTT figures"
fi

# Alternate plain and tunnel runs so that both see the same machine load.
for streams in 1 4; do
    run_iperf plain "$streams"
    run_iperf tunnel "$streams"
done

# Each daemon's packet counters and drops by reason, for the report.
counters() {
    "$esptun" status --socket "$tmp/$1/control.sock" 2>&1 \
        | awk '/^outbound: |^inbound: / { on = 1 } /^providers:/ { on = 0 } on && NF'
}
counters_a="$(counters a)" || true
counters_b="$(counters b)" || true
# Where the kernel dropped packets around esptun (TCP retransmits come from
# somewhere): the TUN's queue and the outer UDP socket's buffers, cumulative
# over the tunnel runs. nstat -s: no history file written.
kernel_drops() {  # kernel_drops NS
    local link udp
    link="$(ip -n "$1" -s link show esptun0 2>/dev/null \
        | awk '/RX:/ { getline; rx = $4 } /TX:/ { getline; tx = $4 } END { printf "esptun0 rx dropped %s, tx dropped %s", rx, tx }')"
    udp="$(ip netns exec "$1" nstat -asz UdpRcvbufErrors UdpSndbufErrors 2>/dev/null \
        | awk '/^Udp/ { printf ", %s %s", $1, $2 }')"
    echo "$link$udp"
}
drops_a="$(kernel_drops "$ns_a")" || true
drops_b="$(kernel_drops "$ns_b")" || true

# ---------------------------------------------------------------- stop

log "stopping the daemons (SIGTERM)"
stop_rc=0
for side_pid in "a:$pid_a" "b:$pid_b"; do
    side="${side_pid%%:*}"
    pid="${side_pid#*:}"
    kill -TERM "$pid"
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        [ "$i" = 100 ] && log "esptun on $side still running 10 s after SIGTERM"
        sleep 0.1
    done
    rc=0
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"
        wait "$pid" || true
        rc=killed
    else
        wait "$pid" || rc=$?
    fi
    forget_pid "$pid"
    if [ "$rc" != 0 ]; then
        log "esptun on $side exited with status $rc; its log:"
        cat "$tmp/$side/log" >&2
        stop_rc=1
    fi
done

# ---------------------------------------------------------------- report

report() {
    local r c s b t p q qc qs qb h name secs pct wpct cs cr
    printf '\nesptun whole-tunnel benchmark: iperf3 TCP, %s s per run, outer %s, crypto %s (provider A: %s, B: %s), offloads %s\n' \
        "$seconds" "$outer" "$crypto" "${provider_a:-?}" "${provider_b:-?}" "$offloads"
    printf '%s, %s CPUs, kernel %s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$(uname -r)"
    printf 'idle ping RTT (avg of 40): tunnel %s ms, plain veth %s ms\n\n' "$rtt_tunnel" "$rtt_plain"
    printf '%-8s %7s %9s %13s %8s %12s\n' case streams Gbit/s "vs plain veth" retrans "iperf3 CPU%"
    for r in "${results[@]}"; do
        read -r c s b t cs cr <<<"$r"
        p=""
        for q in "${results[@]}"; do
            read -r qc qs qb _ <<<"$q"
            [ "$qc" = plain ] && [ "$qs" = "$s" ] && p="$qb"
        done
        awk -v c="$c" -v s="$s" -v b="$b" -v p="$p" -v t="$t" -v cpu="$cs/$cr" \
            'BEGIN { printf "%-8s %7s %9.2f %13s %8s %12s\n", c, s, b / 1e9, sprintf("%.3f", b / p), t, cpu }'
    done
    printf '(iperf3 CPU%%: the iperf3 sender/receiver processes'"'"' own CPU use, %% of one CPU, as iperf3 reports it)\n'
    printf '\nCPU time of each esptun thread during the tunnel runs: seconds and %% of the run'"'"'s\n'
    printf 'wall time; "wait %%": runnable but waiting for a CPU (schedstat run delay), %% of wall time\n\n'
    printf '%-7s %-4s %-16s %8s %7s %7s\n' streams host thread "CPU s" "% wall" "wait %"
    for r in "${cpu_rows[@]}"; do
        read -r s h name secs pct wpct <<<"$r"
        printf '%-7s %-4s %-16s %8s %7s %7s\n' "$s" "$h" "$name" "$secs" "$pct" "$wpct"
    done
    printf '\nesptun status after the runs, packets passed and dropped by reason:\nA:\n%s\nB:\n%s\n' \
        "$counters_a" "$counters_b"
    printf '\nkernel drops after the runs (all runs):\nA: %s\nB: %s\n' "$drops_a" "$drops_b"
}
report >&2

if [ "$json" = 1 ]; then
    # One object per tunnel run, next to the plain veth figure of the same
    # stream count from the same (alternating) run, and the esptun CPU time
    # of both hosts per Gbit/s of tunnel throughput.
    outer_name=natt
    [ "$outer" = esp ] && outer_name=esp
    crypto_name="${provider_a:-$crypto}"
    for r in "${results[@]}"; do
        read -r c s b t _ <<<"$r"
        [ "$c" = tunnel ] || continue
        p=""
        for q in "${results[@]}"; do
            read -r qc qs qb _ <<<"$q"
            [ "$qc" = plain ] && [ "$qs" = "$s" ] && p="$qb"
        done
        cpu=0
        for row in "${cpu_rows[@]}"; do
            read -r rs _ _ secs _ _ <<<"$row"
            [ "$rs" = "$s" ] && cpu="$(awk -v a="$cpu" -v b="$secs" 'BEGIN { print a + b }')"
        done
        [ "$t" = - ] && t=null
        awk -v c="tcp-$s" -v o="$outer_name" -v k="$crypto_name" -v off="$offloads" -v s="$s" \
            -v b="$b" -v p="$p" -v t="$t" -v cpu="$cpu" -v secs="$seconds" \
            -v rtt="$rtt_tunnel" -v prtt="$rtt_plain" 'BEGIN {
            g = b / 1e9; pg = p / 1e9
            printf "{\"case\":\"%s\",\"outer\":\"%s\",\"crypto\":\"%s\",\"offloads\":\"%s\",\"streams\":%d,\"gbit_s\":%.3f,\"plain_gbit_s\":%.3f,\"ratio\":%.4f,\"retransmits\":%s,\"esptun_cpu_s_per_s_per_gbit\":%.3f,\"idle_rtt_ms\":%s,\"plain_idle_rtt_ms\":%s}\n", c, o, k, off, s, g, pg, g / pg, t, (cpu / secs) / g, rtt, prtt
        }'
    done >&3
fi

[ "$stop_rc" = 0 ] || die "a daemon did not stop cleanly"
log "done; everything removed"
