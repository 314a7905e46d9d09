//! The `esptun` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use esptun::crypto::KeySize;
use esptun::crypto::select::Mode;
use esptun::daemon::signals::Signals;
use esptun::daemon::{Daemon, DaemonError, RunOptions};
use esptun::tools::bench::{self, BenchConfig};

mod measure;
mod print;

use measure::{run_bench, selftest};

/// `bench::DEFAULT_SIZES` as `--sizes` takes them (a test keeps the two
/// equal), so that `--help` shows a default one can type.
const DEFAULT_SIZES_ARG: &str = "64,576,1400,9000,65536";

/// Exit status when no AES-GCM provider may carry traffic.
const EXIT_SELFTEST_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "esptun",
    version,
    about = "Userspace IPsec ESP (RFC 4303 transport mode, AES-GCM RFC 4106, NAT-T RFC 3948) \
             between a TUN device and the network, validating every inner checksum before \
             delivery. Start with `esptun demo` (root) for a two-namespace lab on this machine",
    after_help = "Exit status: 0 success, 1 error, 2 usage error, \
                  3 crypto self-test failed (no AES-GCM provider may carry traffic)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the tunnel daemon (root): boot self-tests, TUN interface up with
    /// routes, outer sockets, until SIGTERM/SIGINT (clean stop: interface
    /// and rules removed). SIGHUP reloads SAs, make-before-break.
    Run {
        /// The configuration file (see deploy/ for an example pair).
        #[arg(short, long)]
        config: PathBuf,
        /// Log level: error, warn, info, debug or trace.
        #[arg(long, default_value = "info", value_parser = parse_level)]
        log_level: tracing::Level,
    },
    /// Show a running daemon's counters, SAs, provider and self-test
    /// history, through its control socket (root).
    Status {
        /// The daemon's configuration file (to find its control socket).
        #[arg(short, long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The control socket path (default /run/esptun/esptun0.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the daemon's JSON as is.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running daemon to reload its configuration file (SA changes:
    /// key rolls) and wait for the datapath's answer. Exit status 0 when
    /// the new configuration is in effect, 1 when it was refused in whole
    /// or in part (the reasons are printed; what was refused keeps
    /// running as before). What SIGHUP does, with the outcome.
    Reload {
        /// The daemon's configuration file (to find its control socket).
        #[arg(short, long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The control socket path (default /run/esptun/esptun0.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the daemon's JSON outcome as is.
        #[arg(long)]
        json: bool,
    },
    /// Build a two-host lab on this machine (root): two network namespaces
    /// joined by veth (198.18.0.0/15, 2001:db8::/32), new keys, an esptun in
    /// each; send a TCP stream of zeros (every byte checked), UDP and ping
    /// through the tunnel; print throughput, counters and the provider;
    /// remove everything, also on Ctrl-C or failure.
    Demo {
        /// Outer encapsulation: udp (NAT-T, port 4500) or esp (IP protocol 50).
        #[arg(
            long,
            default_value = "udp",
            value_parser = clap::builder::TypedValueParser::try_map(
                clap::builder::PossibleValuesParser::new(["udp", "esp"]),
                |s| s.parse::<esptun::wire::outer::Encap>(),
            ),
        )]
        outer: esptun::wire::outer::Encap,
        /// Use IPv6 addresses inside and outside.
        #[arg(long)]
        ipv6: bool,
        /// Bytes in the TCP stream of zeros.
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
        /// Crypto selection for both endpoints: auto, hardware or soft.
        #[arg(long, default_value = "auto", value_parser = parse_mode)]
        crypto: Mode,
        /// AES key size of the demo's keys: 128 or 256.
        #[arg(long, default_value_t = 256, value_parser = parse_key_bits)]
        bits: u32,
        /// Replay the field failure: the sending endpoint corrupts its
        /// cipher input (one 16-byte plaintext block replaced by its
        /// neighbour before sealing, in 5% of packets). The receiver must
        /// drop those packets (inner_checksum), TCP resends them, the
        /// stream arrives intact, and the sender's periodic self-test
        /// (every 2 s here) moves it to the soft provider. Needs the
        /// hardware provider and --crypto auto.
        #[arg(long)]
        corrupt: bool,
        /// Key the tunnel by IKEv2 instead of by hand: both endpoints get
        /// a generated PSK, a initiates, CHILD SAs rekey every 3 s and the
        /// IKE SA every 8 s. Streams of --bytes follow one another until a
        /// has seen at least 2 CHILD SA rekeys and 1 IKE SA rekey while
        /// they ran (90 s at most); every byte is checked, and no packet
        /// may meet an unknown SPI, fail its ICV, be a replay or fail its
        /// inner checksum. Not with --corrupt.
        #[arg(long)]
        ike: bool,
        /// Print the summary as one JSON object (progress goes to stderr).
        #[arg(long)]
        json: bool,
        /// Keep the endpoints' logs (printed on failure in any case).
        #[arg(long)]
        verbose: bool,
    },
    /// The lab's fault-injecting endpoint, started by `esptun demo
    /// --corrupt`: `esptun run` with a hardware provider that corrupts
    /// plaintext blocks. Refuses to run outside a namespace the lab made.
    #[command(hide = true)]
    DemoEndpoint {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long, default_value = "info", value_parser = parse_level)]
        log_level: tracing::Level,
        /// Share of seals to corrupt, 0 to 1.
        #[arg(long, value_parser = parse_fault_rate)]
        fault_rate: f64,
        #[arg(long, default_value_t = 1)]
        fault_seed: u64,
    },
    /// Declare that a peer's outbound key has never carried traffic, so the
    /// daemon may start its sequence numbers at 1. Only for keys made
    /// elsewhere: keys from `esptun genkey` on this host are already
    /// recorded. Declaring a used key fresh reuses GCM nonces.
    DeclareFresh {
        /// The configuration file naming the peer and the state directory.
        #[arg(short, long)]
        config: PathBuf,
        /// The peer whose outbound key is fresh.
        #[arg(long)]
        peer: String,
    },
    /// Parse and validate a configuration file and read its key files, then
    /// exit: 0 if the daemon could start with it, 1 with every problem
    /// listed (field and fix) if not.
    CheckConfig {
        /// The configuration file.
        #[arg(short, long)]
        config: std::path::PathBuf,
    },
    /// Print the SAs in the format of Wireshark's ESP SA table (UAT
    /// `esp_sa`), so that a capture of the wire can be decrypted. THE OUTPUT
    /// CONTAINS THE SECRET KEYS.
    ///
    /// Manual SAs are read from their key files (root). The CHILD SAs of
    /// peers keyed by IKE (`[peer.ike]`) exist only in the running daemon:
    /// their records are asked over its control socket and appended (if it
    /// does not answer, the manual ones are printed anyway, with a note on
    /// stderr).
    ///
    /// One record per SA and direction, outer addresses, for Wireshark 3.x/4.0:
    /// `"IPv4","SRC","DST","0xSPI","AES-GCM with 16 octet ICV [RFC4106]","0xKEY+SALT","NULL",""`.
    /// Use it as the file `~/.config/wireshark/esp_sa` (replaces the ESP SAs
    /// there; write it with `umask 077`), or pass each line to tshark:
    /// `tshark -o esp.enable_encryption_decode:TRUE -o "uat:esp_sa:LINE" -r CAPTURE`.
    /// ESP in UDP is decoded on port 4500; for another port add
    /// `-d udp.port==PORT,udpencap`. Anyone with this output can decrypt the
    /// tunnel's traffic and forge packets: keep it private, delete it after
    /// use, roll the keys if it leaks.
    WiresharkKeys {
        /// The configuration file whose SAs to print.
        #[arg(short, long)]
        config: PathBuf,
        /// Print instead the running daemon's IKE SA keys (peers with
        /// `[peer.ike]`), asked over its control socket, in the format of
        /// Wireshark's IKEv2 decryption table (UAT file
        /// `~/.config/wireshark/ikev2_decryption_table`): `SPIi,SPIr,SK_ei,
        /// SK_er,"encryption",SK_ai,SK_ar,"integrity"`.
        #[arg(long)]
        ike: bool,
    },
    /// Generate new RFC 4106 key material (a random AES key and 4-byte
    /// salt) into a new file with mode 0600, for one direction of one SA.
    ///
    /// Each host generates its own outbound keys; the peer uses the same
    /// file as its inbound key. An existing file is never overwritten.
    Genkey {
        /// AES key size: 128 or 256.
        #[arg(long, default_value_t = 256, value_parser = parse_key_bits)]
        bits: u32,
        /// Where to write the key (must not exist yet).
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// The daemon's state directory, where the new key is recorded as
        /// never used, so that it may start at sequence number 1.
        #[arg(long, default_value = "/var/lib/esptun")]
        state_dir: PathBuf,
    },
    /// Run the power-on self-tests of both AES-GCM providers and show which
    /// one `--crypto` selects.
    ///
    /// Every available provider runs every compiled-in known-answer vector;
    /// the hardware provider also runs the SIMD register-preservation check
    /// and the 1 MiB long-message comparison with the soft provider. Exits 0
    /// only if the selected provider passed everything, else 3.
    Selftest {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Provider selection: auto (hardware if it passes, else soft),
        /// hardware, or soft.
        #[arg(long, default_value = "auto", value_parser = parse_mode)]
        crypto: Mode,
    },
    /// Measure AES-GCM seal and open throughput of each provider with the
    /// hardware/software speedup per size, whole packets through the ESP
    /// pipelines, and the inner checksum.
    Bench {
        /// Print JSON (one object per measurement) instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds of measuring per implementation, cell and round, in
        /// alternating 25 ms slices; the fastest slice is reported.
        #[arg(long, default_value_t = 0.25, value_parser = parse_seconds)]
        seconds: f64,
        /// Message sizes in bytes, comma-separated (1 to 1048576).
        #[arg(long, value_delimiter = ',', default_value = DEFAULT_SIZES_ARG, value_parser = parse_size)]
        sizes: Vec<usize>,
        /// AES key size: 128 or 256 (as for genkey and demo; `--key-bits`
        /// is accepted too).
        #[arg(long, alias = "key-bits", default_value_t = 128, value_parser = parse_key_bits)]
        bits: u32,
        /// Rounds per cell (total time per implementation and cell is
        /// rounds x seconds).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Also measure ring and RustCrypto called directly, to show the
        /// cost of esptun's provider seam.
        #[arg(long)]
        baseline: bool,
    },
}

