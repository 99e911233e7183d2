//! Reads the upstream's own token counts out of an answer while it streams through.
//!
//! Nothing is held back except, when ragway asked for a usage chunk the client did not ask
//! for, the one SSE event being received (an SSE client cannot use half an event anyway),
//! so that event can be dropped whole. Only lines that can carry counts are parsed:
//! `"usage"` (OpenAI, Anthropic, Responses API) and `"eval_count"` (Ollama). Each partial
//! line or event kept is bounded; past the bound the scanner stops looking (the answer still
//! flows untouched).

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Longest SSE event or NDJSON line looked into (a usage event is a few hundred bytes).
const MAX_LINE: usize = 1024 * 1024;
/// The end of a whole JSON answer kept to find its `usage` (which OpenAI and Ollama put
/// last).
const JSON_TAIL: usize = 64 * 1024;
/// Largest count taken from one answer: a trillion tokens. More is a broken or lying
/// upstream, and sums of clamped counts cannot overflow in any realistic lifetime.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

/// How the answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Sse,
    Ndjson,
    Json,
}

impl Format {
    #[must_use]
    pub fn of(content_type: &str) -> Option<Format> {
        let ct = content_type.to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            Some(Format::Sse)
        } else if ct.starts_with("application/x-ndjson") || ct.starts_with("application/jsonl") {
            Some(Format::Ndjson)
        } else if ct.starts_with("application/json") {
            Some(Format::Json)
        } else {
            None
        }
    }
}

/// Token counts seen so far (the latest report of each wins).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub prompt: u64,
    pub completion: u64,
}

pub struct Scanner {
    format: Format,
    /// Drop the usage-only SSE event (ragway asked for it, the client did not).
    strip: bool,
    /// Partial line (pass-through), the event being received (strip) or the JSON tail.
    buf: BytesMut,
    /// A line over [`MAX_LINE`] is being skipped up to its end.
    skipping: bool,
    counts: Counts,
}

/// A count as the upstream wrote it: non-negative whole numbers, clamped; anything else
/// (negative, fractional garbage, strings) is not a count.
fn count(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n.min(MAX_TOKENS));
    }
    let f = v.as_f64()?;
    if f.is_finite() && f >= 0.0 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        return Some(f.min(MAX_TOKENS as f64) as u64);
    }
    None
}

// Every line of every answer is searched, so the search must be cheap: comparing a window
// at each byte costs a `memcmp` call per byte, and a general substring searcher costs its
// set-up per call. Instead the needle's rarest byte in JSON text is looked for (`memchr`'s
// vectorised byte scan, no set-up), and only there is the whole needle compared.

/// Index of the needle byte least likely in JSON text (quotes and letters are everywhere).
fn anchor(needle: &[u8]) -> usize {
    const RARE: &[u8] = b"_\r\ngvkyp";
    RARE.iter()
        .find_map(|r| needle.iter().position(|b| b == r))
        .unwrap_or(0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let a = anchor(needle);
    let last = hay.len() - needle.len();
    let mut at = a;
    while at <= last + a {
        at += memchr::memchr(needle[a], &hay[at..=last + a])?;
        let start = at - a;
        if hay[start..start + needle.len()] == *needle {
            return Some(start);
        }
        at += 1;
    }
    None
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let a = anchor(needle);
    let mut end = hay.len() - needle.len() + a + 1;
    while end > a {
        let at = a + memchr::memrchr(needle[a], &hay[a..end])?;
        let start = at - a;
        if hay[start..start + needle.len()] == *needle {
            return Some(start);
        }
        end = at;
    }
    None
}

/// Where the first `"usage"` or `"eval_count"` in `hay` is (somewhere inside the match):
/// the two searches of [`find`] in one pass. Every streamed byte is asked, and almost
/// no line names either: one vectorised scan for the needles' anchor bytes (`g` of usage,
/// `_` of `eval_count`) costs a third of two [`find`]s, and the few hits in ordinary text are
/// checked in place.
fn count_key(hay: &[u8]) -> Option<usize> {
    const USAGE: &[u8] = b"\"usage\"";
    const EVAL: &[u8] = b"\"eval_count\"";
    // Each key is looked for by a letter that is rare in the lines that do not carry counts:
    // `g` of usage, `v` of eval (`_` was a false start on every line: `created_at`,
    // `finish_reason`).
    const USAGE_AT: usize = 4;
    const EVAL_AT: usize = 2;
    memchr::memchr2_iter(b'g', b'v', hay).find(|&at| {
        let (needle, offset) = if hay[at] == b'g' {
            (USAGE, USAGE_AT)
        } else {
            (EVAL, EVAL_AT)
        };
        at.checked_sub(offset).is_some_and(|start| {
            let end = start + needle.len();
            hay.get(start..end).is_some_and(|w| w == needle)
                && !(needle == USAGE && is_null_value(&hay[end..]))
        })
    })
}

/// Whether `after_key` (what follows a key's closing quote) is `: null`. A stream that asked
/// for usage carries `"usage":null` in every chunk (`OpenAI`, vLLM): no counts there, so such
/// a key is passed over rather than the line parsed.
fn is_null_value(after_key: &[u8]) -> bool {
    after_key
        .trim_ascii_start()
        .strip_prefix(b":")
        .is_some_and(|v| v.trim_ascii_start().starts_with(b"null"))
}

/// Whether a line names `"usage"` or `"eval_count"`.
fn mentions_counts(line: &[u8]) -> bool {
    count_key(line).is_some()
}

/// The JSON value after `"key":` at the last occurrence of the key in `hay`.
fn value_after(hay: &[u8], key: &[u8]) -> Option<Value> {
    parsed(value_start(hay, key)?)
}

/// Where the value after `"key":` starts, at the last occurrence of the key in `hay`.
fn value_start<'a>(hay: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = rfind(hay, key)? + key.len();
    let rest = &hay[at..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    Some(&rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..])
}

