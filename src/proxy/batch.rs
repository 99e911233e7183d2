//! Reading an upstream answer's body into the batch that goes to the client in one write,
//! shared by the pass-through pump (`forward`) and the NDJSON → SSE conversion.

use pingora::protocols::http::client::HttpSession;

/// Most bytes of upstream chunks, already in hand together, written to the client at once.
/// A chunk is never held back to wait for another: only what the upstream has already
/// delivered is joined, so a token stream stays unbuffered while a burst of tokens costs
/// one write instead of one per token.
pub const COALESCE_MAX: usize = 16 * 1024;

/// Room reserved for the chunks of one write before the first arrives: a burst of tokens or
/// a small JSON answer fits without growing it, and the buffer is reused from write to write.
pub(super) const BATCH_START: usize = 4 * 1024;

/// Appends the upstream's next piece of body to `batch`; `Ok(false)` at the end of the body.
///
/// An HTTP/1 piece is copied once, out of pingora's read buffer: its `Bytes` per chunk would
/// be an allocation and a copy of every token more (a token stream is one chunk per token).
/// Cancel-safe: the bytes are appended only once a read has completed.
pub(super) async fn read_into(
    upstream: &mut HttpSession,
    batch: &mut bytes::BytesMut,
) -> pingora::Result<bool> {
    let piece = match upstream {
        HttpSession::H1(h1) => h1.read_body_ref().await?,
        other => {
            let Some(b) = other.read_response_body().await? else {
                return Ok(false);
            };
            batch.extend_from_slice(&b);
            return Ok(true);
        }
    };
    match piece {
        Some(b) => {
            batch.extend_from_slice(b);
            Ok(true)
        }
        None => Ok(false),
    }
}
