//! Ollama's native `/api/chat` behind the OpenAI chat API, for RAG requests that need a
//! larger context window than the model runs with.
//!
//! Why: Ollama's `/v1/chat/completions` builds its options from `stop`, `max_tokens`,
//! `temperature`, `seed`, the penalties and `top_p` only (`openai/openai.go`,
//! `FromChatRequest`, in every release up to the current one), so no OpenAI-shaped request
//! can set `num_ctx`. Such requests go to `/api/chat` with `options.num_ctx`, and the answer
//! is turned back into what `/v1` would have sent: each NDJSON line becomes one SSE
//! `chat.completion.chunk` event as soon as it arrives (nothing is buffered beyond a partial
//! line), a whole answer becomes a `chat.completion`. The shapes follow Ollama's own
//! `ToChunk`/`ToChatCompletion`, so a client cannot tell the two routes apart.

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::ErrorType;
use pingora::http::ResponseHeader;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::http::Session;
pub use crate::request::Convert;
use crate::request::{RequestCtx, SourcesReply};

/// Longest NDJSON line accepted from the upstream: one line is one token or one tool call,
/// so more means a broken or hostile upstream, and it must not grow a buffer without end.
pub const MAX_LINE: usize = 1024 * 1024;
/// Largest whole (non-streamed) answer, as in the forward engine.
const MAX_ANSWER: usize = 32 * 1024 * 1024;
/// Largest error body read from a failing upstream.
const MAX_ERROR_BODY: usize = 64 * 1024;

fn text_parts(content: &Value) -> Result<Vec<Value>, ApiError> {
    let invalid = || ApiError::bad_request("invalid message format");
    let mut out = Vec::new();
    let Value::Array(parts) = content else {
        return Err(invalid());
    };
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => {
                let t = p.get("text").and_then(Value::as_str).ok_or_else(invalid)?;
                out.push(json!({ "content": t }));
            }
            Some("image_url") => {
                let url = p
                    .get("image_url")
                    .and_then(|u| u.get("url").or(Some(u)))
                    .and_then(Value::as_str)
                    .ok_or_else(invalid)?;
                // As Ollama's /v1: base64 data URLs of common image types only.
                let data = [
                    "data:;base64,",
                    "data:image/jpeg;base64,",
                    "data:image/jpg;base64,",
                    "data:image/png;base64,",
                    "data:image/webp;base64,",
                ]
                .iter()
                .find_map(|p| url.strip_prefix(p))
                .ok_or_else(|| ApiError::bad_request("invalid image input"))?;
                out.push(json!({ "images": [data] }));
            }
            _ => return Err(invalid()),
        }
    }
    Ok(out)
}

/// OpenAI `tool_calls` (arguments as a JSON string) → Ollama's (arguments as an object).
fn tool_calls_in(calls: &Value) -> Result<Value, ApiError> {
    let Value::Array(calls) = calls else {
        return Ok(Value::Null);
    };
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let f = c.get("function").unwrap_or(&Value::Null);
        let args: Value = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|_| ApiError::bad_request("invalid tool call arguments"))?,
            Some(v) => v.clone(),
            None => json!({}),
        };
        out.push(json!({"function": {"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": args}}));
    }
    Ok(Value::Array(out))
}

