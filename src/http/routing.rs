//! What routing needs of an OpenAI chat body, read without building the body.
//!
//! Most chat requests are forwarded as their bytes came: only the model is needed to pick
//! the upstream. Parsing the whole body into a `serde_json::Value` tree for that allocates
//! every message, key and string; this pass reads the top-level keys in place, keeps the
//! model, and only notes the shape of the rest (its values are skipped without being
//! built). Whatever could need a rewrite is reported so the caller takes the full path.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A top-level value, as far as routing cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Shape {
    /// The key is absent.
    #[default]
    Missing,
    Null,
    Str(String),
    True,
    Array,
    /// Anything else: a number, `false`, an object.
    Other,
}

/// The top-level fields of a chat body that decide whether it can be forwarded untouched.
#[derive(Debug, Default)]
pub struct ChatRouting {
    pub model: Shape,
    pub messages: Shape,
    pub stream: Shape,
    /// A key the gateway acts on before forwarding was present (even as `null`): one that
    /// the `rewrite` test given to [`ChatRouting::parse`] accepts.
    pub needs_rewrite: bool,
}

impl ChatRouting {
    /// Reads `body`, which must already have passed the JSON guard (`http::json::check`:
    /// no duplicate keys, so each field is seen once). `rewrite` tells the top-level keys
    /// whose presence means the body must be rebuilt.
    ///
    /// # Errors
    /// The body is not a JSON object; the caller's full parse reports why.
    pub fn parse(
        body: &[u8],
        rewrite: impl Fn(&str) -> bool,
    ) -> Result<ChatRouting, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let routing = de.deserialize_map(RoutingVisitor { rewrite: &rewrite })?;
        de.end()?;
        Ok(routing)
    }
}

struct RoutingVisitor<'k, F> {
    rewrite: &'k F,
}

impl<'de, F: Fn(&str) -> bool> Visitor<'de> for RoutingVisitor<'_, F> {
    type Value = ChatRouting;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatRouting, A::Error> {
        let mut out = ChatRouting::default();
        while let Some(key) = map.next_key_seed(KeySeed {
            rewrite: self.rewrite,
        })? {
            let slot = match key {
                Key::Model => &mut out.model,
                Key::Messages => &mut out.messages,
                Key::Stream => &mut out.stream,
                Key::Rewrite => {
                    out.needs_rewrite = true;
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = map.next_value()?;
        }
        Ok(out)
    }
}

enum Key {
    Model,
    Messages,
    Stream,
    Rewrite,
    Other,
}

/// Classifies a key where it lies in the body (an escaped key is unescaped into serde's
/// scratch buffer, never allocated).
struct KeySeed<'k, F> {
    rewrite: &'k F,
}

impl<'de, F: Fn(&str) -> bool> DeserializeSeed<'de> for KeySeed<'_, F> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<F: Fn(&str) -> bool> Visitor<'_> for KeySeed<'_, F> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
        Ok(match k {
            "model" => Key::Model,
            "messages" => Key::Messages,
            "stream" => Key::Stream,
            _ if (self.rewrite)(k) => Key::Rewrite,
            _ => Key::Other,
        })
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Shape, E> {
        Ok(Shape::Str(s.to_owned()))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Shape, E> {
        Ok(if b { Shape::True } else { Shape::Other })
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Shape::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Shape::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(k: &str) -> bool {
        ["chat_id", "params", "files"].contains(&k)
    }

    fn parse(body: &str) -> ChatRouting {
        ChatRouting::parse(body.as_bytes(), rewrite).expect("an object")
    }

    #[test]
    fn reads_the_routing_fields_and_skips_the_rest() {
        let r = parse(
            r#"{"messages":[{"role":"user","content":"hi \"there\""}],"temperature":0.2,
               "model":"llama3.2:latest","stream":false,"extra":{"a":[1,2,{"b":null}]}}"#,
        );
        assert_eq!(r.model, Shape::Str("llama3.2:latest".into()));
        assert_eq!(r.messages, Shape::Array);
        assert_eq!(r.stream, Shape::Other);
        assert!(!r.needs_rewrite);
    }

    #[test]
    fn every_shape_of_a_field_is_told_apart() {
        for (value, shape) in [
            ("null", Shape::Null),
            ("true", Shape::True),
            ("false", Shape::Other),
            ("1", Shape::Other),
            ("-1", Shape::Other),
            ("1.5", Shape::Other),
            ("{}", Shape::Other),
            ("[]", Shape::Array),
            (r#""""#, Shape::Str(String::new())),
            (r#""m\u00e9""#, Shape::Str("mé".into())),
        ] {
            assert_eq!(
                parse(&format!(r#"{{"model":{value}}}"#)).model,
                shape,
                "{value}"
            );
        }
        assert_eq!(parse("{}").model, Shape::Missing);
    }

    #[test]
    fn a_rewrite_key_is_noticed_even_as_null_or_escaped() {
        assert!(parse(r#"{"model":"m","chat_id":null}"#).needs_rewrite);
        assert!(parse(r#"{"model":"m","p\u0061rams":{}}"#).needs_rewrite);
        assert!(parse(r#"{"files":[],"model":"m"}"#).needs_rewrite);
        // An escaped routing key is the key itself, as the upstream's parser reads it.
        assert_eq!(parse(r#"{"mod\u0065l":"x"}"#).model, Shape::Str("x".into()));
        // Letter case matters to this pass (the guard refuses case variants side by side).
        assert!(!parse(r#"{"Files":[]}"#).needs_rewrite);
    }

    #[test]
    fn what_is_not_one_object_is_refused() {
        for body in [
            "",
            "[]",
            "1",
            r#""s""#,
            "{",
            r#"{"model":"m"} {}"#,
            r#"{"model":}"#,
        ] {
            assert!(
                ChatRouting::parse(body.as_bytes(), rewrite).is_err(),
                "{body:?}"
            );
        }
    }
}
