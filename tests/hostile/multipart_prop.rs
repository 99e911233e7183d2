//! Property test of the upload parser on the real wire: a valid multipart body, then cut,
//! spliced with random bytes, or with a random field inserted. Whatever arrives, the answer
//! is a 200 or a clear 4xx JSON, nothing is left half-stored, and the gateway still
//! answers. Bounded to a few dozen cases: each is a real HTTP request.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::common::gateway::Setup;
use super::common::upload::{BOUNDARY, Part, multipart};

/// A mutation of a valid upload body.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Splice(usize, Vec<u8>),
    ExtraField(String, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0usize..400).prop_map(Mutation::Truncate),
        (0usize..400, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(at, b)| Mutation::Splice(at, b)),
        (
            "[a-z\"\\\\;=\r\n ]{0,16}",
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(n, b)| Mutation::ExtraField(n, b)),
    ]
}

fn body(m: &Mutation) -> Vec<u8> {
    let text = b"Plain text that a file upload carries.\n".repeat(3);
    let meta = br#"{"note": "m"}"#;
    let mut parts = vec![
        Part {
            name: "file",
            filename: Some("a.txt"),
            content_type: Some("text/plain"),
            bytes: &text,
        },
        Part {
            name: "metadata",
            filename: None,
            content_type: None,
            bytes: meta,
        },
    ];
    let extra;
    if let Mutation::ExtraField(name, bytes) = m {
        extra = (name.clone(), bytes.clone());
        parts.insert(
            0,
            Part {
                name: &extra.0,
                filename: None,
                content_type: None,
                bytes: &extra.1,
            },
        );
    }
    let mut b = multipart(&parts);
    match m {
        Mutation::Truncate(at) => b.truncate((*at).min(b.len())),
        Mutation::Splice(at, bytes) => {
            let at = (*at).min(b.len());
            b.splice(at..at, bytes.iter().copied());
        }
        Mutation::ExtraField(..) => {}
    }
    b
}

#[test]
fn mutated_uploads_get_200_or_a_clear_4xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (gw, token) = rt.block_on(async {
        let gw = Setup::new().start().await;
        let token = gw.admin().await;
        (gw, token)
    });
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    runner
        .run(&mutation(), |m| {
            let b = body(&m);
            let (status, text) = rt.block_on(async {
                let r = gw
                    .req(reqwest::Method::POST, "/api/v1/files/", Some(&token))
                    .header(
                        "content-type",
                        format!("multipart/form-data; boundary={BOUNDARY}"),
                    )
                    .body(b)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            });
            prop_assert!(
                status == 200 || (400..500).contains(&status),
                "{m:?}: {status} {text}"
            );
            if status != 200 {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                prop_assert!(v["detail"].is_string() && v["error"]["message"] == v["detail"]);
            }
            let health = rt.block_on(async { gw.get("/health", None).await.status() });
            prop_assert_eq!(health, 200);
            Ok(())
        })
        .unwrap();
    // No temporary upload is left behind by the refused ones.
    let uploads = gw.dir.path().join("uploads");
    let leftovers = std::fs::read_dir(&uploads)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(
        leftovers,
        0,
        "temporary files left in {}",
        uploads.display()
    );
    drop(gw);
}