/// The `/api/chat` body for an OpenAI chat `body`, with `num_ctx`, mapping the options the
/// way Ollama's `/v1` does (including its `temperature`/`top_p` defaults of 1.0, so the
/// model samples the same way on both routes).
pub fn native_body(
    body: &Map<String, Value>,
    num_ctx: u32,
) -> Result<Map<String, Value>, ApiError> {
    let mut messages = Vec::new();
    let empty = Vec::new();
    let list = body
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for m in list {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let mut base = Map::new();
        base.insert("role".into(), json!(role));
        if role == "tool"
            && let Some(name) = m.get("name").and_then(Value::as_str)
        {
            base.insert("tool_name".into(), json!(name));
        }
        if let Some(r) = m.get("reasoning").and_then(Value::as_str) {
            base.insert("thinking".into(), json!(r));
        }
        let calls = tool_calls_in(m.get("tool_calls").unwrap_or(&Value::Null))?;
        match m.get("content") {
            Some(Value::String(s)) => {
                base.insert("content".into(), json!(s));
                if !calls.is_null() {
                    base.insert("tool_calls".into(), calls);
                }
                messages.push(Value::Object(base));
            }
            Some(c @ Value::Array(_)) => {
                let parts = text_parts(c)?;
                let n = parts.len();
                for (i, part) in parts.into_iter().enumerate() {
                    let mut msg = base.clone();
                    if let Value::Object(p) = part {
                        msg.extend(p);
                    }
                    if i + 1 == n && !calls.is_null() {
                        msg.insert("tool_calls".into(), calls.clone());
                    }
                    messages.push(Value::Object(msg));
                }
            }
            _ if !calls.is_null() => {
                base.insert("tool_calls".into(), calls);
                messages.push(Value::Object(base));
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid message content: a string or a list of parts",
                ));
            }
        }
    }
    let mut options = Map::new();
    options.insert("num_ctx".into(), json!(num_ctx));
    match body.get("stop") {
        Some(Value::String(s)) => {
            options.insert("stop".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            let stops: Vec<&Value> = a.iter().filter(|s| s.is_string()).collect();
            options.insert("stop".into(), json!(stops));
        }
        _ => {}
    }
    if let Some(n) = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .filter(|v| !v.is_null())
    {
        options.insert("num_predict".into(), n.clone());
    }
    for (key, default) in [("temperature", Some(1.0)), ("top_p", Some(1.0))] {
        match body.get(key).filter(|v| !v.is_null()) {
            Some(v) => options.insert(key.into(), v.clone()),
            None => options.insert(key.into(), json!(default)),
        };
    }
    // Ollama-only sampling options that Open WebUI's params put at the top level.
    for key in [
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "top_k",
        "min_p",
        "repeat_penalty",
        "repeat_last_n",
        "num_keep",
    ] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            options.insert(key.into(), v.clone());
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        body.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    out.insert(
        "stream".into(),
        json!(body.get("stream").and_then(Value::as_bool).unwrap_or(false)),
    );
    out.insert("options".into(), Value::Object(options));
    if let Some(rf) = body.get("response_format") {
        match rf.get("type").and_then(Value::as_str).map(str::trim) {
            Some("json_object") => {
                out.insert("format".into(), json!("json"));
            }
            Some("json_schema") => {
                if let Some(s) = rf.pointer("/json_schema/schema") {
                    out.insert("format".into(), s.clone());
                }
            }
            _ => {}
        }
    }
    if let Some(t) = body.get("tools").filter(|v| !v.is_null()) {
        out.insert("tools".into(), t.clone());
    }
    let effort = body
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .or_else(|| body.get("reasoning_effort"))
        .and_then(Value::as_str);
    match effort {
        None | Some("") => {}
        Some("none") => {
            out.insert("think".into(), json!(false));
        }
        Some(e @ ("high" | "medium" | "low")) => {
            out.insert("think".into(), json!(e));
        }
        Some(e) => {
            return Err(ApiError::bad_request(format!(
                "invalid reasoning value: '{e}' (must be \"high\", \"medium\", \"low\", or \"none\")"
            )));
        }
    }
    if let Some(k) = body.get("keep_alive") {
        out.insert("keep_alive".into(), k.clone());
    }
    Ok(out)
}

