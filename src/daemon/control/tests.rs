use super::*;
use crate::testutil::TempDir;
use std::io::Read;

use std::sync::atomic::AtomicU64;

struct Fake {
    refused: AtomicU64,
}

impl Backend for Fake {
    fn status_json(&self) -> String {
        "{\"ok\":true}".to_string()
    }
    fn metrics(&self) -> String {
        "esptun_uptime_seconds 1\n".to_string()
    }
    fn reload(&self) -> Receiver<ReloadOutcome> {
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = tx.send(ReloadOutcome {
            applied: true,
            refused: Vec::new(),
        });
        rx
    }
    fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

fn fake() -> Fake {
    Fake {
        refused: AtomicU64::new(0),
    }
}

/// Turns the server until `done` (at most 5 s).
fn serve_until(server: &mut Server, backend: &Fake, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() && Instant::now() < deadline {
        server
            .turn(backend, Duration::from_millis(10))
            .expect("turn");
    }
}

#[test]
fn answers_status_refuses_junk_and_detects_a_second_instance() {
    let dir = TempDir::new("control");
    let path = dir.0.join("run").join("t.sock");
    let socket = ControlSocket::bind(&path).expect("bind");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(matches!(
        ControlSocket::bind(&path),
        Err(ControlError::InUse(_))
    ));

    let mut server = Server::new(socket, None);
    let backend = fake();
    let replies = std::thread::scope(|s| {
        let client = s.spawn(|| {
            (
                query(&path, "status"),
                query(&path, "bogus"),
                query(&path, "reload"),
            )
        });
        serve_until(&mut server, &backend, || client.is_finished());
        client.join().expect("client thread")
    });
    assert_eq!(replies.0.expect("status").trim(), "{\"ok\":true}");
    assert!(replies.1.expect("reply").contains("unknown request"));
    assert!(replies.2.expect("reload").contains("\"applied\":true"));
    drop(server);
    assert!(!path.exists(), "removed on drop");
    assert!(matches!(
        query(&path, "status"),
        Err(ControlError::Connect { .. })
    ));
}

#[test]
fn key_requests_are_answered_from_the_backend_in_a_buffer_sized_once() {
    let dir = TempDir::new("control-keys");
    let path = dir.0.join("t.sock");
    let mut server = Server::new(ControlSocket::bind(&path).expect("bind"), None);
    let backend = fake();
    let replies = std::thread::scope(|s| {
        let client = s.spawn(|| (query(&path, "ike-keys"), query(&path, "esp-keys")));
        serve_until(&mut server, &backend, || client.is_finished());
        client.join().expect("client thread")
    });
    assert_eq!(replies.0.expect("ike-keys"), "# no IKE SAs\n");
    assert_eq!(replies.1.expect("esp-keys"), "# no CHILD SAs\n");
    // The newline fits without a reallocation, which would leave a copy
    // of the keys behind in freed memory.
    let reply = secret_line("esp_sa key");
    assert_eq!(&reply[..], b"esp_sa key\n");
    assert_eq!(reply.capacity(), reply.len());
}

#[test]
fn a_reply_is_read_whole_across_growth_and_refused_when_not_utf8() {
    // 10,000 bytes: more than the first 4,096-byte buffer, read in
    // pieces of at most 4,096.
    let long: String = "0123456789".repeat(1000);
    let reply = read_reply(&mut long.as_bytes()).expect("read");
    assert_eq!(reply, long);
    assert_eq!(read_reply(&mut &b""[..]).expect("empty"), "");
    let err = read_reply(&mut &b"\xff\xfe"[..]).expect_err("not UTF-8");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn a_client_that_trickles_or_stalls_delays_no_other_and_is_closed() {
    let dir = TempDir::new("control-slow");
    let path = dir.0.join("t.sock");
    let mut server = Server::new(ControlSocket::bind(&path).expect("bind"), None);
    let backend = fake();
    let _silent = UnixStream::connect(&path).expect("connect");
    let mut trickle = UnixStream::connect(&path).expect("connect");
    trickle.write_all(b"sta").expect("write");
    server.turn(&backend, Duration::ZERO).expect("turn");
    let started = Instant::now();
    let reply = std::thread::scope(|s| {
        let client = s.spawn(|| query(&path, "status"));
        serve_until(&mut server, &backend, || client.is_finished());
        client.join().expect("client thread")
    });
    let took = started.elapsed();
    assert_eq!(reply.expect("status").trim(), "{\"ok\":true}");
    assert!(
        took < REQUEST_DEADLINE,
        "two stalled clients delayed another {took:?}"
    );
    // Past their deadline both are closed: reads see the end.
    serve_until(&mut server, &backend, || server_idle(&started));
    let mut buf = [0u8; 8];
    trickle
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(trickle.read(&mut buf).expect("closed"), 0);
    assert_eq!(server.clients(), 0);
}

fn server_idle(started: &Instant) -> bool {
    started.elapsed() > REQUEST_DEADLINE + Duration::from_millis(200)
}

#[test]
fn a_full_listener_still_answers_and_counts_what_it_closes() {
    let dir = TempDir::new("control-full");
    let path = dir.0.join("t.sock");
    let mut server = Server::new(ControlSocket::bind(&path).expect("bind"), None);
    let backend = fake();
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS + 10)
        .map(|_| UnixStream::connect(&path).expect("connect"))
        .collect();
    serve_until(&mut server, &backend, || {
        backend.refused.load(Ordering::Relaxed) >= 10
    });
    assert_eq!(server.clients(), MAX_CLIENTS);
    let reply = std::thread::scope(|s| {
        let client = s.spawn(|| query(&path, "status"));
        serve_until(&mut server, &backend, || client.is_finished());
        client.join().expect("client thread")
    });
    assert_eq!(reply.expect("status").trim(), "{\"ok\":true}");
    assert!(server.clients() <= MAX_CLIENTS);
    assert_eq!(backend.refused.load(Ordering::Relaxed), 11);
    drop(idle);
}

#[test]
fn the_metrics_endpoint_answers_get_metrics_and_refuses_the_rest() {
    let dir = TempDir::new("control-metrics");
    let metrics = MetricsServer::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = metrics.local_addr().expect("addr");
    let mut server = Server::new(
        ControlSocket::bind(&dir.0.join("t.sock")).expect("bind"),
        Some(metrics),
    );
    let backend = fake();
    let fetch = |request: &'static str| {
        std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            c.write_all(request.as_bytes()).expect("send");
            let mut reply = String::new();
            c.read_to_string(&mut reply).expect("read");
            reply
        })
    };
    // One that never sends anything is no obstacle.
    let _idle = TcpStream::connect(addr).expect("connect");
    let bad = fetch("POST /metrics HTTP/1.1\r\n\r\n");
    let missing = fetch("GET / HTTP/1.1\r\n\r\n");
    let good = fetch("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    serve_until(&mut server, &backend, || {
        bad.is_finished() && missing.is_finished() && good.is_finished()
    });
    assert!(bad.join().expect("client").starts_with("HTTP/1.1 405"));
    assert!(missing.join().expect("client").starts_with("HTTP/1.1 404"));
    let good = good.join().expect("client");
    assert!(
        good.starts_with("HTTP/1.1 200") && good.ends_with("esptun_uptime_seconds 1\n"),
        "{good}"
    );
}

