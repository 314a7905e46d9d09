//! The control socket: a Unix stream socket, root-only by its file mode
//! (0600, in a 0700 directory), answering one request per connection.
//! Requests are one line; `status` gets the [`super::status::Status`] as
//! JSON. Served on its own thread so that a slow client never stalls the
//! datapath.
//!
//! Only ever a socket is removed at the path: a stale one at start, and at
//! exit only the one this process bound (same device and inode). Anything
//! else there (say `control_socket` mistyped as the configuration file) is
//! refused, never deleted.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest request line read; anything longer is refused.
const MAX_REQUEST: usize = 256;
/// Longest reply read by [`query`].
const MAX_REPLY: u64 = 16 << 20;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The whole request must arrive within this (see [`read_request`]).
const REQUEST_DEADLINE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another esptun is already running with control socket {0} (stop it first, or give this \
         instance its own interface or control_socket)"
    )]
    InUse(PathBuf),
    #[error(
        "control socket path {path} exists and is {kind}, not a socket: refusing to delete it; \
         set control_socket to a path of its own (such as /run/esptun/NAME.sock), or remove \
         {path} yourself if it is a leftover"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot create control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the daemon at {path}: {source} (is `esptun run` running with this \
         configuration? status needs root)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// The listening socket; the file is removed on drop if it is still the
/// one bound.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file bound, recorded at bind.
    bound: (u64, u64),
}

impl ControlSocket {
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(bind_err)?;
        }
        // lstat: a link at the path is looked at, not followed.
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse(path.to_path_buf()));
                }
                // Left by a process that died without cleaning up.
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Ok(meta) => {
                return Err(ControlError::NotASocket {
                    path: path.to_path_buf(),
                    kind: crate::fsperm::kind(&meta),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            bound: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers the connections waiting now (at most a few, so a flood of
    /// clients cannot keep the caller here).
    pub fn serve_pending(&self, status_json: &dyn Fn() -> String) {
        for _ in 0..16 {
            let Ok((stream, _)) = self.listener.accept() else {
                return;
            };
            if let Err(e) = answer(stream, status_json) {
                tracing::debug!("control client: {e}");
            }
        }
    }
}

fn answer(stream: UnixStream, status_json: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut request = [0u8; MAX_REQUEST];
    let len = read_request(
        &stream,
        |t| stream.set_read_timeout(Some(t)),
        &mut request,
        |r| r.contains(&b'\n'),
    )?;
    let line = String::from_utf8_lossy(&request[..len]);
    let reply = match line.trim() {
        "status" => status_json(),
        other => {
            serde_json::json!({ "error": format!("unknown request {other:?}: try \"status\"") })
                .to_string()
        }
    };
    (&stream).write_all(reply.as_bytes())?;
    (&stream).write_all(b"\n")
}

/// Reads a request into `buf` until `complete` says it is whole, the
/// buffer is full or the client closes, all within [`REQUEST_DEADLINE`]
/// however slowly it trickles in: no client can hold the (single) control
/// thread, or a stop waiting for it. Shared with the metrics endpoint.
pub(super) fn read_request<S>(
    stream: S,
    set_read_timeout: impl Fn(Duration) -> std::io::Result<()>,
    buf: &mut [u8],
    complete: impl Fn(&[u8]) -> bool,
) -> std::io::Result<usize>
where
    S: Read,
{
    let mut stream = stream;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut len = 0;
    while len < buf.len() && !complete(&buf[..len]) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request not complete in time",
            ));
        }
        set_read_timeout(left)?;
        match stream.read(&mut buf[len..])? {
            0 => break,
            n => len += n,
        }
    }
    Ok(len)
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == self.bound => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "removing the control socket: {e}");
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "not removing the control socket path: something else replaced our socket there"
            ),
            Err(_) => {}
        }
    }
}

/// Sends `request` to the daemon at `path` and returns its reply.
pub fn query(path: &Path, request: &str) -> Result<String, ControlError> {
    let connect_err = |source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(connect_err)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(connect_err)?;
    let mut reply = String::new();
    stream
        .take(MAX_REPLY)
        .read_to_string(&mut reply)
        .map_err(connect_err)?;
    if reply.trim().is_empty() {
        return Err(ControlError::Protocol {
            path: path.to_path_buf(),
            message: "empty reply".into(),
        });
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

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

        let server = std::thread::scope(|s| {
            let client = s.spawn(|| (query(&path, "status"), query(&path, "bogus")));
            for _ in 0..200 {
                socket.serve_pending(&|| "{\"ok\":true}".to_string());
                if client.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            client.join().expect("client thread")
        });
        assert_eq!(server.0.expect("status").trim(), "{\"ok\":true}");
        assert!(server.1.expect("reply").contains("unknown request"));
        drop(socket);
        assert!(!path.exists(), "removed on drop");
        assert!(matches!(
            query(&path, "status"),
            Err(ControlError::Connect { .. })
        ));
    }

    #[test]
    fn a_client_that_trickles_or_stalls_cannot_hold_the_thread() {
        let dir = TempDir::new("control-slow");
        let path = dir.0.join("t.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        let _silent = UnixStream::connect(&path).expect("connect");
        let mut trickle = UnixStream::connect(&path).expect("connect");
        trickle.write_all(b"sta").expect("write");
        let started = Instant::now();
        socket.serve_pending(&|| "{}".to_string());
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "two stalled clients held the thread {took:?}"
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
}
