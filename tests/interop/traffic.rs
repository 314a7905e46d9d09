//! The traffic every case carries, on the host side: UDP echo and sink,
//! TCP zeros out and a TCP sink counting non-zero bytes.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use esptun::lab::Netns;

use crate::TRAFFIC_TIMEOUT;

/// A UDP datagram's payload: its index and a pattern.
pub fn udp_payload(i: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    p[..4].copy_from_slice(&i.to_be_bytes());
    p
}

/// Host -> guest UDP of `size` bytes to `port`, echoed back by the guest:
/// (sent, echoed intact).
pub fn udp_echo(
    ns: &Netns,
    (host, guest): (IpAddr, IpAddr),
    port: u16,
    count: u32,
    size: usize,
) -> Result<(u32, u32), String> {
    ns.run(move || -> Result<(u32, u32), String> {
        let sock = UdpSocket::bind(SocketAddr::new(host, 0)).map_err(|e| e.to_string())?;
        sock.connect(SocketAddr::new(guest, port))
            .map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .map_err(|e| e.to_string())?;
        let (mut sent, mut ok) = (0, 0);
        let mut buf = vec![0u8; 65536];
        for i in 0..count {
            let p = udp_payload(i, size);
            // Up to three tries: the first datagram may wait for ARP.
            'tries: for _ in 0..3 {
                sock.send(&p).map_err(|e| e.to_string())?;
                sent += 1;
                for _ in 0..8 {
                    match sock.recv(&mut buf) {
                        Ok(n) if buf[..n] == p[..] => {
                            ok += 1;
                            break 'tries;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
        Ok((sent, ok))
    })
    .map_err(|e| e.to_string())?
}

/// Receives UDP on the host side until `count` arrived or timeout:
/// (received intact, corrupted).
pub fn udp_sink(
    ns: &Netns,
    host: IpAddr,
    port: u16,
    (count, size): (u32, usize),
    timeout: Duration,
) -> Receiver<(u32, u32)> {
    let sock = ns
        .run(move || UdpSocket::bind(SocketAddr::new(host, port)))
        .expect("thread in namespace")
        .expect("binding the host's UDP sink");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        let (mut ok, mut bad) = (0, 0);
        let mut buf = vec![0u8; 65536];
        while ok < count && Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                let i = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                // nettool's datagrams: index then 0x5a.
                if n == size && buf[4..n].iter().all(|&b| b == 0x5a) && i < count {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
        }
        let _ = tx.send((ok, bad));
    });
    rx
}

pub type Receiver<T> = std::sync::mpsc::Receiver<T>;

/// Host -> guest: TCP zeros to the guest's sink.
pub fn tcp_send_zeros(ns: &Netns, guest: IpAddr, bytes: u64) -> Result<Duration, String> {
    ns.run(move || -> Result<Duration, String> {
        let addr = SocketAddr::new(guest, 5001);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream
            .set_write_timeout(Some(TRAFFIC_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(TRAFFIC_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
            left -= n as u64;
        }
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
        // The guest closes once it has read everything.
        let mut sink = [0u8; 64];
        let _ = stream.read(&mut sink);
        Ok(started.elapsed())
    })
    .map_err(|e| e.to_string())?
}

/// Guest -> host: a TCP listener counting bytes and non-zero bytes.
pub fn tcp_sink(ns: &Netns, host: IpAddr) -> Receiver<Result<(u64, u64), String>> {
    let listener = ns
        .run(move || TcpListener::bind(SocketAddr::new(host, 5004)))
        .expect("thread in namespace")
        .expect("binding the host's TCP sink");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| -> Result<(u64, u64), String> {
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + TRAFFIC_TIMEOUT;
            let mut stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(format!("accept: {e}")),
                }
            };
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(TRAFFIC_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let (mut total, mut nonzero) = (0u64, 0u64);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                nonzero += buf[..n].iter().filter(|&&b| b != 0).count() as u64;
            }
            Ok((total, nonzero))
        })();
        let _ = tx.send(result);
    });
    rx
}
