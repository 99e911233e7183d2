//! A guard pass over JSON request bodies before anything is built from them.
//!
//! Two dangers come with JSON that ragway reads and then forwards:
//! - **Ambiguity.** ragway checks fields (the `model` allow-list) but may forward the client's
//!   bytes as they came. Parsers disagree on duplicate keys (first or last wins), and Go's
//!   `encoding/json` (Ollama) matches keys case-insensitively, so `{"model":"a","MODEL":"b"}`
//!   would be checked as `a` and run as `b`. Refusing such bodies keeps the zero-copy
//!   passthrough (re-serialising every body would cost a full encode per request) while
//!   guaranteeing that what ragway checked is what the upstream reads.
//! - **Amplification.** A `serde_json::Value` costs far more than its text: every non-empty
//!   object allocates a B-tree leaf of ~600 bytes, so `[{"a":1},…]` in a 32 MiB body would
//!   become gigabytes. The pass counts values without allocating them and refuses bodies
//!   with more than a configured number.
//!
//! The pass allocates only the keys of the object being visited (to find duplicates), and
//! `serde_json`'s recursion limit (128) bounds nesting. The same pass notes what routing
//! needs of a top-level object ([`check_routed`]), so a body forwarded as it came is read
//! once.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::routing::{Field, Routing, Shape};
use crate::error::ApiError;

/// Default for [`check`]'s value budget on small local forms.
pub const DEFAULT_MAX_VALUES: usize = 100_000;

/// Refuses malformed, ambiguous or too complex JSON. Ambiguous means: a key that appears
/// twice in one object, or two top-level keys that differ only in letter case (Go's
/// case-insensitive matching would pick either).
///
/// # Errors
/// 400 for malformed or ambiguous JSON, 413 beyond `max_values` values.
pub fn check(body: &[u8], max_values: usize) -> Result<(), ApiError> {
    run(body, max_values, None).map(drop)
}

/// [`check`], also reading what routing needs of the body (see [`routing`]); `None` when the
/// body is valid JSON but not an object. `rewrite` tells the top-level keys whose presence
/// means the body must be rebuilt.
///
/// # Errors
/// As [`check`].
pub fn check_routed(
    body: &[u8],
    max_values: usize,
    rewrite: &dyn Fn(&str) -> bool,
) -> Result<Option<Routing>, ApiError> {
    run(body, max_values, Some(rewrite))
}

fn run(
    body: &[u8],
    max_values: usize,
    rewrite: Option<&dyn Fn(&str) -> bool>,
) -> Result<Option<Routing>, ApiError> {
    let mut state = State {
        values: 0,
        max_values,
        problem: None,
        rewrite,
        routing: None,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = Node {
        state: &mut state,
        top: true,
        keep: false,
    }
    .deserialize(&mut de)
    .and_then(|_| de.end());
    match (result, state.problem) {
        (Ok(()), _) => Ok(state.routing),
        (Err(_), Some(problem)) => Err(problem),
        (Err(e), None) => Err(ApiError::bad_request(format!("Invalid JSON body: {e}"))),
    }
}

struct State<'r> {
    values: usize,
    max_values: usize,
    /// Why the pass stopped, when it was not a syntax error.
    problem: Option<ApiError>,
    /// Set when the caller wants the routing fields: the keys that force a rewrite.
    rewrite: Option<&'r dyn Fn(&str) -> bool>,
    /// The routing fields of the top-level object, once it has been read.
    routing: Option<Routing>,
}

impl State<'_> {
    fn count<E: serde::de::Error>(&mut self) -> Result<(), E> {
        self.values += 1;
        if self.values > self.max_values {
            self.problem = Some(ApiError::new(
                413,
                format!(
                    "JSON body too complex: more than {} values (max-json-values)",
                    self.max_values
                ),
            ));
            return Err(E::custom("too many values"));
        }
        Ok(())
    }

    fn fail<E: serde::de::Error>(&mut self, detail: String) -> E {
        self.problem = Some(ApiError::bad_request(detail));
        E::custom("ambiguous")
    }
}

