//! `ragway probe`: a health check for container engines and supervisors.
//!
//! The runtime image is distroless (no shell, no curl), so a `HEALTHCHECK` can only run the
//! binary itself. The probe speaks just enough HTTP/1.1 over a plain `TcpStream` to GET one
//! path on this machine; it needs no async runtime and no configuration beyond the address,
//! and it never reads more than [`MAX_RESPONSE_HEAD`] bytes, so a confused or hostile listener
//! on the port cannot make it hang past its deadline or grow without bound.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Most bytes read looking for the status line: a healthy answer's first line is far shorter.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The address to connect to for a configured listen address: a wildcard listener
/// (`0.0.0.0`, `[::]`) is reached on the matching loopback address, since the probe runs on
/// the same machine (inside the same container).
///
/// # Errors
/// `listen` is not an IP address with a port.
pub fn target(listen: &str) -> Result<SocketAddr, String> {
    let mut addr: SocketAddr = listen
        .trim()
        .parse()
        .map_err(|_| format!("{listen:?} is not an address like 127.0.0.1:3000"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// GETs `path` on `addr` and returns the status code when it is 2xx; every other outcome
/// (refused, timed out, non-2xx, not HTTP) is an error naming what happened. `timeout` bounds
/// the whole exchange, not each step.
///
/// # Errors
/// A message naming what went wrong: a bad path, no connection, no or a non-2xx answer in
/// time, or something that is not HTTP.
pub fn check(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
        return Err(format!(
            "path {path:?}: must start with / and contain no spaces or control characters"
        ));
    }
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer from {addr} within {timeout:?}"))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    let host = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ragway-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;

    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head.iter().position(|&b| b == b'\n') {
            return status(&head[..end], addr, path);
        }
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(format!(
                "{addr} sent {MAX_RESPONSE_HEAD} bytes without a status line"
            ));
        }
        // Re-armed before every read so a listener that trickles bytes still cannot outlast
        // the overall deadline.
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        let room = (MAX_RESPONSE_HEAD - head.len()).min(buf.len());
        match stream.read(&mut buf[..room]) {
            Ok(0) => {
                return Err(format!("{addr} closed the connection without an answer"));
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer from {addr} within {timeout:?}"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading from {addr}: {e}")),
        }
    }
}

/// Parses `HTTP/1.x NNN reason`; only a 2xx code is healthy.
fn status(line: &[u8], addr: SocketAddr, path: &str) -> Result<u16, String> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().and_then(|c| {
        (c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
            .then(|| c.parse::<u16>().ok())
            .flatten()
    });
    let shown: String = line.chars().take(80).collect();
    match code {
        Some(code) if version.starts_with("HTTP/1.") => {
            if (200..300).contains(&code) {
                Ok(code)
            } else {
                Err(format!("GET {path} on {addr} answered {shown}"))
            }
        }
        _ => Err(format!("{addr} did not answer HTTP: {shown:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A one-connection server that reads the request head, then runs `answer` on the socket;
    /// returns its address and the request it saw.
    fn serve_once(
        answer: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) -> (SocketAddr, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&b[..n]);
            }
            answer(&mut s);
            String::from_utf8(req).unwrap()
        });
        (addr, handle)
    }

    const GENEROUS: Duration = Duration::from_secs(30);

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        assert_eq!(
            target("0.0.0.0:3000").unwrap(),
            "127.0.0.1:3000".parse().unwrap()
        );
        assert_eq!(target("[::]:3000").unwrap(), "[::1]:3000".parse().unwrap());
        assert_eq!(
            target("10.1.2.3:8080").unwrap(),
            "10.1.2.3:8080".parse().unwrap()
        );
        assert!(
            target("localhost:3000")
                .unwrap_err()
                .contains("not an address")
        );
    }

    #[test]
    fn a_2xx_answer_is_healthy_and_the_request_is_well_formed() {
        let (addr, seen) = serve_once(|s| {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":true}")
                .unwrap();
        });
        assert_eq!(check(addr, "/health", GENEROUS), Ok(200));
        let req = seen.join().unwrap();
        assert!(req.starts_with("GET /health HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {addr}\r\n")), "{req}");
        assert!(req.contains("Connection: close\r\n"), "{req}");
    }

    #[test]
    fn a_503_is_unhealthy_with_the_status_line_in_the_error() {
        let (addr, _seen) = serve_once(|s| {
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        });
        let e = check(addr, "/ready", GENEROUS).unwrap_err();
        assert!(e.contains("503 Service Unavailable"), "{e}");
    }

    #[test]
    fn a_refused_connection_is_unhealthy() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = check(addr, "/health", GENEROUS).unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
    }

    #[test]
    fn a_silent_listener_fails_at_the_deadline() {
        let (addr, _seen) = serve_once(|_s| thread::sleep(Duration::from_secs(5)));
        let e = check(addr, "/health", Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("no answer"), "{e}");
    }

    #[test]
    fn non_http_and_endless_garbage_are_refused_within_the_bound() {
        let (addr, _seen) = serve_once(|s| s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap());
        let e = check(addr, "/health", GENEROUS).unwrap_err();
        assert!(e.contains("did not answer HTTP"), "{e}");

        // No newline ever: the probe stops after MAX_RESPONSE_HEAD bytes, not at EOF.
        let (addr, _seen) = serve_once(|s| {
            let junk = vec![b'x'; 64 * 1024];
            let _ = s.write_all(&junk);
        });
        let e = check(addr, "/health", GENEROUS).unwrap_err();
        assert!(e.contains("without a status line"), "{e}");

        let (addr, _seen) = serve_once(|_s| {});
        let e = check(addr, "/health", GENEROUS).unwrap_err();
        assert!(e.contains("closed the connection"), "{e}");
    }

    #[test]
    fn paths_that_would_split_the_request_are_refused() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for p in ["health", "/a b", "/x\r\nHost: evil", ""] {
            assert!(
                check(addr, p, GENEROUS).unwrap_err().contains("path"),
                "{p:?}"
            );
        }
    }
}
