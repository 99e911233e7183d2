//! Session tokens: HS256 JWTs with Open WebUI's claims `{id, exp?, jti, iat}`.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::store::now_secs;

/// Claims as Open WebUI writes them; `exp` is absent for tokens that never expire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    pub jti: String,
    #[serde(default)]
    pub iat: u64,
    /// The user's session epoch at issue time (ragway's own claim; absent = 0). A token
    /// from an older epoch was revoked by a role change or a password reset.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ep: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Keys derived once from the secret.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> JwtKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is optional (never-expiring tokens) but is checked whenever present.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.leeway = 0;
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Signs a token for `user_id`; returns it with its expiry (epoch seconds).
    pub fn issue(&self, user_id: &str, lifetime: Option<Duration>) -> (String, Option<u64>) {
        self.issue_in_epoch(user_id, 0, lifetime)
    }

    /// Signs a token for `user_id` under session epoch `ep`.
    pub fn issue_in_epoch(
        &self,
        user_id: &str,
        ep: u64,
        lifetime: Option<Duration>,
    ) -> (String, Option<u64>) {
        let iat = now_secs();
        let exp = lifetime.map(|d| iat + d.as_secs().max(1));
        let claims = Claims {
            id: user_id.to_string(),
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            ep,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail");
        (token, exp)
    }

    /// Verifies signature and expiry. Signature comparison is constant-time (HMAC verify).
    pub fn verify(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|d| d.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_expire_tamper() {
        let k = JwtKeys::new(b"secret");
        let (t, exp) = k.issue("u1", Some(Duration::from_secs(60)));
        let c = k.verify(&t).unwrap();
        assert_eq!(c.id, "u1");
        assert_eq!(c.exp, exp);

        let (never, exp) = k.issue("u1", None);
        assert_eq!(exp, None);
        assert!(k.verify(&never).unwrap().exp.is_none());

        assert!(JwtKeys::new(b"other").verify(&t).is_none());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                id: "u1".into(),
                exp: Some(now_secs() - 10),
                jti: "j".into(),
                iat: 0,
                ep: 0,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(k.verify(&expired).is_none());
        assert!(k.verify("garbage").is_none());
    }
}
