//! Cost of the JSON guard on the forwarding path, against the two alternatives for
//! ambiguous bodies: the guard scan (refuse ambiguity, forward the client's bytes) versus
//! parsing and re-serialising every body (forward what ragway parsed).
//!
//! `cargo bench --bench json_guard` prints nanoseconds per body for a short chat request
//! and a 40-turn conversation. Release build; single thread.

use std::hint::black_box;
use std::time::Instant;

use serde_json::{Map, Value, json};

fn time(label: &str, body: &[u8], rounds: u32, f: impl Fn(&[u8])) {
    for _ in 0..rounds / 10 {
        f(body);
    }
    let t = Instant::now();
    for _ in 0..rounds {
        f(black_box(body));
    }
    let ns = t.elapsed().as_nanos() / u128::from(rounds);
    println!("{label:<44} {:>7} B {ns:>9} ns", body.len());
}

fn main() {
    let short = serde_json::to_vec(&json!({"model": "llama3.2:latest", "stream": true,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}]}))
    .unwrap();
    let turns: Vec<Value> = (0..40)
        .map(|i| {
            json!({"role": if i % 2 == 0 {"user"} else {"assistant"},
            "content": "A sentence of ordinary chat text that goes on for a while. ".repeat(8)})
        })
        .collect();
    let long = serde_json::to_vec(&json!({"model": "llama3.2:latest", "stream": true,
        "temperature": 0.2, "messages": turns}))
    .unwrap();
    for (name, body) in [("short chat", &short), ("40-turn conversation", &long)] {
        println!("-- {name}");
        time(
            "guard scan (ragway::http::json::check)",
            body,
            20_000,
            |b| {
                ragway::http::json::check(b, 100_000).unwrap();
            },
        );
        time(
            "parse into a Map (needed to route by model)",
            body,
            20_000,
            |b| {
                black_box(serde_json::from_slice::<Map<String, Value>>(b).unwrap());
            },
        );
        time(
            "parse + re-serialise (the alternative)",
            body,
            20_000,
            |b| {
                let m: Map<String, Value> = serde_json::from_slice(b).unwrap();
                black_box(serde_json::to_vec(&m).unwrap());
            },
        );
    }
}
