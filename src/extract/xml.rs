//! Generic XML: the text nodes, trimmed, one per line (Open WebUI uses Unstructured, which
//! also keeps only the text). Markup, comments, processing instructions and the DTD are
//! dropped. External entities are never resolved (`quick-xml` does not fetch anything), and
//! entities declared in a DTD are dropped rather than expanded, so "billion laughs" files
//! stay small.

use std::borrow::Cow;

use quick_xml::Reader;
use quick_xml::events::{BytesRef, Event};

use super::ExtractError;

/// Extracts the text of a well-formed XML document.
pub(super) fn extract(text: &str) -> Result<String, ExtractError> {
    let invalid = |msg: String| ExtractError::corrupt("xml", format!("invalid XML: {msg}"));
    let mut reader = Reader::from_str(text);
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut saw_root = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| invalid(format!("{e} (at byte {})", reader.error_position())))?;
        match event {
            Event::Start(_) | Event::End(_) | Event::Empty(_) => {
                flush(&mut current, &mut parts);
                match event {
                    Event::Start(_) => {
                        depth += 1;
                        saw_root = true;
                    }
                    Event::End(_) => depth = depth.saturating_sub(1),
                    _ => saw_root = true,
                }
            }
            Event::Text(e) => current.push_str(&e.xml10_content()),
            Event::CData(e) => current.push_str(&e.xml10_content()),
            Event::GeneralRef(e) => {
                if let Some(s) = resolve_entity(&e) {
                    current.push_str(&s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    flush(&mut current, &mut parts);
    if !saw_root {
        return Err(invalid("no root element".to_owned()));
    }
    if depth != 0 {
        return Err(invalid(
            "unexpected end of file (unclosed element)".to_owned(),
        ));
    }
    Ok(parts.join("\n"))
}

fn flush(current: &mut String, parts: &mut Vec<String>) {
    let trimmed = current.trim();
    if !trimmed.is_empty() {
        parts.push(trimmed.to_owned());
    }
    current.clear();
}

/// Resolves a character reference or one of XML's five predefined entities. Other entities
/// (declared in a DTD) resolve to nothing.
pub(super) fn resolve_entity<'a>(reference: &BytesRef<'a>) -> Option<Cow<'static, str>> {
    if let Ok(Some(c)) = reference.resolve_char_ref() {
        return Some(Cow::Owned(c.to_string()));
    }
    let s = match &**reference {
        "lt" => "<",
        "gt" => ">",
        "amp" => "&",
        "apos" => "'",
        "quot" => "\"",
        _ => return None,
    };
    Some(Cow::Borrowed(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_nodes_one_per_line() {
        let xml = r#"<?xml version="1.0"?>
<!-- a catalogue -->
<catalog xmlns:x="urn:x">
  <book id="1"><title>Rust &amp; You</title><price>10</price></book>
  <book id="2"><title><![CDATA[<Fearless>]]> Concurrency</title><x:note>caf&#233; &#x263A;</x:note></book>
  <empty/>
</catalog>"#;
        let doc = crate::extract::extract(xml.as_bytes(), "books.xml", None).unwrap();
        assert_eq!(doc.kind, "xml");
        assert_eq!(
            doc.full_text(),
            "Rust & You\n10\n<Fearless> Concurrency\ncafé ☺"
        );
    }

    #[test]
    fn malformed_xml_is_corrupt() {
        for bad in ["<a><b></a>", "<a>unclosed", "just text", "<a></b>"] {
            let err = crate::extract::extract(bad.as_bytes(), "x.xml", None).unwrap_err();
            assert!(
                matches!(err, ExtractError::Corrupt { kind: "xml", .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().starts_with("invalid XML: "), "{err}");
        }
    }

    #[test]
    fn dtd_entities_not_expanded() {
        let xml = r#"<!DOCTYPE r [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><r>x &lol2; y</r>"#;
        assert_eq!(extract(xml).unwrap(), "x  y");
    }
}
