//! Idle upstream connections of the forward engine, kept by the thread that last used them.
//!
//! Why not pingora's pool (`Connector::release_http_session`): it spawns a watcher task for
//! every connection put back, on a runtime picked at random (`pingora_runtime::current_handle`
//! under one scheduler per thread), and taking a connection out signals that watcher and waits
//! for it to hand the connection over. Per forwarded request that was a task spawned and, on
//! two threads, most of the time a wake-up of the other thread (an `eventfd` write, a context
//! switch) before the request could go out, plus the watcher's own wake-up and a `getpeername`
//! check. Here a connection goes back onto its thread's list and the next request on that
//! thread takes it without waiting: the way nginx workers keep their upstream keep-alive
//! connections. A connection the upstream closed (or wrote to) while idle is noticed when taken
//! (a read that does not wait finds the end of the stream or unasked bytes), as pingora also
//! checks, and closed instead.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::AsyncReadExt;

/// Idle connections one thread keeps, every upstream together; past it the oldest is closed
/// (pingora's pool keeps 128 too).
const MAX_IDLE_PER_THREAD: usize = 128;

/// How long a connection may wait unused before it is closed rather than reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_mins(1);

struct Idle {
    /// The peer's `reuse_hash`: address, TLS and connection options.
    key: u64,
    stream: Stream,
    since: Instant,
}

thread_local! {
    /// Oldest first: connections are pushed as they are put back.
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

/// A connection to `peer` this thread put back, most recent first, if one is still open.
pub fn take(peer: &HttpPeer) -> Option<Stream> {
    let key = peer.reuse_hash();
    loop {
        let mut stream = IDLE.with_borrow_mut(|idle| {
            let now = Instant::now();
            let expired = idle
                .iter()
                .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
                .count();
            idle.drain(..expired);
            let at = idle.iter().rposition(|i| i.key == key)?;
            Some(idle.remove(at).stream)
        })?;
        if still_idle(&mut stream) {
            return Some(stream);
        }
    }
}

/// Puts a finished answer's connection back for the next request on this thread, or closes
/// it when the answer leaves it unusable (no keep-alive, body not fully read).
pub fn put(answer: super::answer::Answer, peer: &HttpPeer) {
    if let Some(stream) = answer.reuse() {
        keep(peer.reuse_hash(), stream);
    }
}

fn keep(key: u64, stream: Stream) {
    IDLE.with_borrow_mut(|idle| {
        if idle.len() >= MAX_IDLE_PER_THREAD {
            idle.remove(0);
        }
        idle.push(Idle {
            key,
            stream,
            since: Instant::now(),
        });
    });
}

/// Whether nothing arrived on an idle connection: readable means the upstream closed it or
/// sent bytes nobody asked for, and either way it cannot carry the next request.
fn still_idle(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // `unconstrained`: tokio's cooperative budget could make a ready read look pending.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

/// Connections this thread keeps (tests of the bound).
#[cfg(test)]
fn idle_count() -> usize {
    IDLE.with_borrow(Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn connected(listener: &TcpListener) -> (Stream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(
            client.unwrap(),
        ));
        (client, server.unwrap().0)
    }

    fn peer_of(listener: &TcpListener) -> HttpPeer {
        HttpPeer::new(listener.local_addr().unwrap(), false, String::new())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_put_back_is_taken_by_the_next_request_on_its_thread() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = peer_of(&listener);
        let other = HttpPeer::new("127.0.0.1:1", false, String::new());
        let (stream, _server) = connected(&listener).await;
        keep(peer.reuse_hash(), stream);
        assert!(take(&other).is_none(), "another upstream's connection");
        assert!(take(&peer).is_some());
        assert!(take(&peer).is_none(), "taken once");
        assert_eq!(idle_count(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_or_wrote_to_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = peer_of(&listener);
        let (closed, server) = connected(&listener).await;
        drop(server);
        let (spoken_to, mut server2) = connected(&listener).await;
        server2.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let (open, _server3) = connected(&listener).await;
        keep(peer.reuse_hash(), open);
        keep(peer.reuse_hash(), closed);
        keep(peer.reuse_hash(), spoken_to);
        // Let the close and the bytes reach the client sockets' readiness.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Most recent first: the one written to and the closed one are dropped on the way.
        assert!(take(&peer).is_some());
        assert_eq!(idle_count(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_are_bounded_and_expire() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = peer_of(&listener);
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE_PER_THREAD + 3 {
            let (stream, server) = connected(&listener).await;
            servers.push(server);
            keep(peer.reuse_hash(), stream);
        }
        assert_eq!(idle_count(), MAX_IDLE_PER_THREAD);
        // Aged past the timeout, none is reused, and all are closed.
        IDLE.with_borrow_mut(|idle| {
            for i in idle.iter_mut() {
                i.since -= IDLE_TIMEOUT;
            }
        });
        assert!(take(&peer).is_none());
        assert_eq!(idle_count(), 0);
    }
}
