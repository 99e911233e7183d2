//! JSON: validated, then pretty-printed with two-space indentation so that nested structure
//! reads line by line and splits well. Object keys keep their order in the file
//! (`serde_json::Value` would sort them, scattering related fields).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use super::ExtractError;

/// Parses `text` as one JSON value and pretty-prints it, refusing output beyond `max_bytes`:
/// indentation grows with depth, so deeply nested short values multiply in size.
pub(super) fn extract(text: &str, max_bytes: u64) -> Result<String, ExtractError> {
    let value: Json = serde_json::from_str(text)
        .map_err(|e| ExtractError::corrupt("json", format!("invalid JSON: {e}")))?;
    let mut out = Capped {
        out: Vec::new(),
        max: usize::try_from(max_bytes).unwrap_or(usize::MAX),
    };
    if serde_json::to_writer_pretty(&mut out, &value).is_err() {
        return Err(ExtractError::TooLarge {
            kind: "json",
            message: format!(
                "JSON expands beyond the limit of {} when indented",
                super::limits::size_label(max_bytes)
            ),
        });
    }
    // serde_json writes valid UTF-8 from `String`s.
    Ok(String::from_utf8(out.out).expect("serde_json writes UTF-8"))
}

/// A writer that fails past `max` bytes.
struct Capped {
    out: Vec<u8>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON value whose objects keep their key order.
enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        serde_json::Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Json>()? {
            entries.push(entry);
        }
        Ok(Json::Object(entries))
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_printed_in_file_order() {
        let src = r#"{"zeta":1,"alpha":{"b":[true,null,2.5,"x\u00e9"],"a":{}},"n":-3}"#;
        let doc = crate::extract::extract(src.as_bytes(), "data.json", None).unwrap();
        assert_eq!(doc.kind, "json");
        assert_eq!(
            doc.full_text(),
            "{\n  \"zeta\": 1,\n  \"alpha\": {\n    \"b\": [\n      true,\n      null,\n      2.5,\n      \"xé\"\n    ],\n    \"a\": {}\n  },\n  \"n\": -3\n}"
        );
    }

    #[test]
    fn invalid_json_is_corrupt() {
        for bad in ["{\"a\": }", "[1, 2", "{} trailing", "nope"] {
            let err = crate::extract::extract(bad.as_bytes(), "x.json", None).unwrap_err();
            assert!(
                matches!(err, ExtractError::Corrupt { kind: "json", .. }),
                "{bad}"
            );
            assert!(err.to_string().starts_with("invalid JSON: "), "{err}");
        }
    }

    #[test]
    fn utf16_json_decoded_first() {
        let mut bytes = vec![0xFF, 0xFE];
        for u in r#"{"k": "v"}"#.encode_utf16() {
            bytes.extend_from_slice(&u.to_le_bytes());
        }
        let doc = crate::extract::extract(&bytes, "x.json", None).unwrap();
        assert_eq!(doc.full_text(), "{\n  \"k\": \"v\"\n}");
    }
}