/// Ollama's tool calls → OpenAI's (arguments as a JSON string, a `type`, an `index`).
fn tool_calls_out(calls: Option<&Value>) -> Vec<Value> {
    let Some(Value::Array(calls)) = calls else {
        return Vec::new();
    };
    calls
        .iter()
        .map(|c| {
            let f = c.get("function").unwrap_or(&Value::Null);
            json!({
                "id": c.get("id").cloned().unwrap_or(json!("")),
                "index": f.get("index").cloned().unwrap_or(json!(0)),
                "type": "function",
                "function": {
                    "name": f.get("name").cloned().unwrap_or(json!("")),
                    "arguments": f.get("arguments").map_or_else(|| "{}".into(), Value::to_string),
                },
            })
        })
        .collect()
}

/// The OpenAI message (or delta) of one Ollama response.
fn message_out(r: &Value, role: &str) -> Value {
    let msg = r.get("message").unwrap_or(&Value::Null);
    let mut m = json!({
        "role": role,
        "content": msg.get("content").and_then(Value::as_str).unwrap_or(""),
    });
    if let Some(t) = msg
        .get("thinking")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        m["reasoning"] = json!(t);
    }
    let calls = tool_calls_out(msg.get("tool_calls"));
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    m
}

fn usage(r: &Value) -> Value {
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "prompt_tokens": n("prompt_eval_count"),
        "completion_tokens": n("eval_count"),
        "total_tokens": n("prompt_eval_count") + n("eval_count"),
    })
}

fn done_reason(r: &Value) -> Option<String> {
    r.get("done_reason")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// Seconds since the epoch of an RFC 3339 time (`2024-01-01T00:00:00.5-07:00`), as Ollama's
/// `created_at`; 0 when it does not parse.
fn unix_seconds(t: &str) -> i64 {
    fn num(s: &str) -> Option<i64> {
        s.parse().ok()
    }
    let parse = || -> Option<i64> {
        let (date, rest) = t.split_once(['T', 't', ' '])?;
        let mut d = date.splitn(3, '-');
        let (y, mo, da) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
        let hms = rest.get(..8)?;
        let mut h = hms.splitn(3, ':');
        let (hh, mm, ss) = (num(h.next()?)?, num(h.next()?)?, num(h.next()?)?);
        let zone = rest[8..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
        let offset = match zone {
            "" | "Z" | "z" => 0,
            z => {
                let sign = if z.starts_with('-') { -1 } else { 1 };
                let (zh, zm) = z.get(1..)?.split_once(':')?;
                sign * (num(zh)? * 3600 + num(zm)? * 60)
            }
        };
        // Days from the civil date (Howard Hinnant's algorithm).
        let y = if mo <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(days * 86_400 + hh * 3600 + mm * 60 + ss - offset)
    };
    parse().unwrap_or(0)
}

/// A whole `/api/chat` answer as an OpenAI `chat.completion` (Ollama's `ToChatCompletion`).
pub fn chat_completion(id: &str, r: &Value) -> Value {
    let msg = message_out(
        r,
        r.pointer("/message/role")
            .and_then(Value::as_str)
            .unwrap_or("assistant"),
    );
    let reason = if msg.get("tool_calls").is_some() {
        Some("tool_calls".to_string())
    } else {
        done_reason(r)
    };
    json!({
        "id": id,
        "object": "chat.completion",
        "created": r.get("created_at").and_then(Value::as_str).map_or(0, unix_seconds),
        "model": r.get("model").cloned().unwrap_or(json!("")),
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": msg, "finish_reason": reason}],
        "usage": usage(r),
    })
}

/// What went wrong with the upstream's NDJSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A line that is not a JSON object, or over [`MAX_LINE`].
    Malformed(String),
    /// An `{"error": ...}` line: the upstream failed mid-answer.
    Upstream(String),
    /// The stream ended before its `done` line.
    Truncated,
}

impl StreamError {
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            StreamError::Malformed(why) => format!("Upstream sent an invalid stream line: {why}"),
            StreamError::Upstream(m) => format!("Upstream error: {m}"),
            StreamError::Truncated => "Upstream stream ended before the answer was complete".into(),
        }
    }

    /// The SSE event carrying this error, as OpenAI streams report errors.
    #[must_use]
    pub fn event(&self) -> Bytes {
        let v = json!({"error": {"message": self.message(), "type": "upstream_error", "param": null, "code": null}});
        Bytes::from(format!("data: {v}\n\n"))
    }
}

