//! The transport of a client connection, registered with the thread that serves it.
//!
//! pingora accepts every connection on the thread running its accept loop, where tokio
//! registers the socket with that thread's I/O driver, and then spawns the connection's task
//! on a random thread of its per-thread runtimes. Each time the client's socket became
//! readable, the accepting thread woke up only to wake the serving thread: an `eventfd` write,
//! a second `epoll_wait` return and a context switch on the critical path of every request
//! at low concurrency (`strace` at c=1: one cross-thread wake-up per two requests).
//! [`rehome`] duplicates the accepted descriptor and registers the copy with the serving
//! thread, so a connection lives on one thread from its first request, as in nginx's workers.
//!
//! pingora's own stream type cannot be built around another socket with its buffers
//! (`set_buffer` is crate-private), so [`Conn`] is the minimal transport its HTTP/1 session
//! needs, with the same buffer sizes: 64 KiB read-ahead (a head and a small body in one
//! `recv`) and a 1,460-byte write buffer (a response head and a small body in one `send`).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use pingora::protocols::l4::stream::{
    DEFAULT_L4_READ_BUFFER_SIZE, DEFAULT_L4_WRITE_BUFFER_SIZE, Stream as L4Stream,
};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf};
use tokio::net::TcpStream;

/// Moves an accepted plain-TCP connection onto the I/O driver of the calling thread; any
/// other stream (virtual, Unix-domain, TLS) is returned as it came.
pub fn rehome(stream: Stream) -> Stream {
    if stream.as_any().downcast_ref::<L4Stream>().is_none() {
        return stream;
    }
    let fd = stream.id();
    // A virtual socket reports -1.
    if fd < 0 {
        return stream;
    }
    // SAFETY: `stream` owns `fd`, open and not -1, and is alive until the copy is made.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let Ok(owned) = borrowed.try_clone_to_owned() else {
        return stream;
    };
    let copy = std::net::TcpStream::from(owned);
    // A Unix-domain socket has no inet address (ragway listens on TCP only).
    if copy.local_addr().is_err() {
        return stream;
    }
    // The copy shares the open file description, which pingora already made non-blocking.
    let Ok(tcp) = TcpStream::from_std(copy) else {
        return stream;
    };
    // pingora's stream takes the original descriptor out of the accepting thread's `epoll`
    // set as it closes it; the copy keeps the connection open.
    drop(stream);
    Box::new(Conn::new(tcp))
}

/// A client connection's socket with pingora's read-ahead and write buffering.
pub struct Conn {
    io: BufReader<BufWriter<TcpStream>>,
    fd: UniqueIDType,
    socket: Arc<SocketDigest>,
    established: SystemTime,
}

impl Conn {
    fn new(tcp: TcpStream) -> Conn {
        let fd = tcp.as_raw_fd();
        Conn {
            io: BufReader::with_capacity(
                DEFAULT_L4_READ_BUFFER_SIZE,
                BufWriter::with_capacity(DEFAULT_L4_WRITE_BUFFER_SIZE, tcp),
            ),
            fd,
            socket: Arc::new(SocketDigest::from_raw_fd(fd)),
            established: SystemTime::now(),
        }
    }
}

impl Drop for Conn {
    /// What is still buffered goes out before the socket closes, as pingora's stream does
    /// it: an answer cut short by its upstream must reach the client as far as it got (its
    /// status and first bytes), so that the client sees it cut rather than never answered.
    /// Without waiting: a socket that cannot take the bytes now is being closed anyway.
    fn drop(&mut self) {
        use futures_util::FutureExt;
        let _ = self.io.flush().now_or_never();
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Conn {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.io).await {
            tracing::debug!(error = %e, "client connection shutdown failed");
        }
    }
}

impl UniqueID for Conn {
    fn id(&self) -> UniqueIDType {
        self.fd
    }
}

impl Ssl for Conn {}

#[async_trait]
impl Peek for Conn {}

impl GetTimingDigest for Conn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.established,
            ..TimingDigest::default()
        })]
    }
}

impl GetProxyDigest for Conn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Conn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.socket.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The accepting runtime is shut down before the connection is used: a socket still
    /// registered with its driver could no longer be read or written.
    #[test]
    fn a_rehomed_connection_outlives_the_driver_that_accepted_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let accepting = runtime();
        let accepted: Stream = accepting.block_on(async {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_nonblocking(true).unwrap();
            Box::new(L4Stream::from(TcpStream::from_std(tcp).unwrap()))
        });
        let serving = runtime();
        let mut moved = serving.block_on(async { rehome(accepted) });
        drop(accepting);

        assert!(moved.as_any().downcast_ref::<Conn>().is_some());
        let peer = moved.get_socket_digest().unwrap().peer_addr().cloned();
        let client_addr = client.local_addr().unwrap();
        assert_eq!(peer.and_then(|a| a.as_inet().copied()), Some(client_addr));

        std::io::Write::write_all(&mut client, b"ping").unwrap();
        let got = serving.block_on(async {
            let mut buf = [0u8; 4];
            moved.read_exact(&mut buf).await.unwrap();
            // Two writes leave as one response once flushed.
            moved.write_all(b"po").await.unwrap();
            moved.write_all(b"ng").await.unwrap();
            moved.flush().await.unwrap();
            buf
        });
        assert_eq!(&got, b"ping");
        let mut reply = [0u8; 4];
        std::io::Read::read_exact(&mut client, &mut reply).unwrap();
        assert_eq!(&reply, b"pong");

        serving.block_on(async { Shutdown::shutdown(&mut *moved).await });
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut client, &mut rest).unwrap();
        assert!(rest.is_empty(), "the shut-down connection ends cleanly");
    }

    /// A connection dropped with bytes still in its write buffer sends them before closing.
    #[test]
    fn buffered_bytes_leave_when_the_connection_is_dropped() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let serving = runtime();
        serving.block_on(async {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_nonblocking(true).unwrap();
            let mut conn = Conn::new(TcpStream::from_std(tcp).unwrap());
            conn.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            conn.flush().await.unwrap();
            // Held in the buffer (smaller than it) until the drop.
            conn.write_all(b"content-length: 9\r\n\r\ncut")
                .await
                .unwrap();
        });
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut client, &mut got).unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\ncut");
    }

    #[test]
    fn streams_that_are_not_plain_tcp_stay_as_they_came() {
        let serving = runtime();
        serving.block_on(async {
            let (a, _b) = tokio::net::UnixStream::pair().unwrap();
            let kept = rehome(Box::new(L4Stream::from(a)));
            assert!(kept.as_any().downcast_ref::<L4Stream>().is_some());
        });
    }
}