/// The first JSON value in `bytes`, as a `T`.
fn parsed<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<T>()
        .next()?
        .ok()
}

/// The count fields of a usage object, read without building a map of the whole object:
/// `OpenAI`'s carries nested `*_tokens_details` objects that would each become a map, and
/// only these four fields are looked at. Other fields are skipped unparsed. A value that is
/// not an object of that shape (a duplicated field, say) is read as a plain value instead.
#[derive(serde::Deserialize)]
// The providers' own field names.
#[allow(clippy::struct_field_names)]
struct UsageFields {
    prompt_tokens: Option<Value>,
    input_tokens: Option<Value>,
    completion_tokens: Option<Value>,
    output_tokens: Option<Value>,
}

impl UsageFields {
    /// The prompt and completion counts, where present and numbers.
    fn counts(&self) -> (Option<u64>, Option<u64>) {
        // As `Counts::take_usage`: the second name is read only when the first is absent.
        let either =
            |a: &Option<Value>, b: &Option<Value>| a.as_ref().or(b.as_ref()).and_then(count);
        (
            either(&self.prompt_tokens, &self.input_tokens),
            either(&self.completion_tokens, &self.output_tokens),
        )
    }
}

impl Counts {
    /// An OpenAI (`prompt_tokens`/`completion_tokens`) or Anthropic and Responses
    /// (`input_tokens`/`output_tokens`) usage object.
    fn take_usage(&mut self, u: &Value) -> bool {
        let mut any = false;
        if let Some(p) = u
            .get("prompt_tokens")
            .or_else(|| u.get("input_tokens"))
            .and_then(count)
        {
            self.prompt = p;
            any = true;
        }
        if let Some(c) = u
            .get("completion_tokens")
            .or_else(|| u.get("output_tokens"))
            .and_then(count)
        {
            self.completion = c;
            any = true;
        }
        any
    }

    /// Ollama's final object.
    fn take_ollama(&mut self, v: &Value) {
        if let Some(p) = v.get("prompt_eval_count").and_then(count) {
            self.prompt = p;
        }
        if let Some(c) = v.get("eval_count").and_then(count) {
            self.completion = c;
        }
    }

    /// Any of the shapes above in one parsed event or line.
    fn take_any(&mut self, v: &Value) {
        for u in [
            v.get("usage"),
            v.pointer("/response/usage"),
            v.pointer("/message/usage"),
        ]
        .into_iter()
        .flatten()
        {
            if u.is_object() {
                self.take_usage(u);
            }
        }
        self.take_ollama(v);
    }
}