/// NDJSON → SSE, one line at a time (Ollama's `ChatWriter` for streams).
pub struct SseConverter {
    id: String,
    include_usage: bool,
    partial: BytesMut,
    tool_call_sent: bool,
    done: bool,
}

impl SseConverter {
    #[must_use]
    pub fn new(id: String, include_usage: bool) -> SseConverter {
        SseConverter {
            id,
            include_usage,
            partial: BytesMut::new(),
            tool_call_sent: false,
            done: false,
        }
    }

    /// Converts every complete line in `bytes` (plus what was left of the previous call);
    /// keeps an incomplete last line for the next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Bytes, StreamError> {
        let mut out = BytesMut::new();
        self.feed_into(bytes, &mut out)?;
        Ok(out.freeze())
    }

    /// [`Self::feed`] into `out`: on an error, `out` holds the events of the lines before
    /// the broken one (the client gets those tokens, then the error).
    pub fn feed_into(&mut self, bytes: &[u8], out: &mut BytesMut) -> Result<(), StreamError> {
        let mut rest = bytes;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.partial.len() + line.len() > MAX_LINE {
                return Err(StreamError::Malformed(format!(
                    "a line over {} KiB",
                    MAX_LINE / 1024
                )));
            }
            if self.partial.is_empty() {
                self.line(line, out)?;
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                self.line(&whole, out)?;
            }
        }
        if self.partial.len() + rest.len() > MAX_LINE {
            return Err(StreamError::Malformed(format!(
                "a line over {} KiB",
                MAX_LINE / 1024
            )));
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// The end of the upstream body: a last line without a newline, then the check that
    /// the answer was complete.
    pub fn finish(&mut self) -> Result<Bytes, StreamError> {
        let mut out = BytesMut::new();
        self.finish_into(&mut out)?;
        Ok(out.freeze())
    }

    /// [`Self::finish`] into `out`.
    pub fn finish_into(&mut self, out: &mut BytesMut) -> Result<(), StreamError> {
        if !self.partial.is_empty() {
            let whole = std::mem::take(&mut self.partial);
            self.line(&whole, out)?;
        }
        if self.done {
            Ok(())
        } else {
            Err(StreamError::Truncated)
        }
    }

    fn line(&mut self, line: &[u8], out: &mut BytesMut) -> Result<(), StreamError> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        if self.done {
            return Err(StreamError::Malformed("data after the final line".into()));
        }
        let r: Value = serde_json::from_slice(line)
            .map_err(|e| StreamError::Malformed(format!("not JSON ({e})")))?;
        if !r.is_object() {
            return Err(StreamError::Malformed("not a JSON object".into()));
        }
        if let Some(e) = r.get("error") {
            let m = e.as_str().map_or_else(|| e.to_string(), String::from);
            return Err(StreamError::Upstream(m));
        }
        let delta = message_out(&r, "assistant");
        let has_calls = delta.get("tool_calls").is_some();
        let reason = done_reason(&r).map(|d| {
            if self.tool_call_sent || has_calls {
                "tool_calls".to_string()
            } else {
                d
            }
        });
        if has_calls {
            self.tool_call_sent = true;
        }
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": crate::store::now_secs(),
            "model": r.get("model").cloned().unwrap_or(json!("")),
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        });
        out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
        if r.get("done").and_then(Value::as_bool) == Some(true) {
            self.done = true;
            if self.include_usage {
                chunk["choices"] = json!([]);
                chunk["usage"] = usage(&r);
                out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        Ok(())
    }
}

/// The message of an Ollama error body (`{"error": "..."}`), else the body's text.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("error") {
            Some(Value::String(s)) => s.clone(),
            Some(e) => e
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), String::from),
            None => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body).chars().take(500).collect(),
    }
}

