//! What routing needs of a JSON request body, read without building the body.
//!
//! Most model requests are forwarded as their bytes came: only the model is needed to pick
//! the upstream. Parsing the whole body into a `serde_json::Value` tree for that allocates
//! every message, key and string; instead the JSON guard's one pass over the body
//! ([`super::json::check_routed`]) notes the top-level fields below in place and skips the
//! rest without building it. Whatever could need a rewrite is reported so the caller takes
//! the full path.

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

/// The top-level fields of a body that decide whether it can be forwarded untouched.
#[derive(Debug, Default)]
pub struct Routing {
    pub model: Shape,
    /// Ollama's older name for the model (`/api/show`, `/api/pull`).
    pub name: Shape,
    pub messages: Shape,
    pub stream: Shape,
    /// A key the gateway acts on before forwarding was present (even as `null`): one that
    /// the `rewrite` test given to the guard accepts.
    pub needs_rewrite: bool,
}

/// A routing field of [`Routing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Model,
    Name,
    Messages,
    Stream,
}

impl Field {
    /// Which routing field a top-level key is; `None` for the others. An escaped key is the
    /// key itself, as the upstream's parser reads it; letter case matters (the guard refuses
    /// case variants side by side, so a lone `Model` is simply not the model here).
    #[must_use]
    pub fn of(key: &str) -> Option<Field> {
        match key {
            "model" => Some(Field::Model),
            "name" => Some(Field::Name),
            "messages" => Some(Field::Messages),
            "stream" => Some(Field::Stream),
            _ => None,
        }
    }
}

impl Routing {
    pub fn set(&mut self, field: Field, shape: Shape) {
        let slot = match field {
            Field::Model => &mut self.model,
            Field::Name => &mut self.name,
            Field::Messages => &mut self.messages,
            Field::Stream => &mut self.stream,
        };
        *slot = shape;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::json::check_routed;

    fn rewrite(k: &str) -> bool {
        ["chat_id", "params", "files"].contains(&k)
    }

    fn parse(body: &str) -> Routing {
        check_routed(body.as_bytes(), 1000, &rewrite)
            .expect("valid JSON")
            .expect("an object")
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
        assert_eq!(r.name, Shape::Missing);
        assert!(!r.needs_rewrite);
        // Only the top level counts: a nested `model` is not the model.
        let r = parse(r#"{"options":{"model":"x","stream":true},"name":"n"}"#);
        assert_eq!(r.model, Shape::Missing);
        assert_eq!(r.stream, Shape::Missing);
        assert_eq!(r.name, Shape::Str("n".into()));
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
            (r#"{"a":[1]}"#, Shape::Other),
            ("[]", Shape::Array),
            (r#"[{"a":1}]"#, Shape::Array),
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
        assert_eq!(parse(r#"{"Model":"x"}"#).model, Shape::Missing);
    }

    #[test]
    fn what_is_not_one_object_has_no_routing() {
        for body in ["[]", "1", r#""s""#, "null", r#"[{"model":"m"}]"#] {
            assert!(
                check_routed(body.as_bytes(), 1000, &rewrite)
                    .expect("valid JSON")
                    .is_none(),
                "{body:?}"
            );
        }
        for body in ["", "{", r#"{"model":"m"} {}"#, r#"{"model":}"#] {
            assert_eq!(
                check_routed(body.as_bytes(), 1000, &rewrite)
                    .expect_err(body)
                    .status,
                400,
                "{body:?}"
            );
        }
    }
}
