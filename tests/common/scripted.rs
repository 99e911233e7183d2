//! A scripted Ollama for stream tests: it lists one model, answers `/api/show` with a given
//! body, and answers every `/api/chat` with exactly the bytes of a script, optionally
//! holding the rest back until the test releases it (so a test can see what reached the
//! client before the upstream finished, without timing anything).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

type Body = BoxBody<Bytes, Infallible>;

/// One step of the `/api/chat` answer.
#[derive(Clone)]
pub enum Step {
    /// Send these bytes as one body frame.
    Send(Bytes),
    /// Wait until [`Scripted::release`] is called.
    Gate,
}

impl Step {
    /// One NDJSON line.
    pub fn line(v: &Value) -> Step {
        Step::Send(Bytes::from(format!("{v}\n")))
    }
    pub fn raw(b: &[u8]) -> Step {
        Step::Send(Bytes::copy_from_slice(b))
    }
}

struct State {
    model: String,
    show: Value,
    status: u16,
    script: Vec<Step>,
    gate: Semaphore,
    chats: Mutex<Vec<Value>>,
}

/// A running scripted Ollama; stops when dropped.
pub struct Scripted {
    pub url: String,
    state: Arc<State>,
    _shutdown: watch::Sender<()>,
}

impl Scripted {
    /// Serves `model`, `/api/show` → `show`, `/api/chat` → `status` and `script`.
    pub async fn start(model: &str, show: Value, status: u16, script: Vec<Step>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            model: model.to_string(),
            show,
            status,
            script,
            gate: Semaphore::new(0),
            chats: Mutex::new(Vec::new()),
        });
        let (tx, mut rx) = watch::channel(());
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let socket = tokio::select! {
                    _ = rx.changed() => return,
                    a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let _ = socket.set_nodelay(true);
                let st = st.clone();
                let mut stop = rx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(st.clone(), req));
                    let conn =
                        http1::Builder::new().serve_connection(TokioIo::new(socket), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
        Scripted {
            url,
            state,
            _shutdown: tx,
        }
    }

    /// Lets one waiting [`Step::Gate`] pass.
    pub fn release(&self) {
        self.state.gate.add_permits(1);
    }

    /// Bodies of the `/api/chat` requests received so far.
    pub fn chats(&self) -> Vec<Value> {
        self.state.chats.lock().unwrap().clone()
    }
}

fn json_reply(status: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = match path.as_str() {
        "/api/tags" => json_reply(
            200,
            &json!({"models": [{"name": st.model, "model": st.model, "size": 1, "digest": "d", "details": {}}]}),
        ),
        "/api/version" => json_reply(200, &json!({"version": "0.5.1"})),
        "/api/show" => json_reply(200, &st.show),
        "/api/chat" => {
            st.chats
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            let script = st.script.clone();
            let gate = st.clone();
            tokio::spawn(async move {
                for step in script {
                    match step {
                        Step::Send(b) => {
                            if tx.send(Ok(Frame::data(b))).await.is_err() {
                                return;
                            }
                        }
                        Step::Gate => {
                            tokio::select! {
                                p = gate.gate.acquire() => p.unwrap().forget(),
                                _ = tx.closed() => return,
                            }
                        }
                    }
                }
            });
            let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Response::builder()
                .status(st.status)
                .header("content-type", "application/x-ndjson")
                .body(StreamBody::new(frames).boxed())
                .unwrap()
        }
        _ => json_reply(404, &json!({"error": "not found"})),
    };
    Ok(reply)
}