async fn send_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: ApiError,
) -> pingora::Result<bool> {
    ctx.status = Some(err.status);
    crate::http::send(session, err.into()).await?;
    Ok(false)
}

/// Relays the `/api/chat` answer in `upstream` (its header already read) to the client in
/// OpenAI's format. Returns whether the upstream connection may be reused.
pub async fn relay(
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut super::answer::Answer,
    convert: &Convert,
    sources: Option<&SourcesReply>,
    headers: &[(http::HeaderName, String)],
) -> pingora::Result<bool> {
    use futures_util::FutureExt;

    let status = upstream.head.status;
    if !status.is_success() {
        let mut body = BytesMut::new();
        while upstream.read_into(&mut body).await? {
            if body.len() > MAX_ERROR_BODY {
                body.truncate(MAX_ERROR_BODY);
                break;
            }
        }
        let err = ApiError::new(
            status.as_u16(),
            format!("Upstream error: {}", error_message(&body)),
        );
        return send_error(session, ctx, err).await;
    }
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if !convert.stream {
        let mut body = BytesMut::new();
        while upstream.read_into(&mut body).await? {
            if body.len() > MAX_ANSWER {
                let err = ApiError::new(
                    502,
                    format!(
                        "Upstream answer too large: over {} MiB",
                        MAX_ANSWER / (1024 * 1024)
                    ),
                );
                return send_error(session, ctx, err).await;
            }
        }
        let Ok(r @ Value::Object(_)) = serde_json::from_slice::<Value>(&body) else {
            let err = ApiError::new(502, "Upstream sent an answer that is not a JSON object");
            return send_error(session, ctx, err).await;
        };
        if let Some(e) = r.get("error") {
            let m = e.as_str().map_or_else(|| e.to_string(), String::from);
            return send_error(
                session,
                ctx,
                ApiError::new(502, format!("Upstream error: {m}")),
            )
            .await;
        }
        let mut answer = chat_completion(&id, &r);
        if let Some(s) = sources {
            answer["sources"] = s.json.clone();
        }
        let bytes = Bytes::from(serde_json::to_vec(&answer).expect("json"));
        ctx.streamed_bytes += bytes.len() as u64;
        ctx.status = Some(200);
        let mut reply = crate::http::Reply::bytes(200, "application/json", bytes);
        for (n, v) in headers {
            reply = reply.with_header(n.clone(), v.clone());
        }
        crate::http::send(session, reply).await?;
        return Ok(true);
    }

    let mut conv = SseConverter::new(id, convert.include_usage);
    // The response header waits for the first converted event, so an upstream that fails
    // before answering anything gets a proper error status instead of a broken stream.
    let mut out = Converted {
        conv: &mut conv,
        started: false,
        sources,
        headers,
    };
    // Lines already in hand together are converted and written together, as the forward
    // engine does for streams it passes through: a burst of tokens is one write.
    let mut batch = bytes::BytesMut::with_capacity(super::batch::BATCH_START);
    loop {
        let read = if let Some(r) = upstream.read_into(&mut batch).now_or_never() {
            r
        } else {
            if let Some(reusable) = out.send(session, ctx, &mut batch, false).await? {
                return Ok(reusable);
            }
            loop {
                tokio::select! {
                    biased;
                    r = upstream.read_into(&mut batch) => break r,
                    r = session.read_body_or_idle(true) => {
                        if r.is_err() {
                            tracing::info!("client disconnected mid-stream; dropping the upstream request");
                            return Err(pingora::Error::new(ErrorType::ConnectionClosed));
                        }
                    }
                }
            }
        };
        match read {
            Ok(true) => {
                if batch.len() >= super::batch::COALESCE_MAX
                    && let Some(reusable) = out.send(session, ctx, &mut batch, false).await?
                {
                    return Ok(reusable);
                }
            }
            Ok(false) => {
                let reusable = out.send(session, ctx, &mut batch, true).await?;
                return Ok(reusable.unwrap_or(false));
            }
            Err(e) => {
                // What arrived before the failure is the client's.
                if let Some(reusable) = out.send(session, ctx, &mut batch, false).await? {
                    return Ok(reusable);
                }
                if !out.started {
                    return send_error(session, ctx, crate::upstream::upstream_failure(&e)).await;
                }
                // Ending without the terminating chunk tells the client the body is
                // incomplete.
                return Err(e);
            }
        }
    }
}

