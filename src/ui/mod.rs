//! The web page: plain HTML, CSS and JavaScript compiled into the binary, so it works with
//! no network and no build step. It is a client of the public API like any other (the
//! session in the `HttpOnly` `token` cookie, writes with the CSRF token of
//! [`crate::auth::csrf`]), so it adds no trust path of its own.

use bytes::Bytes;

use crate::error::ApiError;
use crate::http::Reply;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");
const ICON: &str = include_str!("icon.svg");

/// Only the page's own files, scripts and styles; no inline code, no framing, no other
/// origin. A script injected into the page (say through a file name) would not run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Every file served under `/ui/`: a fixed table, so no request path reaches the disk.
fn asset(tail: &str) -> Option<(&'static str, &'static str)> {
    Some(match tail {
        "" | "index.html" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "app.css" => (STYLE, "text/css; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return None,
    })
}

/// Answers `/`, `/ui/` and `/ui/{asset}`.
///
/// # Errors
/// A 404 for any other path under `/ui/`.
pub fn serve(tail: &str) -> Result<Reply, ApiError> {
    let Some((body, content_type)) = asset(tail) else {
        return Err(ApiError::not_found("Not Found"));
    };
    let reply = Reply::bytes(200, content_type, Bytes::from_static(body.as_bytes()))
        .with_header(
            http::header::CONTENT_SECURITY_POLICY,
            CONTENT_SECURITY_POLICY.to_string(),
        )
        .with_header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string())
        .with_header(http::header::X_FRAME_OPTIONS, "DENY".to_string())
        .with_header(http::header::REFERRER_POLICY, "no-referrer".to_string())
        // The page is small and changes with the binary: revalidating costs little and a
        // stale script never talks to a newer API.
        .with_header(http::header::CACHE_CONTROL, "no-cache".to_string());
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_embedded_files_are_served() {
        for ok in ["", "index.html", "app.js", "app.css", "icon.svg"] {
            assert!(asset(ok).is_some(), "{ok}");
        }
        for bad in [
            "../Cargo.toml",
            "..%2fCargo.toml",
            "app.js/x",
            "mod.rs",
            "APP.JS",
        ] {
            assert!(asset(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_page_has_no_inline_code_and_no_other_origin() {
        // The CSP forbids both; either would silently break the page.
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        for handler in ["onclick=", "onload=", "onsubmit=", "onchange=", "oninput="] {
            assert!(!INDEX.contains(handler), "{handler}");
        }
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }
}
