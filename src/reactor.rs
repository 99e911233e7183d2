//! Serves each client connection from the reactor of the thread that runs it.
//!
//! With per-thread schedulers (`work-stealing = false`, the default) pingora accepts every
//! connection on one thread, so that thread's reactor watches the socket, and then runs the
//! connection on a thread picked at random. With two threads, half the connections were
//! served away from their socket's reactor: every readiness event of theirs (a request
//! arriving) crossed threads, an eventfd write by the accepting thread plus a wake-up of the
//! serving one. Traced under forwarded-JSON load: ~0.3 such cross-thread wake-ups per request,
//! two thirds of all the gateway's wake-up writes. [`Local`] registers the socket anew with
//! the serving thread's reactor before its first request is read; the connection is then
//! served entirely on one thread, as nginx's workers do.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::protocols::l4::stream::{DEFAULT_L4_WRITE_BUFFER_SIZE, Stream as TcpConnection};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

/// A server application whose connections are moved onto their serving thread's reactor.
pub struct Local<A> {
    pub app: Arc<A>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Local<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = rehome(stream);
        // pingora's own loop over a kept-alive connection's requests, run here so that the
        // socket moves once per connection, not before every request.
        loop {
            stream = self.app.process_new(stream, shutdown).await?;
        }
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// `stream` registered with the current thread's reactor, or as it was if it is not a TCP
/// connection or cannot be moved (it is then served as before, across threads).
fn rehome(stream: Stream) -> Stream {
    let tcp = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
    let Some(peer) = tcp else {
        return stream;
    };
    if !stream.as_any().is::<TcpConnection>() {
        return stream;
    }
    let Ok(old) = stream.into_any().downcast::<TcpConnection>() else {
        unreachable!("the type was checked just before");
    };
    match moved(&old, peer) {
        Ok(new) => Box::new(Moved(BufWriter::with_capacity(
            DEFAULT_L4_WRITE_BUFFER_SIZE,
            new,
        ))),
        Err(e) => {
            tracing::debug!(error = %e, "connection not moved to its serving thread");
            old
        }
    }
}

/// A second handle on `old`'s socket, registered with the current thread's reactor. Dropping
/// `old` afterwards takes the socket off the accepting thread's reactor and closes only its
/// own descriptor; the socket and its options (no delay, keep-alive) stay as they were.
fn moved(old: &TcpConnection, peer: std::net::SocketAddr) -> std::io::Result<TcpConnection> {
    // SAFETY: the descriptor is `old`'s, open for as long as `old` is borrowed here; it is
    // only duplicated, never closed through this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(old.as_raw_fd()) }.try_clone_to_owned()?;
    let socket = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?;
    let mut new = TcpConnection::from(socket);
    // What pingora's accept records: the client's address, read by handlers (logs, limits).
    let digest = SocketDigest::from_raw_fd(new.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer.into()));
    new.set_socket_digest(digest);
    Ok(new)
}

/// A moved connection. pingora sizes an accepted connection's write buffer inside its
/// accept path, which cannot be reached from here, and a connection made from a socket has
/// none; without one a response's head and body went out in two sends instead of one. So
/// writes are buffered here, as much as pingora buffers them (one segment); everything
/// else is the connection's own.
#[derive(Debug)]
struct Moved(BufWriter<TcpConnection>);

impl AsyncRead for Moved {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Moved {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Moved {
    async fn shutdown(&mut self) {
        // Whatever is still buffered goes out first.
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.0).await {
            tracing::debug!(error = %e, "closing a client connection");
        }
    }
}

impl UniqueID for Moved {
    fn id(&self) -> UniqueIDType {
        self.0.get_ref().id()
    }
}

impl Ssl for Moved {}

impl GetTimingDigest for Moved {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.0.get_ref().get_timing_digest()
    }
}

impl GetProxyDigest for Moved {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.0.get_ref().get_proxy_digest()
    }
}

impl GetSocketDigest for Moved {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.0.get_ref().get_socket_digest()
    }
}

#[async_trait]
impl Peek for Moved {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accepts one connection on a runtime of its own, as pingora's accepting thread does.
    fn accepted_elsewhere() -> (Stream, std::net::TcpStream, std::net::SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let client_addr = client.local_addr().unwrap();
        let stream = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let stream = rt.block_on(async {
                listener.set_nonblocking(true).unwrap();
                let l = pingora::protocols::l4::listener::Listener::from(
                    tokio::net::TcpListener::from_std(listener).unwrap(),
                );
                l.accept().await.unwrap()
            });
            // The accepting runtime lives on, never driven again: its reactor still holds
            // the socket until it is moved.
            std::mem::forget(rt);
            stream
        })
        .join()
        .unwrap();
        (Box::new(stream), client, client_addr)
    }

    #[tokio::test]
    async fn a_moved_connection_keeps_its_bytes_its_peer_and_serves_on_this_thread() {
        let (stream, mut client, client_addr) = accepted_elsewhere();
        use std::io::{Read, Write};
        client.write_all(b"ping").unwrap();
        let mut stream = rehome(stream);
        assert!(stream.as_any().is::<Moved>());
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
        assert_eq!(peer, Some(client_addr));
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // The next bytes arrive while the read waits: only a reactor that watches the socket
        // wakes it. The accepting runtime is never driven again, so without the move this
        // read would wait for ever (checked by serving the connection unmoved).
        let mut writer = client.try_clone().unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            writer.write_all(b"more").unwrap();
        });
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stream.read_exact(&mut buf),
        )
        .await
        .expect("readiness reached this thread's reactor")
        .unwrap();
        assert_eq!(&buf, b"more");
        late.join().unwrap();
        stream.write_all(b"pong").await.unwrap();
        stream.flush().await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"pong");
        // Closing the moved connection closes the socket: the client sees the end.
        drop(stream);
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
    }
}