/// The converted side of a relayed stream.
struct Converted<'a> {
    conv: &'a mut SseConverter,
    /// Whether the response header has been sent.
    started: bool,
    sources: Option<&'a SourcesReply>,
    headers: &'a [(http::HeaderName, String)],
}

impl Converted<'_> {
    /// Converts and sends the whole lines in `batch` (all of it, and the end, when `end`).
    /// `Some(reusable)`: the answer is over (ended, or broken and closed with an error
    /// event); `None`: it goes on.
    async fn send(
        &mut self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        batch: &mut bytes::BytesMut,
        end: bool,
    ) -> pingora::Result<Option<bool>> {
        let mut out = BytesMut::new();
        let mut result = Ok(());
        if !batch.is_empty() {
            result = self.conv.feed_into(batch, &mut out);
            batch.clear();
        }
        if end {
            result = result.and_then(|()| self.conv.finish_into(&mut out));
        }
        // What converted before a failure goes out first: those tokens are the client's.
        let out = out.freeze();
        if !out.is_empty() || (end && result.is_ok()) {
            if !self.started {
                start(session, ctx, self.sources, self.headers).await?;
                self.started = true;
            }
            if !out.is_empty() {
                ctx.streamed_bytes += out.len() as u64;
                session.write_response_body(out, false).await?;
            }
        }
        match result {
            Ok(()) => {
                if end {
                    session.finish_body().await?;
                    return Ok(Some(true));
                }
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "upstream NDJSON stream failed");
                if !self.started {
                    return send_error(session, ctx, ApiError::new(502, e.message()))
                        .await
                        .map(Some);
                }
                let event = e.event();
                ctx.streamed_bytes += event.len() as u64;
                session.write_response_body(event, false).await?;
                session.finish_body().await?;
                // The rest of a broken stream is not read: the connection is not reusable.
                Ok(Some(false))
            }
        }
    }
}

