//! Attacks on the account paths moved onto the storage seams: emails that are not valid
//! storage keys (slashes, dot segments, control characters, the longest allowed) must reach
//! the shared sign-in counters as a clean refusal or success, never a storage error; and a
//! sign-in flood against one account ends in 429 with `Retry-After`, not a 500.

use serde_json::json;

use super::common::gateway::Setup;
use super::support;

/// Emails a counter key could not hold as they are (and control characters, which
/// PostgreSQL text cannot hold): a clear 400 each, never a storage error.
#[tokio::test]
async fn signin_with_emails_that_are_not_storage_keys() {
    let gw = Setup::new().start().await;
    let _admin = gw.admin().await;
    let long = format!("{}@x.io", "a/".repeat(123));
    assert!(long.len() <= 254);
    for email in [
        "../../etc/passwd@x.io",
        "a/b\\c@x.io",
        "tab\there@x.io",
        "nul\u{0}byte@x.io",
        "..",
        long.as_str(),
    ] {
        let r = gw
            .post(
                "/api/v1/auths/signin",
                None,
                json!({"email": email, "password": "guess"}),
            )
            .await;
        support::clear_error(r, 400).await;
    }
    support::alive(&gw).await;
}

/// An account whose email holds a slash signs up, is refused with a wrong password and
/// signs in with the right one: the counter key is derived, not the email itself.
#[tokio::test]
async fn slash_in_an_email_signs_in() {
    let gw = Setup::new().start().await;
    let _admin = gw.admin().await;
    gw.signup("we/ird@x.io").await;
    let wrong = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "we/ird@x.io", "password": "wrong"}),
        )
        .await;
    support::clear_error(wrong, 400).await;
    let right = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "We/Ird@x.io ", "password": "pw-123456"}),
        )
        .await;
    assert_eq!(right.status(), 200);
    support::alive(&gw).await;
}

/// Guessing one account's password: past the per-email limit every attempt is a 429 with
/// `Retry-After` (the window's end), even with the right password.
#[tokio::test]
async fn password_guessing_hits_the_shared_counter() {
    let gw = Setup::new()
        .toml("[auth]\nsignin-attempts = 3\nsignin-window = \"600s\"")
        .start()
        .await;
    gw.signup("victim@x.io").await;
    for i in 0..3 {
        let r = gw
            .post(
                "/api/v1/auths/signin",
                None,
                json!({"email": "victim@x.io", "password": format!("guess-{i}")}),
            )
            .await;
        support::clear_error(r, 400).await;
    }
    let r = gw
        .post(
            "/api/v1/auths/signin",
            None,
            json!({"email": "VICTIM@x.io", "password": "pw-123456"}),
        )
        .await;
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=600).contains(&wait), "{wait}");
    support::clear_error(r, 429).await;
    support::alive(&gw).await;
}