/// One value of the document; what routing needs of it is its [`Shape`].
struct Node<'s, 'r> {
    state: &'s mut State<'r>,
    /// The document itself (its keys are compared case-folded, and it may be routed).
    top: bool,
    /// Keep a string's text: the value of a routing field. Other strings are only counted,
    /// and their shape is [`Shape::Other`].
    keep: bool,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = Shape;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Shape, E> {
        self.state.count()?;
        Ok(if b { Shape::True } else { Shape::Other })
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Shape, E> {
        self.state.count().map(|()| Shape::Other)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Shape, E> {
        self.state.count().map(|()| Shape::Other)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Shape, E> {
        self.state.count().map(|()| Shape::Other)
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Shape, E> {
        self.state.count()?;
        Ok(if self.keep {
            Shape::Str(s.to_owned())
        } else {
            Shape::Other
        })
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Shape, E> {
        self.state.count().map(|()| Shape::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        self.state.count()?;
        while seq
            .next_element_seed(Node {
                state: &mut *self.state,
                top: false,
                keep: false,
            })?
            .is_some()
        {}
        Ok(Shape::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        self.state.count()?;
        let rewrite = self.state.rewrite.filter(|_| self.top);
        let mut routing = Routing::default();
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(Key)? {
            let Some(rewrite) = rewrite else {
                if let Some(problem) = keys.insert(key, self.top) {
                    return Err(self.state.fail(problem));
                }
                map.next_value_seed(Node {
                    state: &mut *self.state,
                    top: false,
                    keep: false,
                })?;
                continue;
            };
            routing.needs_rewrite |= rewrite(&key);
            let field = Field::of(&key);
            if let Some(problem) = keys.insert(key, true) {
                return Err(self.state.fail(problem));
            }
            let shape = map.next_value_seed(Node {
                state: &mut *self.state,
                top: false,
                keep: field.is_some(),
            })?;
            if let Some(field) = field {
                routing.set(field, shape);
            }
        }
        if rewrite.is_some() {
            self.state.routing = Some(routing);
        }
        Ok(Shape::Other)
    }
}

/// Objects of up to this many keys are checked against each key seen, without hashing;
/// past it the keys move into a hash set, so an object with very many keys (a hostile one)
/// still costs linear time.
const LINEAR_KEYS: usize = 16;

/// The keys seen in one object. Top-level keys are compared case-folded.
#[derive(Default)]
struct Keys<'de> {
    few: Vec<Cow<'de, str>>,
    many: Option<HashSet<Cow<'de, str>>>,
}

impl<'de> Keys<'de> {
    fn insert(&mut self, key: Cow<'de, str>, fold: bool) -> Option<String> {
        if fold {
            return self.add(folded(&key)).err().map(|_| {
                format!(
                    "Ambiguous JSON body: the top-level key {key:?} appears more than once \
                     (keys that differ only in letter case count as the same)"
                )
            });
        }
        self.add(key)
            .err()
            .map(|key| format!("Ambiguous JSON body: the key {key:?} appears twice in one object"))
    }

    /// Records `key`; gives it back when it was already there.
    fn add(&mut self, key: Cow<'de, str>) -> Result<(), Cow<'de, str>> {
        if let Some(set) = &mut self.many {
            return if set.contains(&key) {
                Err(key)
            } else {
                set.insert(key);
                Ok(())
            };
        }
        if self.few.contains(&key) {
            return Err(key);
        }
        if self.few.len() < LINEAR_KEYS {
            self.few.push(key);
        } else {
            let mut set: HashSet<_> = self.few.drain(..).collect();
            set.insert(key);
            self.many = Some(set);
        }
        Ok(())
    }
}

/// `key` case-folded; borrowed when folding cannot change it (ASCII without capitals, what
/// nearly every key is).
fn folded<'de>(key: &Cow<'de, str>) -> Cow<'de, str> {
    if key.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        key.clone()
    } else {
        Cow::Owned(fold_case(key))
    }
}

/// Case folding as Go's `strings.EqualFold` sees it (simple Unicode folding, including the
/// long s and the Kelvin sign, which fold to ASCII letters).
fn fold_case(key: &str) -> String {
    key.chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c == 'ſ' { 's' } else { c })
        .collect()
}

/// An object key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(body: &str) -> Option<u16> {
        check(body.as_bytes(), 1000).err().map(|e| e.status)
    }

    #[test]
    fn plain_bodies_pass() {
        assert_eq!(
            status(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            None
        );
        assert_eq!(status(r#"[1, "a", null, true, {"a": {"a": 1}}]"#), None);
        // Nested keys may differ in case (tool schemas do); only the top level folds.
        assert_eq!(status(r#"{"p":{"id":1,"ID":2}}"#), None);
        assert_eq!(status(r#"{"model":"a\u0041"}"#), None);
    }

    #[test]
    fn ambiguous_bodies_are_refused() {
        assert_eq!(status(r#"{"model":"a","model":"b"}"#), Some(400));
        assert_eq!(status(r#"{"model":"a","MODEL":"b"}"#), Some(400));
        assert_eq!(status(r#"{"model":"a","Model":"b"}"#), Some(400));
        assert_eq!(status(r#"{"stream":false,"\u017ftream":true}"#), Some(400));
        assert_eq!(status(r#"{"mod\u0065l":"a","model":"b"}"#), Some(400));
        assert_eq!(status(r#"{"o":{"k":1,"k":2}}"#), Some(400));
        let e = check(br#"{"model":"a","MODEL":"b"}"#, 10).unwrap_err();
        assert!(e.detail.contains("MODEL"), "{}", e.detail);
    }

    /// Objects of a few keys are checked without hashing, larger ones with a set: a duplicate
    /// is found either side of the switch and across it, at the top level (folded) and below.
    #[test]
    fn duplicates_are_found_in_objects_of_any_size() {
        let object = |n: usize, extra: &str, top: bool| {
            let keys: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
            let inner = format!("{{{}{extra}}}", keys.join(","));
            if top {
                inner
            } else {
                format!("{{\"o\":{inner}}}")
            }
        };
        for top in [true, false] {
            for n in [1, LINEAR_KEYS - 1, LINEAR_KEYS, LINEAR_KEYS + 1, 500] {
                assert_eq!(status(&object(n, "", top)), None, "{n} distinct keys");
                // The duplicate of the first key comes last: after the switch when n is large.
                assert_eq!(status(&object(n, ",\"k0\":0", top)), Some(400), "{n}");
                let last = format!(",\"k{}\":0", n - 1);
                assert_eq!(status(&object(n, &last, top)), Some(400), "{n}");
            }
        }
        // Folded at the top level only, on both sides of the switch.
        for n in [3, LINEAR_KEYS + 5] {
            assert_eq!(status(&object(n, ",\"K1\":0", true)), Some(400), "{n}");
            assert_eq!(status(&object(n, ",\"K1\":0", false)), None, "{n}");
            assert_eq!(
                status(&object(n, ",\"\\u212a1\":0", true)),
                Some(400),
                "{n}"
            );
        }
    }

    #[test]
    fn malformed_and_trailing_bodies_are_400() {
        for b in [
            "",
            "{",
            r#"{"a":1}x"#,
            "[1,]",
            "\u{0}",
            r#"{"a":1,}"#,
            "nul",
        ] {
            assert_eq!(status(b), Some(400), "{b:?}");
        }
        assert_eq!(check(b"\xff\xfe", 10).unwrap_err().status, 400);
    }

    #[test]
    fn value_budget_and_depth() {
        let many = format!("[{}1]", "1,".repeat(2000));
        assert_eq!(status(&many), Some(413));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(status(&deep), Some(400), "recursion limit");
        assert!(check(many.as_bytes(), 5000).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Arbitrary bytes never panic; whatever passes is valid JSON to serde_json.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if check(&bytes, 1000).is_ok() {
                proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok());
            }
        }
    }
}
