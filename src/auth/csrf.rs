//! Cross-site request forgery protection for browser sessions.
//!
//! A browser attaches the `token` cookie to any request it sends to the gateway, including
//! one a hostile page triggers (a form post, an image, `fetch` with `no-cors`). A bearer
//! token or an API key is never attached that way, so only writes authenticated by the
//! cookie need more proof that the gateway's own page sent them:
//!
//! - every state-changing request that carries an `Origin` (browsers send it on every
//!   cross-origin write) must come from the gateway's own origin, and one marked
//!   `Sec-Fetch-Site: cross-site` is refused whatever it carries;
//! - a state-changing request authenticated by the cookie must also carry
//!   `X-CSRF-Token` equal to a value derived from that cookie with a server secret
//!   (a signed double-submit token). The page reads it from the `csrf_token` cookie, which
//!   other sites can neither read nor set to a matching value without the secret.

use http::{HeaderMap, Method};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The request header the page sends the token in.
pub const HEADER: &str = "x-csrf-token";
/// The cookie the page reads the token from (not `HttpOnly`: the page must read it).
pub const COOKIE: &str = "csrf_token";

pub const CROSS_SITE: &str = "Cross-site request refused: the Origin does not match this server";
pub const MISSING: &str = "CSRF token missing: a request authenticated by the session cookie must send the X-CSRF-Token header (or use an Authorization header)";
pub const MISMATCH: &str = "CSRF token does not match the session cookie; sign in again";

/// Derives tokens; the key comes from the JWT secret, so tokens survive restarts exactly as
/// long as sessions do.
pub struct Csrf {
    key: [u8; 32],
}

impl Csrf {
    #[must_use]
    pub fn new(secret: &[u8]) -> Csrf {
        let mut h = Sha256::new();
        h.update(b"ragway csrf key\0");
        h.update(secret);
        Csrf {
            key: h.finalize().into(),
        }
    }

    /// The token bound to one session credential. The credential sits inside a signed JWT, so
    /// an attacker cannot choose it, and without the key cannot compute its token.
    #[must_use]
    pub fn token(&self, credential: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(b"\0");
        h.update(credential.as_bytes());
        hex::encode(h.finalize())
    }

    /// Checks a request. `cookie_credential` is the `token` cookie's value when that cookie
    /// is what authenticates the request (no `Authorization: Bearer`); `public` routes
    /// (sign-in, sign-up) are not authenticated by it and need only the origin check.
    ///
    /// # Errors
    /// A 403 for a cross-site write, or a cookie-authenticated write without the matching
    /// token.
    pub fn check(
        &self,
        method: &Method,
        headers: &HeaderMap,
        cookie_credential: Option<&str>,
        public: bool,
    ) -> Result<(), ApiError> {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return Ok(());
        }
        check_origin(headers)?;
        let Some(cred) = cookie_credential.filter(|_| !public) else {
            return Ok(());
        };
        let Some(sent) = headers.get(HEADER).and_then(|v| v.to_str().ok()) else {
            crate::metrics::auth_failure("csrf");
            return Err(ApiError::forbidden(MISSING));
        };
        let expected = self.token(cred);
        if bool::from(sent.trim().as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            crate::metrics::auth_failure("csrf");
            Err(ApiError::forbidden(MISMATCH))
        }
    }
}

/// Refuses a write a browser marks as coming from another site.
fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = || {
        crate::metrics::auth_failure("csrf");
        Err(ApiError::forbidden(CROSS_SITE))
    };
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return refuse();
    }
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        // Non-browser clients send no Origin; browsers always do on cross-origin writes.
        return Ok(());
    };
    let Some(origin_host) = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host)
    else {
        // `null` (sandboxed frames, file: pages) or garbage: not our page.
        return refuse();
    };
    // Behind a reverse proxy that rewrites Host, the public host is in X-Forwarded-Host; a
    // cross-site page cannot set that header on a request it forges.
    let ours = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|h| h.split(',').next().unwrap_or_default().trim())
            .is_some_and(|h| !h.is_empty() && h.eq_ignore_ascii_case(origin_host))
    };
    if ours("host") || ours("x-forwarded-host") {
        Ok(())
    } else {
        refuse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_pass_and_writes_need_the_bound_token() {
        let c = Csrf::new(b"secret");
        let t = c.token("jwt-a");
        let host = [("host", "gw:3000")];
        assert!(
            c.check(&Method::GET, &headers(&host), Some("jwt-a"), false)
                .is_ok()
        );
        let e = c
            .check(&Method::POST, &headers(&host), Some("jwt-a"), false)
            .unwrap_err();
        assert_eq!((e.status, e.detail.as_str()), (403, MISSING));
        let ok = headers(&[("host", "gw:3000"), (HEADER, &t)]);
        assert!(c.check(&Method::POST, &ok, Some("jwt-a"), false).is_ok());
        // The token of another session, or one made with another secret, does not fit.
        let other = headers(&[("host", "gw:3000"), (HEADER, &c.token("jwt-b"))]);
        assert_eq!(
            c.check(&Method::DELETE, &other, Some("jwt-a"), false)
                .unwrap_err()
                .detail,
            MISMATCH
        );
        let foreign = Csrf::new(b"other").token("jwt-a");
        let h = headers(&[("host", "gw:3000"), (HEADER, &foreign)]);
        assert!(c.check(&Method::POST, &h, Some("jwt-a"), false).is_err());
        // Bearer-authenticated and public writes need no token.
        assert!(c.check(&Method::POST, &headers(&host), None, false).is_ok());
        assert!(
            c.check(&Method::POST, &headers(&host), Some("jwt-a"), true)
                .is_ok()
        );
    }

    #[test]
    fn cross_origin_writes_are_refused_even_without_a_cookie() {
        let c = Csrf::new(b"secret");
        for h in [
            headers(&[("host", "gw:3000"), ("origin", "https://evil.example")]),
            headers(&[("host", "gw:3000"), ("origin", "null")]),
            headers(&[
                ("host", "gw:3000"),
                ("origin", "http://gw:3000.evil.example"),
            ]),
            headers(&[("host", "gw:3000"), ("sec-fetch-site", "cross-site")]),
        ] {
            let e = c.check(&Method::POST, &h, None, true).unwrap_err();
            assert_eq!(e.detail, CROSS_SITE, "{h:?}");
        }
        let same = headers(&[("host", "gw:3000"), ("origin", "http://gw:3000")]);
        assert!(c.check(&Method::POST, &same, None, true).is_ok());
        let proxied = headers(&[
            ("host", "127.0.0.1:3000"),
            ("x-forwarded-host", "ragway.example.com"),
            ("origin", "https://ragway.example.com"),
        ]);
        assert!(c.check(&Method::POST, &proxied, None, true).is_ok());
    }
}