fn parse_level(s: &str) -> Result<tracing::Level, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a log level: use error, warn, info, debug or trace"))
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v > 0.0 && v <= 60.0 {
        Ok(v)
    } else {
        Err("must be more than 0 and at most 60".into())
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes"))?;
    if (1..=bench::MAX_SIZE).contains(&v) {
        Ok(v)
    } else {
        Err(format!("sizes must be 1 to {}", bench::MAX_SIZE))
    }
}

fn parse_fault_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a rate between 0 and 1")),
    }
}

fn parse_key_bits(s: &str) -> Result<u32, String> {
    match s {
        "128" => Ok(128),
        "256" => Ok(256),
        _ => Err("key size must be 128 or 256".into()),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, log_level } => run(&config, log_level, &RunOptions::default()),
        Command::DemoEndpoint {
            config,
            log_level,
            fault_rate,
            fault_seed,
        } => demo_endpoint(&config, log_level, fault_rate, fault_seed),
        Command::Status {
            config,
            socket,
            json,
        } => status(config.as_deref(), socket.as_deref(), json),
        Command::Reload {
            config,
            socket,
            json,
        } => reload(config.as_deref(), socket.as_deref(), json),
        Command::Demo {
            outer,
            ipv6,
            bytes,
            crypto,
            bits,
            corrupt,
            ike,
            json,
            verbose,
        } => esptun::lab::demo::run(&esptun::lab::demo::DemoOptions {
            encap: outer,
            ipv6,
            bytes,
            crypto,
            key_bits: bits,
            corrupt,
            ike,
            json,
            verbose,
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("esptun")),
        }),
        Command::DeclareFresh { config, peer } => declare_fresh(&config, &peer),
        Command::Genkey {
            bits,
            output,
            state_dir,
        } => genkey(bits, &output, &state_dir),
        Command::CheckConfig { config } => check_config(&config),
        Command::WiresharkKeys { config, ike: false } => wireshark_keys(&config),
        Command::WiresharkKeys { config, ike: true } => wireshark_ike_keys(&config),
        Command::Selftest { json, crypto } => selftest(json, crypto),
        Command::Bench {
            json,
            seconds,
            sizes,
            bits,
            rounds,
            baseline,
        } => {
            let mut config = BenchConfig {
                seconds,
                sizes,
                key_size: if bits == 256 {
                    KeySize::Aes256
                } else {
                    KeySize::Aes128
                },
                rounds,
                baseline,
                progress: None,
            };
            // Cells of ciphers (two providers, more with baselines),
            // datapath (four ops per provider) and checksum, each measured
            // rounds x seconds: a run longer than a couple of seconds says
            // what it is doing.
            let subjects = if baseline { 4.0 } else { 2.0 };
            let estimate = config.sizes.len() as f64
                * (2.0 * subjects + 8.0 + 1.0)
                * f64::from(rounds)
                * seconds;
            if estimate >= 2.0 {
                config.progress = Some(|line| eprintln!("esptun bench: {line}"));
            }
            run_bench(json, &config).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("esptun: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: library errors already name
/// their source in their message, so a cause whose text is already shown
/// is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn check_config(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    // The checks `esptun run` makes before it changes the system, and no
    // more: no privilege is needed beyond reading the key files.
    let valid = esptun::config::Config::load_checked(path)?;
    println!(
        "config {} is valid: interface {} (MTU {}), {} outer, {} peer(s), crypto {}",
        path.display(),
        valid.interface.name,
        valid.interface.mtu,
        if valid.outer.encap.is_udp() {
            "UDP (NAT-T)"
        } else {
            "raw ESP"
        },
        valid.peers.len() + valid.ike_peers.len(),
        valid.crypto.mode
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints the SAs as Wireshark `esp_sa` records: secret keys, on purpose,
/// to stdout only (never through a logger), after a warning on stderr.
/// Manual SAs come from their key files; the CHILD SAs of peers keyed by
/// IKE exist only in the running daemon, which is asked for them. A
/// daemon that does not answer costs only those: the manual records are
/// printed anyway, and the command fails only if it printed nothing.
fn wireshark_keys(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::Write;

    let valid = esptun::config::Config::load(path)?;
    let mut records = esptun::tools::wireshark::esp_sa_records(&valid)?;
    let ike_peers: Vec<&str> = valid.ike_peers.iter().map(|p| p.name.as_str()).collect();
    let mut failed = false;
    if !ike_peers.is_empty() {
        match daemon_esp_records(&valid.operations.control_socket) {
            Ok(reply) => {
                // Sized once: a growing string would leave copies of the
                // keys behind in freed memory.
                let mut all =
                    zeroize::Zeroizing::new(String::with_capacity(records.len() + reply.len()));
                all.push_str(&records);
                let mut empty = Vec::new();
                for line in reply.lines() {
                    if let Some(rest) = line.strip_prefix("# peer ") {
                        if let Some(name) = rest.strip_suffix(": 0 record(s)") {
                            empty.push(name);
                        }
                    } else if !line.starts_with('#') && !line.is_empty() {
                        all.push_str(line);
                        all.push('\n');
                    }
                }
                records = all;
                if !empty.is_empty() {
                    eprintln!(
                        "esptun: the daemon holds no CHILD SA (yet) for IKE peer(s) {}: no \
                         records for them",
                        empty.join(", ")
                    );
                }
            }
            Err(e) => {
                failed = true;
                eprintln!(
                    "esptun: the CHILD SA keys of IKE peer(s) {} could not be fetched from the \
                     running daemon, the only place they exist: {e}",
                    ike_peers.join(", ")
                );
            }
        }
    }
    if records.is_empty() && failed {
        return Ok(ExitCode::FAILURE);
    }
    eprintln!(
        "esptun: WARNING: the output contains the SECRET KEYS of every SA in {}: anyone who has \
         it can decrypt this tunnel's traffic and forge packets. Keep it private (umask 077), \
         delete it when done, and roll the keys if it leaks.",
        path.display()
    );
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(records.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the records to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// The running daemon's `esp-keys` reply (secret: CHILD SA keys).
fn daemon_esp_records(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let asked = std::time::Instant::now();
    let reply = zeroize::Zeroizing::new(
        esptun::daemon::control::query(path, "esp-keys").map_err(|e| unanswered(path, asked, e))?,
    );
    if reply.trim_start().starts_with('{') {
        bail!("the daemon at {} refused: {}", path.display(), reply.trim());
    }
    Ok(reply)
}

/// Prints the running daemon's IKE SA keys as Wireshark IKEv2 decryption
/// table records (secret, like [`wireshark_keys`]).
fn wireshark_ike_keys(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::Write;

    let path = control_path(Some(config), None)?;
    let asked = std::time::Instant::now();
    let reply = zeroize::Zeroizing::new(
        esptun::daemon::control::query(&path, "ike-keys")
            .map_err(|e| unanswered(&path, asked, e))?,
    );
    if reply.trim_start().starts_with('{') {
        bail!("the daemon refused: {}", reply.trim());
    }
    eprintln!(
        "esptun: WARNING: the output contains the SECRET KEYS of the IKE SAs of {}: anyone who \
         has it can decrypt their IKE messages, which carry the identities. Keep it private \
         (umask 077) and delete it when done.",
        config.display()
    );
    let mut stdout = std::io::stdout().lock();
    for record in reply
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        stdout
            .write_all(record.as_bytes())
            .and_then(|()| stdout.write_all(b"\n"))
            .context("writing the records to stdout")?;
    }
    stdout.flush().context("writing the records to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// `esptun demo-endpoint`: `run` with fault injection, only inside a
/// namespace the lab created, so that no deployment can corrupt its own
/// traffic by a flag or an environment variable.
fn demo_endpoint(
    config: &std::path::Path,
    level: tracing::Level,
    rate: f64,
    seed: u64,
) -> anyhow::Result<ExitCode> {
    if let Err(why) = esptun::lab::lab_namespace() {
        bail!(
            "demo-endpoint injects faults into its own encryption and is only for the \
             namespaces `esptun demo --corrupt` creates; this process is in {why}. \
             To run a tunnel, use `esptun run`"
        );
    }
    let options = RunOptions {
        inject_faults: Some((rate, seed)),
    };
    run(config, level, &options)
}

fn run(
    config: &std::path::Path,
    level: tracing::Level,
    options: &RunOptions,
) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    // Before any thread exists, so that every thread inherits the mask.
    let signals = Signals::block().context("blocking signals")?;
    let daemon = match Daemon::start(config, options) {
        Ok(d) => d,
        Err(e @ DaemonError::NoProvider(_)) => {
            tracing::error!("{e}");
            return Ok(ExitCode::from(EXIT_SELFTEST_FAILED));
        }
        Err(e) => return Err(e.into()),
    };
    // Only now: self-tests passed, interface up, sockets open.
    match esptun::daemon::notify::notify("READY=1\nSTATUS=carrying traffic") {
        Ok(told) => tracing::debug!(told, "service manager notified"),
        Err(e) => tracing::warn!("telling the service manager we are ready: {e}"),
    }
    daemon.run_until_stopped(&signals)?;
    Ok(ExitCode::SUCCESS)
}

/// The control socket of `status` and `reload`.
fn control_path(
    config: Option<&std::path::Path>,
    socket: Option<&std::path::Path>,
) -> anyhow::Result<PathBuf> {
    Ok(match (config, socket) {
        (Some(c), _) => esptun::config::Config::load(c)?.operations.control_socket,
        (None, Some(s)) => s.to_path_buf(),
        (None, None) => PathBuf::from("/run/esptun/esptun0.sock"),
    })
}

/// A connection the daemon accepted (or queued) but did not answer is
/// said so, rather than as "Resource temporarily unavailable".
fn unanswered(
    path: &std::path::Path,
    asked: std::time::Instant,
    e: esptun::daemon::control::ControlError,
) -> anyhow::Error {
    match e {
        esptun::daemon::control::ControlError::Connect { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            anyhow::anyhow!(
                "the daemon at {} did not answer within {} ms (busy or hung?): try again, and \
                 if it persists look at its log (journalctl -u esptun)",
                path.display(),
                asked.elapsed().as_millis()
            )
        }
        e => e.into(),
    }
}

fn reload(
    config: Option<&std::path::Path>,
    socket: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // A file that does not load is refused here, before the daemon is
    // asked: it would refuse it for the same reason.
    let path = control_path(config, socket)
        .context("the daemon was not asked to reload (it keeps its running configuration)")?;
    let asked = std::time::Instant::now();
    let reply = esptun::daemon::control::query_within(
        &path,
        "reload",
        esptun::daemon::control::RELOAD_CLIENT_TIMEOUT,
    )
    .map_err(|e| unanswered(&path, asked, e))?;
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(&reply)
        && let Some(e) = o.get("error").and_then(|e| e.as_str())
    {
        anyhow::bail!("the daemon did not reload: {e}");
    }
    let v: esptun::daemon::status::ReloadOutcome = serde_json::from_str(&reply)
        .context("the daemon's reply is not a reload outcome this esptun can read")?;
    if json {
        print!("{reply}");
    } else {
        print!("{}", print::reload(&v));
    }
    Ok(if v.applied {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(
    config: Option<&std::path::Path>,
    socket: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let path = control_path(config, socket)?;
    let asked = std::time::Instant::now();
    let reply =
        esptun::daemon::control::query(&path, "status").map_err(|e| unanswered(&path, asked, e))?;
    if json {
        print!("{reply}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: esptun::daemon::status::Status = serde_json::from_str(&reply)
        .context("the daemon's reply is not a status this esptun can read")?;
    print!("{}", print::status(&v));
    Ok(ExitCode::SUCCESS)
}

fn declare_fresh(config: &std::path::Path, peer: &str) -> anyhow::Result<ExitCode> {
    let valid = esptun::config::Config::load(config)?;
    let Some(p) = valid.peers.iter().find(|p| p.name == peer) else {
        let names: Vec<_> = valid.peers.iter().map(|p| p.name.as_str()).collect();
        bail!(
            "no peer {peer:?} in {}: peers are {names:?}",
            config.display()
        );
    };
    let material = esptun::keyfile::load(&p.outbound.key_file)?;
    let store = esptun::sa::reservation::ReservationStore::open(&valid.operations.state_dir)?;
    esptun::sa::fresh::declare(&material, &store)
        .with_context(|| format!("the outbound key of peer {peer}"))?;
    println!(
        "declared the outbound key of peer {peer} ({}) fresh in {}: the daemon will start it at \
         sequence number 1, once",
        p.outbound.key_file.display(),
        valid.operations.state_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn genkey(
    bits: u32,
    output: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let size = if bits == 256 {
        KeySize::Aes256
    } else {
        KeySize::Aes128
    };
    let store = esptun::sa::reservation::ReservationStore::open(state_dir).with_context(|| {
        format!(
            "recording the new key as never used in {}: the records must belong to the user the \
             daemon runs as, so run genkey as that user (e.g. `sudo -u esptun esptun genkey -o \
             FILE`, into a directory it may write), or pass --state-dir with the daemon's state_dir",
            state_dir.display()
        )
    })?;
    esptun::sa::fresh::generate(size, output, &store)?;
    println!(
        "wrote new AES-{bits}-GCM key material (key + salt) to {} with mode 0600, recorded as never \
         used in {}; use it as this host's outbound key and give a copy, kept private, to the peer as \
         its inbound key",
        output.display(),
        state_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
