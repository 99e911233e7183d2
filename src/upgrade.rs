//! The receiving half of a graceful upgrade: the listening sockets of the running process.
//!
//! The running process sends them with pingora's `Fds::send_to_sock` (one message: the bind
//! addresses, space-separated, with the descriptors as `SCM_RIGHTS`). pingora's own receiver
//! polls its socket once a second, which would leave the new process idle for up to a second
//! after the old one sent; this one blocks in `poll(2)` and takes them the moment they come.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The sockets this process took over, for its services to listen on (see
/// `server::Drained`).
static INHERITED: OnceLock<Vec<(String, RawFd)>> = OnceLock::new();

/// Receives the running process's listening sockets (see [`receive_listeners`]) and keeps
/// them for the services this process starts.
///
/// # Errors
/// As [`receive_listeners`].
pub fn take_over(path: &Path, wait: Duration) -> io::Result<usize> {
    let got = receive_listeners(path, wait)?;
    let n = got.len();
    let _ = INHERITED.set(got);
    Ok(n)
}

/// The sockets taken over, by bind address (empty unless this process is an upgrade).
pub fn inherited() -> &'static [(String, RawFd)] {
    INHERITED.get().map_or(&[], Vec::as_slice)
}

/// At most this many listening sockets are taken (ragway has two: gateway and metrics).
const MAX_FDS: usize = 32;

/// Listens on `path` and waits up to `wait` for one hand-over; returns each bind address with
/// its descriptor (close-on-exec).
///
/// # Errors
/// The socket cannot be created, nothing arrives within `wait`, or the message is not a
/// hand-over.
pub fn receive_listeners(path: &Path, wait: Duration) -> io::Result<Vec<(String, RawFd)>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let result = accept_within(&listener, wait).and_then(|conn| receive(conn.as_raw_fd()));
    let _ = std::fs::remove_file(path);
    result
}

fn accept_within(
    listener: &UnixListener,
    wait: Duration,
) -> io::Result<std::os::unix::net::UnixStream> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no listening sockets arrived within {}s (send SIGQUIT to the running ragway)",
                wait.as_secs()
            ),
        )),
        _ => listener.accept().map(|(s, _)| s),
    }
}

fn receive(fd: RawFd) -> io::Result<Vec<(String, RawFd)>> {
    let mut payload = [0u8; 2048];
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let space = unsafe { libc::CMSG_SPACE(u32::try_from(MAX_FDS * 4).unwrap_or(128)) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: `msg` describes buffers owned by this frame.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`, as cmsg(3) shows.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                // Read with `read_unaligned`: the pointer's alignment does not matter.
                #[allow(clippy::cast_ptr_alignment)]
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(std::ptr::read_unaligned(data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    let n = usize::try_from(n).unwrap_or(0);
    let names: Vec<String> = String::from_utf8_lossy(&payload[..n])
        .split_ascii_whitespace()
        .map(String::from)
        .collect();
    if names.len() != fds.len() || fds.is_empty() {
        for fd in fds {
            // SAFETY: descriptors received above and owned by nobody else.
            unsafe { libc::close(fd) };
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the hand-over message does not match its sockets",
        ));
    }
    Ok(names.into_iter().zip(fds).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn takes_the_sockets_pingora_sends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr_a = a.local_addr().unwrap().to_string();
        let addr_b = b.local_addr().unwrap().to_string();
        let mut sent = pingora::server::Fds::new();
        sent.add(addr_a.clone(), a.as_raw_fd());
        sent.add(addr_b.clone(), b.as_raw_fd());
        let p = path.clone();
        let receiver = std::thread::spawn(move || receive_listeners(&p, Duration::from_secs(20)));
        while !path.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        sent.send_to_sock(path.to_str().unwrap()).unwrap();
        let got = receiver.join().unwrap().unwrap();
        assert_eq!(got.len(), 2);
        for (name, fd) in got {
            // The received descriptor is the same listening socket.
            // SAFETY: a descriptor received above, owned here.
            let l = unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            assert_eq!(l.local_addr().unwrap().to_string(), name);
            assert!(name == addr_a || name == addr_b);
        }
    }

    #[test]
    fn nothing_sent_times_out_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let e =
            receive_listeners(&dir.path().join("u.sock"), Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("SIGQUIT"), "{e}");
    }
}
