//! Basic authentication that stays cheap under attack and tells nothing.
//!
//! bcrypt is slow on purpose, so every check is a cost an attacker can make the exporter pay:
//! - credentials that passed are remembered for [`VERIFIED_FOR`] (keyed by a salted SHA-256 of
//!   user and password, never the password), so a scraper costs one bcrypt per interval;
//! - at most [`BCRYPT_SLOTS`] checks run at once, and a request that cannot get a slot within
//!   [`SLOT_WAIT`] is answered 503: a flood of wrong passwords never starves a known scraper;
//! - an unknown user is checked against a dummy hash of the configured hashes' cost, so the
//!   answer takes as long as for a known user with a wrong password.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use rand::RngExt;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// How long verified credentials are remembered.
pub const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// Most remembered credentials (only ones that passed are kept).
const VERIFIED_MAX: usize = 1024;
/// bcrypt checks that may run at once.
pub const BCRYPT_SLOTS: usize = 2;
/// How long a request waits for a bcrypt slot before it is turned away.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);

type CacheKey = [u8; 32];

struct Inner {
    users: BTreeMap<String, String>,
    /// A hash at the highest configured cost, checked for unknown users.
    dummy: String,
    salt: [u8; 16],
    verified: Mutex<HashMap<CacheKey, Instant>>,
    slots: Semaphore,
}

/// Users allowed in; empty means no authentication.
#[derive(Clone)]
pub struct BasicAuth(Option<Arc<Inner>>);

/// The cost of a bcrypt hash (`$2y$12$...` -> 12).
fn cost_of(hash: &str) -> Option<u32> {
    hash.split('$').nth(2)?.parse().ok()
}

impl BasicAuth {
    /// `users`: name -> bcrypt hash, as checked by the web config loader.
    pub fn new(users: BTreeMap<String, String>) -> Self {
        if users.is_empty() {
            return BasicAuth(None);
        }
        let cost = users
            .values()
            .filter_map(|h| cost_of(h))
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let mut rng = rand::rng();
        let secret: [u8; 16] = rng.random();
        let dummy = bcrypt::hash(secret, cost.clamp(4, 31))
            .expect("a cost between 4 and 31 hashes")
            .to_string();
        BasicAuth(Some(Arc::new(Inner {
            users,
            dummy,
            salt: rng.random(),
            verified: Mutex::new(HashMap::new()),
            slots: Semaphore::new(BCRYPT_SLOTS),
        })))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }
}

/// User and password of an `Authorization: Basic ...` header (the scheme in any case, as RFC
/// 7235 allows).
fn credentials(header: Option<&HeaderValue>) -> Option<(String, String)> {
    let value = header?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let (user, password) = String::from_utf8(decoded)
        .ok()?
        .split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))?;
    Some((user, password))
}

impl Inner {
    fn key(&self, user: &str, password: &str) -> CacheKey {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn remembered(&self, key: &CacheKey) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(key)
            .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
    }

    fn remember(&self, key: CacheKey) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.retain(|_, at| at.elapsed() < VERIFIED_FOR);
        if verified.len() >= VERIFIED_MAX
            && let Some(oldest) = verified.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
        {
            verified.remove(&oldest);
        }
        verified.insert(key, Instant::now());
    }

    /// The bcrypt check, against the user's hash or the dummy.
    fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &self.dummy);
                false
            }
        }
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"newapi-exporter\"")],
        "Unauthorized\n",
    )
        .into_response()
}

/// Middleware: every route needs valid credentials when users are configured.
pub async fn require_auth(State(auth): State<BasicAuth>, req: Request, next: Next) -> Response {
    let Some(inner) = auth.0 else {
        return next.run(req).await;
    };
    let Some((user, password)) = credentials(req.headers().get(header::AUTHORIZATION)) else {
        return unauthorized();
    };
    let key = inner.key(&user, &password);
    if inner.remembered(&key) {
        return next.run(req).await;
    }
    let Ok(Ok(slot)) = tokio::time::timeout(SLOT_WAIT, inner.slots.acquire()).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many authentication attempts at once\n",
        )
            .into_response();
    };
    // bcrypt is deliberately slow: keep it off the async workers.
    let check = inner.clone();
    let ok = tokio::task::spawn_blocking(move || check.verify(&user, &password))
        .await
        .unwrap_or(false);
    drop(slot);
    if ok {
        inner.remember(key);
        next.run(req).await
    } else {
        unauthorized()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_matched_in_any_case_and_credentials_split_at_the_first_colon() {
        let b = base64::engine::general_purpose::STANDARD.encode("prom:pa:ss");
        for scheme in ["Basic", "basic", "BASIC"] {
            let h = HeaderValue::from_str(&format!("{scheme} {b}")).unwrap();
            assert_eq!(
                credentials(Some(&h)),
                Some(("prom".to_string(), "pa:ss".to_string()))
            );
        }
        let bearer = HeaderValue::from_str(&format!("Bearer {b}")).unwrap();
        assert_eq!(credentials(Some(&bearer)), None);
        assert_eq!(credentials(None), None);
    }

    #[test]
    fn the_dummy_hash_has_the_configured_cost() {
        let users = BTreeMap::from([("a".to_string(), bcrypt::hash("x", 6).unwrap())]);
        let auth = BasicAuth::new(users);
        assert_eq!(cost_of(&auth.0.unwrap().dummy), Some(6));
        assert_eq!(cost_of("$2y$12$abc"), Some(12));
    }

    #[test]
    fn remembered_credentials_are_keyed_by_user_and_password() {
        let users = BTreeMap::from([("a".to_string(), bcrypt::hash("x", 4).unwrap())]);
        let inner = BasicAuth::new(users).0.unwrap();
        let key = inner.key("a", "x");
        assert!(!inner.remembered(&key));
        inner.remember(key);
        assert!(inner.remembered(&inner.key("a", "x")));
        assert!(!inner.remembered(&inner.key("a", "y")));
        assert!(!inner.remembered(&inner.key("ax", "")));
    }
}
