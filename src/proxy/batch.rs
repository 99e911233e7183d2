//! How much of an upstream answer's body goes to the client in one write, shared by the
//! pass-through pump (`forward`) and the NDJSON → SSE conversion.

/// Most bytes of upstream chunks, already in hand together, written to the client at once.
/// A chunk is never held back to wait for another: only what the upstream has already
/// delivered is joined, so a token stream stays unbuffered while a burst of tokens costs
/// one write instead of one per token.
pub const COALESCE_MAX: usize = 16 * 1024;

/// Room reserved for the chunks of one write before the first arrives: a burst of tokens or
/// a small JSON answer fits without growing it, and the buffer is reused from write to write.
pub(super) const BATCH_START: usize = 4 * 1024;