#[test]
fn run_stops_within_a_tick_of_the_flag() {
    let dir = TempDir::new("control-stop");
    let path = dir.0.join("t.sock");
    let mut server = Server::new(ControlSocket::bind(&path).expect("bind"), None);
    let _idle = UnixStream::connect(&path).expect("connect");
    let stop = AtomicBool::new(false);
    let took = std::thread::scope(|s| {
        let runner = s.spawn(|| server.run(&stop, &fake()));
        std::thread::sleep(Duration::from_millis(50));
        let asked = Instant::now();
        stop.store(true, Ordering::Relaxed);
        while !runner.is_finished() && asked.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        asked.elapsed()
    });
    assert!(
        took < TICK + Duration::from_millis(100),
        "stop took {took:?}"
    );
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = TempDir::new("control-stale");
    let path = dir.0.join("t.sock");
    drop(std::fs::create_dir_all(&dir.0));
    let stale = UnixListener::bind(&path).expect("bind");
    drop(stale); // the file stays, nobody listens
    assert!(path.exists());
    let _socket = ControlSocket::bind(&path).expect("rebind over a stale file");
}

// Hardening: the control socket path never deletes anything but our
// own socket.

#[test]
fn hardening_a_regular_file_at_the_path_is_refused_and_kept() {
    let dir = TempDir::new("control-file");
    std::fs::create_dir_all(&dir.0).expect("dir");
    let path = dir.0.join("esptun.toml");
    std::fs::write(&path, "precious = true\n").expect("write");
    let err = ControlSocket::bind(&path).expect_err("a regular file");
    assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()) && text.contains("a regular file"),
        "{text}"
    );
    assert_eq!(std::fs::read(&path).expect("kept"), b"precious = true\n");

    // A link is not followed, nor removed.
    let link = dir.0.join("link.sock");
    std::os::unix::fs::symlink(&path, &link).expect("link");
    assert!(matches!(
        ControlSocket::bind(&link),
        Err(ControlError::NotASocket { .. })
    ));
    assert!(link.symlink_metadata().is_ok());
    assert_eq!(std::fs::read(&path).expect("kept"), b"precious = true\n");
}

#[test]
fn hardening_at_exit_only_the_socket_we_bound_is_removed() {
    let dir = TempDir::new("control-exit");
    let path = dir.0.join("t.sock");
    let socket = ControlSocket::bind(&path).expect("bind");
    // Replaced meanwhile by a file, then by another socket: neither is
    // ours to delete.
    std::fs::remove_file(&path).expect("unlink");
    std::fs::write(&path, "not ours").expect("write");
    drop(socket);
    assert_eq!(std::fs::read(&path).expect("kept"), b"not ours");
    std::fs::remove_file(&path).expect("unlink");

    let socket = ControlSocket::bind(&path).expect("bind");
    std::fs::remove_file(&path).expect("unlink");
    let _other = UnixListener::bind(&path).expect("another socket");
    drop(socket);
    assert!(path.symlink_metadata().is_ok(), "another's socket kept");
}