/// The fields of one SSE or NDJSON line that [`Counts::take_any`] reads, and nothing else.
#[derive(serde::Deserialize)]
struct LineCounts {
    usage: Option<Value>,
    response: Option<Nested>,
    message: Option<Nested>,
    prompt_eval_count: Option<Value>,
    eval_count: Option<Value>,
    /// Only its length is looked at; its elements are skipped unbuilt (`IgnoredAny` takes no
    /// room). A `choices` that is not an array fails this read, and the line is then read
    /// as a plain value.
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// `response` or `message`: an object that may hold `usage` (Responses API, Anthropic), or
/// anything else (Ollama's `response` is the generated text), which is skipped unbuilt.
#[derive(Default)]
struct Nested {
    usage: Option<Value>,
}

impl<'de> serde::Deserialize<'de> for Nested {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Nested, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Nested;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Nested, A::Error> {
                let mut out = Nested::default();
                while let Some(IsUsage(usage)) = map.next_key()? {
                    if usage {
                        // The last one wins, as when the line is read as a `Value`.
                        out.usage = Some(map.next_value()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Nested, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Nested::default())
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Nested, E> {
                Ok(Nested::default())
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Nested, E> {
                Ok(Nested::default())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Nested, E> {
                Ok(Nested::default())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Nested, E> {
                Ok(Nested::default())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Nested, E> {
                Ok(Nested::default())
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Nested, E> {
                Ok(Nested::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether an object key is `usage`, read without allocating it.
struct IsUsage(bool);

impl<'de> serde::Deserialize<'de> for IsUsage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IsUsage, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IsUsage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<IsUsage, E> {
                Ok(IsUsage(k == "usage"))
            }
        }
        d.deserialize_str(V)
    }
}

impl LineCounts {
    /// Whether the line is the usage-only chunk: `choices` an empty array, `usage` an object.
    fn usage_only(&self) -> bool {
        self.choices.as_ref().is_some_and(Vec::is_empty)
            && self.usage.as_ref().is_some_and(Value::is_object)
    }

    /// As [`Counts::take_any`] on the whole line.
    fn take(self, counts: &mut Counts) {
        let nested = |n: Option<Nested>| n.and_then(|n| n.usage);
        for u in [self.usage, nested(self.response), nested(self.message)]
            .into_iter()
            .flatten()
        {
            if u.is_object() {
                counts.take_usage(&u);
            }
        }
        if let Some(p) = self.prompt_eval_count.as_ref().and_then(count) {
            counts.prompt = p;
        }
        if let Some(c) = self.eval_count.as_ref().and_then(count) {
            counts.completion = c;
        }
    }
}

impl Scanner {
    #[must_use]
    pub fn new(format: Format, strip: bool) -> Scanner {
        Scanner {
            format,
            strip: strip && format == Format::Sse,
            buf: BytesMut::new(),
            skipping: false,
            counts: Counts::default(),
        }
    }

    #[must_use]
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Whether the bytes sent on may differ from the upstream's (framing must then be
    /// chunked, not the upstream's `Content-Length`).
    #[must_use]
    pub fn rewrites(&self) -> bool {
        self.strip
    }

    /// Looks at one chunk; returns what to send on now.
    pub fn relay(&mut self, chunk: Bytes) -> Bytes {
        match self.format {
            Format::Json => {
                self.buf.extend_from_slice(&chunk);
                if self.buf.len() > 2 * JSON_TAIL {
                    let cut = self.buf.len() - JSON_TAIL;
                    let _ = self.buf.split_to(cut);
                }
                chunk
            }
            _ if self.strip => self.relay_events(&chunk),
            _ => {
                self.scan_lines(&chunk);
                chunk
            }
        }
    }

    /// The end of the answer: what was still held back.
    pub fn finish(&mut self) -> Bytes {
        match self.format {
            Format::Json => {
                let tail = std::mem::take(&mut self.buf);
                let usage = value_start(&tail, b"\"usage\"");
                // Only an object is read as the struct: serde would also fill one from an
                // array of four values.
                let fields = usage
                    .filter(|v| v.starts_with(b"{"))
                    .and_then(parsed::<UsageFields>);
                if let Some(u) = fields {
                    let (prompt, completion) = u.counts();
                    if let Some(p) = prompt {
                        self.counts.prompt = p;
                    }
                    if let Some(c) = completion {
                        self.counts.completion = c;
                    }
                } else if let Some(u) = usage.and_then(parsed::<Value>)
                    && u.is_object()
                {
                    self.counts.take_usage(&u);
                }
                if let Some(p) = value_after(&tail, b"\"prompt_eval_count\"")
                    .as_ref()
                    .and_then(count)
                {
                    self.counts.prompt = p;
                }
                if let Some(c) = value_after(&tail, b"\"eval_count\"")
                    .as_ref()
                    .and_then(count)
                {
                    self.counts.completion = c;
                }
                Bytes::new()
            }
            _ if self.strip => {
                // An unterminated last event is passed on as it came.
                let rest = self.buf.split().freeze();
                self.line_group(&rest);
                rest
            }
            _ => {
                let rest = self.buf.split().freeze();
                if !self.skipping {
                    self.line(&rest);
                }
                Bytes::new()
            }
        }
    }

    /// Pass-through: every complete line that names a count is looked at; a partial last
    /// one is kept for the next chunk. A chunk is a whole write's worth of upstream chunks
    /// (hundreds of token lines in a burst), so the lines are not visited one by one: one
    /// scan over all of them finds the few that name a count.
    fn scan_lines(&mut self, chunk: &[u8]) {
        let (Some(first_nl), Some(last_nl)) =
            (memchr::memchr(b'\n', chunk), memchr::memrchr(b'\n', chunk))
        else {
            self.keep_partial(chunk);
            return;
        };
        // The first line ends the one kept from the previous chunk (or the one skipped).
        let first = &chunk[..first_nl];
        if self.skipping {
            self.skipping = false;
        } else if self.buf.is_empty() {
            self.line(first);
        } else {
            self.buf.extend_from_slice(first);
            let line = self.buf.split().freeze();
            self.line(&line);
        }
        // Every line in `whole` ends with a newline.
        let mut whole = &chunk[first_nl + 1..=last_nl];
        while let Some(at) = count_key(whole) {
            let start = memchr::memrchr(b'\n', &whole[..at]).map_or(0, |i| i + 1);
            let end = at + memchr::memchr(b'\n', &whole[at..]).expect("lines end in a newline");
            self.line(&whole[start..end]);
            whole = &whole[end + 1..];
        }
        self.keep_partial(&chunk[last_nl + 1..]);
    }

    /// The start of a line whose end has not come yet, kept up to [`MAX_LINE`]; past it the
    /// line is skipped up to its end.
    fn keep_partial(&mut self, rest: &[u8]) {
        if self.skipping {
            return;
        }
        if self.buf.len() + rest.len() > MAX_LINE {
            self.buf.clear();
            self.skipping = true;
        } else {
            self.buf.extend_from_slice(rest);
        }
    }

    /// One line of SSE or NDJSON.
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let payload = match self.format {
            Format::Sse => match line.strip_prefix(b"data:") {
                Some(p) => p,
                None => return,
            },
            _ => line,
        };
        if !mentions_counts(payload) {
            return;
        }
        self.read_counts(payload);
    }

    /// Takes the counts of one line's JSON payload; whether it is the usage-only chunk
    /// (`choices` an empty array, `usage` an object).
    fn read_counts(&mut self, payload: &[u8]) -> bool {
        let payload = payload.trim_ascii();
        // Only the count fields and `choices`' length are built: Ollama's last line also
        // carries `context`, often thousands of token ids, which a whole `Value` would
        // allocate one by one. Only an object is read as the struct: serde would also fill
        // one from an array.
        let typed = payload
            .starts_with(b"{")
            .then(|| serde_json::from_slice::<LineCounts>(payload).ok())
            .flatten();
        if let Some(c) = typed {
            let usage_only = c.usage_only();
            c.take(&mut self.counts);
            usage_only
        } else if let Ok(v) = serde_json::from_slice::<Value>(payload) {
            // Not of that shape (a duplicated field, say): read as a plain value.
            self.counts.take_any(&v);
            let no_choices = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty);
            no_choices && v.get("usage").is_some_and(Value::is_object)
        } else {
            false
        }
    }

    /// The lines of one SSE event; `true` when it is a usage-only chunk (no choices).
    fn line_group(&mut self, event: &[u8]) -> bool {
        let mut usage_only = false;
        for line in event.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            if find(payload, b"\"usage\"").is_none() {
                continue;
            }
            usage_only |= self.read_counts(payload);
        }
        usage_only
    }

    /// Strip mode: whole events are sent on, except the usage-only one.
    fn relay_events(&mut self, chunk: &Bytes) -> Bytes {
        if self.buf.is_empty()
            && let Some(end) = last_boundary(chunk)
        {
            // The usual case, a write that starts with an event: only its incomplete end
            // is copied aside.
            self.buf.extend_from_slice(&chunk[end..]);
            return self.without_usage_events(chunk.slice(..end));
        }
        self.buf.extend_from_slice(chunk);
        let Some(end) = last_boundary(&self.buf) else {
            if self.buf.len() > MAX_LINE {
                // No event boundary within the bound: stop holding anything back.
                self.strip = false;
                self.skipping = true;
                return self.buf.split().freeze();
            }
            return Bytes::new();
        };
        let complete = self.buf.split_to(end).freeze();
        self.without_usage_events(complete)
    }

    /// Whole events, less the usage-only one.
    ///
    /// Only an event that names `"usage"` can be that one or carry counts, so one search
    /// across the write finds those instead of every event's lines being read; the events
    /// are still cut from the start, as the client will cut them.
    fn without_usage_events(&mut self, complete: Bytes) -> Bytes {
        let mut hit = usage_hit(&complete, 0);
        let mut kept: Option<BytesMut> = None;
        let mut at = 0;
        while let Some(h) = hit {
            // The events wholly before the hit pass as they are, in one piece: walking them
            // one by one cost more than the rest of the stream's relay.
            let start = last_boundary(&complete[at..h]).map_or(at, |b| at + b);
            if let Some(k) = kept.as_mut() {
                k.extend_from_slice(&complete[at..start]);
            }
            at = start;
            let stop = next_boundary(&complete, at).unwrap_or(complete.len());
            let event = &complete[at..stop];
            let usage_only = h < stop && {
                hit = usage_hit(&complete, stop);
                self.line_group(event)
            };
            if usage_only {
                kept.get_or_insert_with(|| {
                    let mut b = BytesMut::with_capacity(complete.len());
                    b.extend_from_slice(&complete[..at]);
                    b
                });
            } else if let Some(k) = kept.as_mut() {
                k.extend_from_slice(event);
            }
            at = stop;
        }
        match kept {
            Some(mut k) => {
                k.extend_from_slice(&complete[at..]);
                k.freeze()
            }
            None => complete,
        }
    }
}

/// The next `"usage"` at or after `from` that is not a key with a `null` value. A stream
/// that asked for usage carries `"usage":null` in every chunk (`OpenAI`, vLLM); such a
/// chunk has no counts and is not the usage-only event, so the events before a hit are cut
/// only when a hit can be one, not at every chunk.
fn usage_hit(b: &[u8], from: usize) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    // A searcher built once: `find`'s one-byte anchor (`g`) also hits every chunk's
    // `system_fingerprint`, and this search runs over whole writes of hundreds of chunks.
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    let mut at = from;
    loop {
        let h = at + FINDER.find(&b[at..])?;
        if !is_null_value(&b[h + KEY.len()..]) {
            return Some(h);
        }
        at = h + KEY.len();
    }
}

/// The index just past the first blank line (`\n\n` or `\r\n\r\n`) at or after `from`.
///
/// One pass over the line ends, not a search per needle: a search for `\r\n\r\n` in a
/// stream without `\r` runs to the end of the buffer, and this is asked once per event of a
/// write of hundreds of events.
fn next_boundary(b: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &b[from..]).find_map(|i| {
        let i = from + i;
        if b.get(i + 1) == Some(&b'\n') {
            return Some(i + 2);
        }
        (i > from && b[i - 1] == b'\r' && b.get(i + 1..i + 3) == Some(b"\r\n")).then_some(i + 3)
    })
}

/// The index just past the last blank line.
fn last_boundary(b: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'\n', b).find_map(|i| {
        let lf = i >= 1 && b[i - 1] == b'\n';
        let crlf = i >= 3 && &b[i - 3..i] == b"\r\n\r";
        (lf || crlf).then_some(i + 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The anchored search finds what a window-by-window comparison finds, first and last,
    /// with needles at the edges, overlapping, repeated or absent.
    /// Blank-line boundaries agree with a plain search for either needle, on every string
    /// of `\r`, `\n` and `a` up to seven bytes long, from every start.
    #[test]
    fn boundaries_agree_with_the_plain_search() {
        let first = |b: &[u8], from: usize| {
            let hay = &b[from..];
            let lf = hay.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
            let crlf = hay.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            match (lf, crlf) {
                (Some(a), Some(c)) => Some(from + a.min(c)),
                (a, c) => a.or(c).map(|i| from + i),
            }
        };
        let last = |b: &[u8]| {
            let lf = b.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
            let crlf = b.windows(4).rposition(|w| w == b"\r\n\r\n").map(|i| i + 4);
            lf.max(crlf)
        };
        for len in 0..=7u32 {
            for code in 0..3usize.pow(len) {
                let mut c = code;
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        let byte = [b'\r', b'\n', b'a'][c % 3];
                        c /= 3;
                        byte
                    })
                    .collect();
                assert_eq!(last_boundary(&b), last(&b), "{b:?}");
                for from in 0..=b.len() {
                    assert_eq!(
                        next_boundary(&b, from),
                        first(&b, from),
                        "{b:?} from {from}"
                    );
                }
            }
        }
    }

    #[test]
    fn search_agrees_with_the_plain_comparison() {
        let needles: [&[u8]; 6] = [
            b"\"usage\"",
            b"\"eval_count\"",
            b"\"prompt_eval_count\"",
            b"\n\n",
            b"\r\n\r\n",
            b"aa",
        ];
        let hays: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\"".to_vec(),
            b"\"usage\"".to_vec(),
            b"x\"usage\"x\"usage\"".to_vec(),
            b"{\"prompt_eval_count\":3,\"eval_count\":5}".to_vec(),
            b"\n\n\n\r\n\r\n\r\n".to_vec(),
            b"aaaa_a".to_vec(),
            b"\"usag\"usage\"\"eval_coun\"eval_count\"".to_vec(),
            vec![0xff, b'_', 0xfe, b'\n', b'\n', 0xc3],
        ];
        for hay in &hays {
            for needle in needles {
                let plain = hay.windows(needle.len()).position(|w| w == needle);
                let plain_last = hay.windows(needle.len()).rposition(|w| w == needle);
                assert_eq!(find(hay, needle), plain, "{hay:?} {needle:?}");
                assert_eq!(rfind(hay, needle), plain_last, "{hay:?} {needle:?}");
            }
            let plain = |n: &[u8]| hay.windows(n.len()).any(|w| w == n);
            assert_eq!(
                mentions_counts(hay),
                plain(b"\"usage\"") || plain(b"\"eval_count\""),
                "{hay:?}"
            );
        }
        // Anchor bytes at the very edges, and needles cut short by the end of the line.
        for (line, expected) in [
            (&b"g"[..], false),
            (b"_", false),
            (b"usage\"", false),
            (b"\"usag", false),
            (b"eval_count\"", false),
            (b"\"eval_coun", false),
            (b"\"prompt_eval_count\":1", false),
            (b"ggg___\"usage\"", true),
            (b"{\"eval_count\":2}", true),
            (
                b"{\"model\":\"m\",\"created_at\":\"t\",\"response\":\"going\"}",
                false,
            ),
        ] {
            assert_eq!(mentions_counts(line), expected, "{line:?}");
        }
    }

    const USAGE_EVENT: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":22,\"total_tokens\":33}}\n\n";

    fn sse() -> String {
        format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}}}}],\"usage\":null}}\n\n{USAGE_EVENT}data: [DONE]\n\n"
        )
    }

    /// Feeds `input` in chunks of every size; returns what was sent on and the counts.
    fn run(format: Format, strip: bool, input: &str, size: usize) -> (String, Counts) {
        let mut s = Scanner::new(format, strip);
        let mut out = Vec::new();
        for c in input.as_bytes().chunks(size) {
            out.extend_from_slice(&s.relay(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&s.finish());
        (String::from_utf8(out).unwrap(), s.counts())
    }

    #[test]
    fn sse_usage_is_read_and_stripped_whatever_the_chunking() {
        let input = sse();
        for size in 1..=input.len() {
            let (out, c) = run(Format::Sse, false, &input, size);
            assert_eq!(out, input);
            assert_eq!(
                c,
                Counts {
                    prompt: 11,
                    completion: 22
                },
                "size {size}"
            );
            let (out, c) = run(Format::Sse, true, &input, size);
            assert_eq!(out, input.replace(USAGE_EVENT, ""), "size {size}");
            assert_eq!(
                c,
                Counts {
                    prompt: 11,
                    completion: 22
                }
            );
        }
    }

    /// Events before, between and after usage events pass whole and in order, with either
    /// line ending, whatever the writes: only the usage-only event is cut.
    #[test]
    fn the_events_around_usage_events_pass_whole_in_any_write() {
        for nl in ["\n", "\r\n"] {
            let event = |data: &str| format!("data: {data}{nl}{nl}");
            let content = |i: usize| {
                event(&format!(
                    "{{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}"
                ))
            };
            let mut input = String::new();
            for i in 0..40 {
                input += &content(i);
            }
            input += &event(
                "{\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":3}}",
            );
            for i in 40..60 {
                input += &content(i);
            }
            let usage_only =
                event("{\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":22}}");
            input += &usage_only;
            input += &event("[DONE]");
            for size in [1, 7, 64, 333, input.len()] {
                let (out, c) = run(Format::Sse, true, &input, size);
                assert_eq!(out, input.replace(&usage_only, ""), "size {size}");
                assert_eq!(
                    c,
                    Counts {
                        prompt: 11,
                        completion: 22
                    }
                );
            }
        }
    }

    #[test]
    fn usage_inside_a_content_chunk_is_counted_but_kept() {
        let input = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        let (out, c) = run(Format::Sse, true, input, 7);
        assert_eq!(out, input);
        assert_eq!(
            c,
            Counts {
                prompt: 3,
                completion: 4
            }
        );
    }

    /// A line read for its counts alone gives what reading it whole as a `Value` gives, for
    /// every shape a line can take.
    #[test]
    fn count_fields_read_alone_match_the_whole_line() {
        for line in [
            r#"{"done":true,"context":[1,2,3],"prompt_eval_count":7,"eval_count":9}"#,
            r#"{"response":"eval_count","eval_count":2.5}"#,
            r#"{"message":{"role":"assistant","content":"","usage":{"prompt_tokens":4}},"eval_count":1}"#,
            r#"{"response":{"usage":{"input_tokens":3,"output_tokens":8}},"usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":5,"completion_tokens":6},"message":[1,{"usage":2}]}"#,
            r#"{"usage":null,"eval_count":null,"prompt_eval_count":"7"}"#,
            r#"{"usage":{"completion_tokens":2},"usage":{"completion_tokens":3}}"#,
            r#"{"message":{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}}"#,
            r#"[{"usage":{"prompt_tokens":1}},null,null,3,4]"#,
            r#"{"eval_count":-1,"usage":{"prompt_tokens":1e3}}"#,
            r#"{"response":true,"message":null,"eval_count":4}"#,
        ] {
            let mut whole = Counts::default();
            whole.take_any(&serde_json::from_str(line).expect(line));
            let mut scanner = Scanner::new(Format::Ndjson, false);
            scanner.line(line.as_bytes());
            assert_eq!(scanner.counts, whole, "{line}");
        }
    }

    /// An event read for its counts and `choices` alone is judged usage-only, and counted,
    /// as reading it whole as a `Value` judges it.
    #[test]
    fn usage_only_events_read_alone_match_the_whole_event() {
        for data in [
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":null,"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":{},"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":"","usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[],"usage":null}"#,
            r#"{"choices":[],"usage":[1,2]}"#,
            r#"{"usage":{"prompt_tokens":4,"completion_tokens":5}}"#,
            r#"{"choices":[],"choices":[1],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[[],{"a":[]}],"usage":{"completion_tokens":3},"eval_count":9}"#,
            r#"[{"choices":[],"usage":{"prompt_tokens":1}}]"#,
        ] {
            let v: Value = serde_json::from_str(data).expect(data);
            let mut whole = Counts::default();
            whole.take_any(&v);
            let no_choices = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty);
            let usage_only = no_choices && v.get("usage").is_some_and(Value::is_object);
            let mut scanner = Scanner::new(Format::Sse, true);
            let judged = scanner.line_group(format!("data: {data}\n").as_bytes());
            assert_eq!(judged, usage_only, "{data}");
            assert_eq!(scanner.counts, whole, "{data}");
        }
    }

    #[test]
    fn ndjson_and_json_answers() {
        let nd = "{\"message\":{\"content\":\"\\\"usage\\\": 5\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":7,\"eval_count\":9}\n";
        for size in 1..=nd.len() {
            let (out, c) = run(Format::Ndjson, false, nd, size);
            assert_eq!(out, nd);
            assert_eq!(
                c,
                Counts {
                    prompt: 7,
                    completion: 9
                }
            );
        }
        let big = "x".repeat(300_000);
        let json = format!(
            "{{\"choices\":[{{\"message\":{{\"content\":\"{big}\"}}}}],\"usage\": {{\"prompt_tokens\":5,\"completion_tokens\":6}}}}"
        );
        let (out, c) = run(Format::Json, false, &json, 4096);
        assert_eq!(out.len(), json.len());
        assert_eq!(
            c,
            Counts {
                prompt: 5,
                completion: 6
            }
        );
        let ollama = "{\"response\":\"hi\",\"done\":true,\"context\":[1,2],\"prompt_eval_count\":2,\"eval_count\":3}";
        assert_eq!(
            run(Format::Json, false, ollama, 5).1,
            Counts {
                prompt: 2,
                completion: 3
            }
        );
    }

    #[test]
    fn whole_json_usage_objects_of_every_shape() {
        let cases = [
            // OpenAI's, with its nested details objects.
            (
                r#"{"id":"x","usage":{"prompt_tokens":11,"completion_tokens":4,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
                11,
                4,
            ),
            // Anthropic's and the Responses API's names.
            (r#"{"usage":{"input_tokens":3,"output_tokens":8}}"#, 3, 8),
            // The first name wins even when it is not a number, as for streamed events.
            (
                r#"{"usage":{"prompt_tokens":"many","input_tokens":3,"completion_tokens":2}}"#,
                0,
                2,
            ),
            // A duplicated field is no struct: read as a plain value, the last one wins.
            (
                r#"{"usage":{"prompt_tokens":1,"prompt_tokens":6,"completion_tokens":2}}"#,
                6,
                2,
            ),
            // Not an object: nothing counted, nothing fails.
            (r#"{"usage":[1,2]}"#, 0, 0),
            (r#"{"usage":[1,2,3,4]}"#, 0, 0),
            (r#"{"usage":null}"#, 0, 0),
        ];
        for (json, prompt, completion) in cases {
            for size in [1, 7, json.len()] {
                assert_eq!(
                    run(Format::Json, false, json, size).1,
                    Counts { prompt, completion },
                    "{json} in pieces of {size}"
                );
            }
        }
    }

    #[test]
    fn hostile_counts_are_clamped_or_ignored() {
        let cases = [
            (
                "{\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":1e300}}",
                MAX_TOKENS,
                MAX_TOKENS,
            ),
            (
                "{\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":\"7\"}}",
                0,
                0,
            ),
            (
                "{\"usage\":{\"prompt_tokens\":99999999999999999999999999,\"completion_tokens\":null}}",
                MAX_TOKENS,
                0,
            ),
            ("{\"usage\":[1,2]}", 0, 0),
            ("{\"usage\":", 0, 0),
        ];
        for (body, p, c) in cases {
            assert_eq!(
                run(Format::Json, false, body, 3).1,
                Counts {
                    prompt: p,
                    completion: c
                },
                "{body}"
            );
        }
    }

    /// `OpenAI`'s stream with `include_usage`: `"usage":null` in every chunk, the counts in a
    /// last chunk without choices. Whatever the cuts, the null-usage chunks pass untouched,
    /// the usage-only chunk goes and its counts are read.
    #[test]
    fn null_usage_in_every_chunk_is_passed_and_the_usage_chunk_stripped() {
        let mut sse = String::new();
        for i in 0..300 {
            // Compact, spaced and CRLF-framed forms, and a content that names the key.
            let sep = if i % 3 == 0 { " : " } else { ":" };
            let end = if i % 5 == 0 { "\r\n\r\n" } else { "\n\n" };
            sse.push_str(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"\\\"usage\\\" {i}\"}}}}],\"usage\"{sep}null}}{end}"
            ));
        }
        let usage =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
        let input = format!("{sse}{usage}data: [DONE]\n\n");
        let expected = format!("{sse}data: [DONE]\n\n");
        for size in [1, 7, 64, 500, 4096, input.len()] {
            let mut s = Scanner::new(Format::Sse, true);
            let mut out = Vec::new();
            for piece in input.as_bytes().chunks(size) {
                out.extend_from_slice(&s.relay(Bytes::copy_from_slice(piece)));
            }
            out.extend_from_slice(&s.finish());
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{size}");
            assert_eq!(
                s.counts(),
                Counts {
                    prompt: 3,
                    completion: 4
                },
                "{size}"
            );
        }
        // Passed through when the client asked for usage itself: the same counts.
        let mut s = Scanner::new(Format::Sse, false);
        for piece in input.as_bytes().chunks(333) {
            assert_eq!(s.relay(Bytes::copy_from_slice(piece)).as_ref(), piece);
        }
        assert!(s.finish().is_empty());
        assert_eq!(
            s.counts(),
            Counts {
                prompt: 3,
                completion: 4
            }
        );
        assert_eq!(count_key(b"{\"usage\" :null}"), None);
        // The position found is the key's anchor letter, the `v` of `eval`.
        assert_eq!(count_key(b"{\"usage\":null,\"eval_count\":2}"), Some(16));
        assert_eq!(usage_hit(b"{\"usage\": null,\"usage\":{}}", 0), Some(15));
        assert_eq!(usage_hit(b"{\"usage\":nullx}", 0), None);
        assert_eq!(usage_hit(b"{\"x\":\"usage\"}", 0), Some(5));
    }

    /// A long stream cut into writes of many lines each (as the forward engine hands them
    /// over), at sizes from a fixed pseudo-random sequence: the counts are the last ones the
    /// stream reports, whichever write carries them and wherever a line is cut.
    #[test]
    fn counts_are_found_in_writes_of_many_lines() {
        let mut nd = String::new();
        let mut sse = String::new();
        for i in 0..400 {
            if i == 150 {
                nd.push_str("{\"done\":false,\"prompt_eval_count\":1,\"eval_count\":2}\n");
                sse.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n");
            }
            // Every line has `_` and `g` that are not count keys.
            nd.push_str(&format!(
                "{{\"model\":\"m\",\"created_at\":\"t\",\"response\":\"tok {i} g_\",\"done\":false}}\n"
            ));
            sse.push_str(&format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"delta\":{{\"content\":\"usage_{i}\"}},\"finish_reason\":null}}]}}\n\n"
            ));
        }
        nd.push_str("{\"done\":true,\"prompt_eval_count\":7,\"eval_count\":9}\n");
        sse.push_str(USAGE_EVENT);
        sse.push_str("data: [DONE]\n\n");
        let mut seed = 0x9e37_79b9_u32;
        // Cuts `input` into writes of 1 to 4,000 bytes (xorshift) and relays them.
        let mut relay = |format, strip, input: &str| {
            let mut s = Scanner::new(format, strip);
            let mut out = Vec::new();
            let mut rest = input.as_bytes();
            while !rest.is_empty() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let n = (seed as usize % 4000 + 1).min(rest.len());
                out.extend_from_slice(&s.relay(Bytes::copy_from_slice(&rest[..n])));
                rest = &rest[n..];
            }
            out.extend_from_slice(&s.finish());
            (String::from_utf8(out).unwrap(), s.counts())
        };
        let last = |prompt, completion| Counts { prompt, completion };
        // Stripping: both usage-only events go, every other byte stays.
        let stripped = sse.replace(USAGE_EVENT, "").replace(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "",
        );
        for round in 0..50 {
            assert_eq!(
                relay(Format::Ndjson, false, &nd),
                (nd.clone(), last(7, 9)),
                "{round}"
            );
            assert_eq!(
                relay(Format::Sse, false, &sse),
                (sse.clone(), last(11, 22)),
                "{round}"
            );
            assert_eq!(
                relay(Format::Sse, true, &sse),
                (stripped.clone(), last(11, 22)),
                "{round}"
            );
        }
    }

    #[test]
    fn overlong_lines_are_skipped_and_bounded() {
        let long = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":1}},\"pad\":\"{}\"}}\n\n",
            "y".repeat(MAX_LINE + 100_000)
        );
        let input = format!("{long}{USAGE_EVENT}");
        let mut s = Scanner::new(Format::Sse, false);
        for c in input.as_bytes().chunks(64 * 1024) {
            s.relay(Bytes::copy_from_slice(c));
            assert!(s.buf.len() <= MAX_LINE);
        }
        s.finish();
        assert_eq!(
            s.counts(),
            Counts {
                prompt: 11,
                completion: 22
            }
        );
        let (out, _) = run(Format::Sse, true, &input, 64 * 1024);
        assert_eq!(out.len(), input.len(), "gave up stripping, nothing lost");
    }
}