/// The SSE response header, then the sources event.
async fn start(
    session: &mut Session,
    ctx: &mut RequestCtx,
    sources: Option<&SourcesReply>,
    headers: &[(http::HeaderName, String)],
) -> pingora::Result<()> {
    ctx.status = Some(200);
    let mut resp = ResponseHeader::build_no_case(200, Some(4 + headers.len()))?;
    resp.insert_header(header::CONTENT_TYPE, "text/event-stream")?;
    resp.insert_header(header::CACHE_CONTROL, "no-cache")?;
    resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    for (n, v) in headers {
        resp.append_header(n.clone(), v.as_str())?;
    }
    session.write_response_header(Box::new(resp)).await?;
    if let Some(s) = sources {
        ctx.streamed_bytes += s.sse_event.len() as u64;
        session
            .write_response_body(s.sse_event.clone(), false)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(b: &[u8]) -> Vec<String> {
        String::from_utf8(b.to_vec())
            .unwrap()
            .split("\n\n")
            .filter(|s| !s.is_empty())
            .map(|s| s.strip_prefix("data: ").unwrap().to_string())
            .collect()
    }

    #[test]
    fn lines_become_events_as_they_complete() {
        let mut c = SseConverter::new("chatcmpl-x".into(), true);
        let l1 = br#"{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}"#;
        // Half a line: nothing yet.
        assert!(c.feed(&l1[..20]).unwrap().is_empty());
        let mut rest = l1[20..].to_vec();
        rest.push(b'\n');
        let out = c.feed(&rest).unwrap();
        let e = events(&out);
        assert_eq!(e.len(), 1);
        let v: Value = serde_json::from_str(&e[0]).unwrap();
        assert_eq!(
            v["choices"][0]["delta"],
            json!({"role": "assistant", "content": "Hel"})
        );
        assert_eq!(v["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["id"], "chatcmpl-x");
        let done = br#"{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":7,"eval_count":3}
"#;
        let e = events(&c.feed(done).unwrap());
        assert_eq!(e.len(), 3);
        let last: Value = serde_json::from_str(&e[0]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        let u: Value = serde_json::from_str(&e[1]).unwrap();
        assert_eq!(u["choices"], json!([]));
        assert_eq!(
            u["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
        assert_eq!(e[2], "[DONE]");
        assert!(c.finish().unwrap().is_empty());
    }

    #[test]
    fn broken_streams_are_errors() {
        let mut c = SseConverter::new("x".into(), false);
        assert!(matches!(
            c.feed(b"not json\n"),
            Err(StreamError::Malformed(_))
        ));
        let mut c = SseConverter::new("x".into(), false);
        assert!(matches!(c.feed(b"[1,2]\n"), Err(StreamError::Malformed(_))));
        let mut c = SseConverter::new("x".into(), false);
        assert_eq!(
            c.feed(b"{\"error\":\"model crashed\"}\n"),
            Err(StreamError::Upstream("model crashed".into()))
        );
        let mut c = SseConverter::new("x".into(), false);
        c.feed(b"{\"message\":{\"content\":\"a\"},\"done\":false}\n")
            .unwrap();
        assert_eq!(c.finish(), Err(StreamError::Truncated));
        // An endless line is refused once it passes the bound, not buffered.
        let mut c = SseConverter::new("x".into(), false);
        let block = vec![b'a'; 64 * 1024];
        let mut err = None;
        for _ in 0..(MAX_LINE / block.len() + 2) {
            if let Err(e) = c.feed(&block) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(StreamError::Malformed(_))));
        assert!(c.partial.len() <= MAX_LINE);
        // Lines before a broken one in the same read are converted all the same.
        let mut c = SseConverter::new("x".into(), false);
        let mut out = BytesMut::new();
        let fed = c.feed_into(
            b"{\"message\":{\"content\":\"Hel\"},\"done\":false}\n{\"done\": tru\n",
            &mut out,
        );
        assert!(matches!(fed, Err(StreamError::Malformed(_))));
        let events = events(&out);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].contains("\"Hel\""), "{events:?}");
    }

    #[test]
    fn request_options_follow_ollamas_v1() {
        let body = json!({
            "model": "m", "stream": true, "max_tokens": 100, "stop": "END", "seed": 3,
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            ],
            "response_format": {"type": "json_object"},
        });
        let n = native_body(body.as_object().unwrap(), 8192).unwrap();
        assert_eq!(
            n["options"],
            json!({"num_ctx": 8192, "num_predict": 100, "stop": ["END"], "temperature": 1.0, "top_p": 1.0, "seed": 3})
        );
        assert_eq!(
            n["messages"],
            json!([{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "user", "images": ["AAAA"]}])
        );
        assert_eq!(n["stream"], true);
        assert_eq!(n["format"], "json");
        let bad = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]});
        assert!(native_body(bad.as_object().unwrap(), 1).is_err());
    }

    #[test]
    fn whole_answers_and_times() {
        assert_eq!(unix_seconds("2024-01-01T00:00:00Z"), 1_704_067_200);
        assert_eq!(
            unix_seconds("2025-05-04T17:37:44.706015396-07:00"),
            1_746_405_464
        );
        assert_eq!(unix_seconds("garbage"), 0);
        let r = json!({"model": "m", "created_at": "2024-01-01T00:00:00Z", "message": {"role": "assistant", "content": "hi", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}, "done": true, "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 2});
        let c = chat_completion("id", &r);
        assert_eq!(c["created"], 1_704_067_200);
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(c["usage"]["total_tokens"], 3);
    }
}
