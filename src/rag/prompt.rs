//! Turning sources into the context string and injecting it into the messages, exactly as
//! Open WebUI does (spec 4.5 and 4.6).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::Source;

pub use crate::config::DEFAULT_RAG_TEMPLATE as DEFAULT_TEMPLATE;

/// Escapes a value for a double-quoted XML-ish attribute.
fn attr(v: &str) -> String {
    v.replace('&', "&amp;").replace('"', "&quot;")
}

/// `<source id="N" name=… resource-type=… resource-id=…>CHUNK</source>\n` for every chunk.
/// `N` counts distinct `metadata.source` values (file names) in order of first appearance.
pub fn context_string(sources: &[Source]) -> String {
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut out = String::new();
    for s in sources {
        let name = s
            .source
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let rtype = s
            .source
            .get("type")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let rid = s
            .source
            .get("id")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        for (doc, meta) in s.document.iter().zip(&s.metadata) {
            let key = meta
                .get("source")
                .and_then(Value::as_str)
                .or(rid)
                .unwrap_or("N/A")
                .to_string();
            let next = ids.len() + 1;
            let n = *ids.entry(key).or_insert(next);
            out.push_str(&format!("<source id=\"{n}\""));
            if let Some(v) = name {
                out.push_str(&format!(" name=\"{}\"", attr(v)));
            }
            if let Some(v) = rtype {
                out.push_str(&format!(" resource-type=\"{}\"", attr(v)));
            }
            if let Some(v) = rid {
                out.push_str(&format!(" resource-id=\"{}\"", attr(v)));
            }
            out.push('>');
            out.push_str(doc);
            out.push_str("</source>\n");
        }
    }
    out
}

/// Fills `{{CONTEXT}}`/`[context]` and `{{QUERY}}`/`[query]` in one left-to-right pass over
/// the template. Substituted text is never scanned again: a context or query that contains a
/// placeholder (user-controlled text can) stays as it is, so the output is at most
/// `template + placeholders × (context + query)` bytes, never a re-expansion.
pub fn fill(template: &str, context: &str, query: &str) -> String {
    const PLACEHOLDERS: [(&str, bool); 4] = [
        ("{{CONTEXT}}", true),
        ("[context]", true),
        ("{{QUERY}}", false),
        ("[query]", false),
    ];
    let mut out = String::with_capacity(template.len() + context.len() + query.len());
    let mut rest = template;
    while let Some(at) = rest.find(['{', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match PLACEHOLDERS.iter().find(|(p, _)| tail.starts_with(p)) {
            Some((p, is_context)) => {
                out.push_str(if *is_context { context } else { query });
                rest = &tail[p.len()..];
            }
            None => {
                // Not a placeholder: keep the bracket and go on after it.
                out.push_str(&tail[..1]);
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of a message's content: a string, or the text parts of a multimodal list
/// joined with newlines.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The last user message's text: the retrieval query.
pub fn last_user_query(messages: &[Value]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default()
}

/// How many copies of the filled template [`inject`] will add: one, or one per text part of
/// a multimodal last user message.
pub fn injection_count(messages: &[Value], system_context: bool) -> usize {
    if system_context {
        return 1;
    }
    match messages.last() {
        Some(last) if last.get("role").and_then(Value::as_str) == Some("user") => {
            match last.get("content") {
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter(|p| {
                        p.get("type").and_then(Value::as_str) == Some("text")
                            && p.get("text").is_some_and(Value::is_string)
                    })
                    .count(),
                _ => 1,
            }
        }
        _ => 1,
    }
}

/// Injects the filled template: prepended to the last message when it is the user's (to
/// every text part of a multimodal one), else as a new user message; or, with
/// `system_context`, appended to the system message at index 0 (inserted when missing).
pub fn inject(messages: &mut Vec<Value>, filled: &str, system_context: bool) {
    if system_context {
        match messages.first_mut() {
            Some(first) if first.get("role").and_then(Value::as_str) == Some("system") => {
                let old = content_text(first.get("content").unwrap_or(&Value::Null));
                first["content"] = json!(format!("{old}\n{filled}"));
            }
            _ => messages.insert(0, json!({"role": "system", "content": filled})),
        }
        return;
    }
    match messages.last_mut() {
        Some(last) if last.get("role").and_then(Value::as_str) == Some("user") => {
            match last.get_mut("content") {
                Some(Value::String(s)) => *s = format!("{filled}\n{s}"),
                Some(Value::Array(parts)) => {
                    for p in parts.iter_mut() {
                        if p.get("type").and_then(Value::as_str) == Some("text")
                            && let Some(Value::String(t)) = p.get_mut("text")
                        {
                            *t = format!("{filled}\n{t}");
                        }
                    }
                }
                _ => last["content"] = json!(filled),
            }
        }
        _ => messages.push(json!({"role": "user", "content": filled})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(item: Value, docs: &[(&str, &str)]) -> Source {
        Source {
            source: item,
            document: docs.iter().map(|d| d.0.to_string()).collect(),
            metadata: docs.iter().map(|d| json!({"source": d.1})).collect(),
            distances: vec![0.5; docs.len()],
        }
    }

    #[test]
    fn context_numbers_sources_by_file_name() {
        let s = vec![
            src(
                json!({"type": "collection", "id": "k1", "name": "Docs"}),
                &[("a", "x.pdf"), ("b", "y.md"), ("c", "x.pdf")],
            ),
            src(json!({"type": "text"}), &[("t", "")]),
        ];
        assert_eq!(
            context_string(&s),
            "<source id=\"1\" name=\"Docs\" resource-type=\"collection\" resource-id=\"k1\">a</source>\n\
             <source id=\"2\" name=\"Docs\" resource-type=\"collection\" resource-id=\"k1\">b</source>\n\
             <source id=\"1\" name=\"Docs\" resource-type=\"collection\" resource-id=\"k1\">c</source>\n\
             <source id=\"3\" resource-type=\"text\">t</source>\n"
        );
    }

    #[test]
    fn injection_variants() {
        let filled = fill("C={{CONTEXT}} Q=[query]", "ctx", "why?");
        assert_eq!(filled, "C=ctx Q=why?");
        assert_eq!(fill("{{{CONTEXT}}[[query]]", "c", "q"), "{c[q]");
        let mut m = vec![json!({"role": "user", "content": "why?"})];
        inject(&mut m, "T", false);
        assert_eq!(m[0]["content"], "T\nwhy?");
        let mut m = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        inject(&mut m, "T", false);
        assert_eq!(m[0]["content"][0]["text"], "T\na");
        let mut m = vec![json!({"role": "assistant", "content": "hi"})];
        inject(&mut m, "T", false);
        assert_eq!(m[1], json!({"role": "user", "content": "T"}));
        let mut m = vec![
            json!({"role": "system", "content": "S"}),
            json!({"role": "user", "content": "q"}),
        ];
        inject(&mut m, "T", true);
        assert_eq!(m[0]["content"], "S\nT");
        let mut m = vec![json!({"role": "user", "content": "q"})];
        inject(&mut m, "T", true);
        assert_eq!(m[0], json!({"role": "system", "content": "T"}));
        assert!(
            DEFAULT_TEMPLATE.starts_with("### Task:\n")
                && DEFAULT_TEMPLATE.ends_with("</context>\n")
        );
    }

    #[test]
    fn user_text_is_never_expanded_again() {
        let t = "[context] {{CONTEXT}} [query] {{QUERY}}";
        let hostile = "[context]{{CONTEXT}}[query]{{QUERY}}";
        let out = fill(t, hostile, hostile);
        assert_eq!(out, format!("{hostile} {hostile} {hostile} {hostile}"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Output is exactly the template with each placeholder replaced once: its size is
        /// linear in the inputs whatever they contain.
        #[test]
        fn fill_is_linear(
            template in "(\\[context\\]|\\{\\{CONTEXT\\}\\}|\\[query\\]|\\{\\{QUERY\\}\\}|[a-z{}\\[\\] ]){0,40}",
            context in "(\\[context\\]|\\{\\{CONTEXT\\}\\}|\\[query\\]|[a-z ]){0,40}",
            query in "(\\[query\\]|\\{\\{QUERY\\}\\}|\\[context\\]|[a-z ]){0,40}",
        ) {
            let out = fill(&template, &context, &query);
            let slots = template.len() / "[query]".len() + 1;
            proptest::prop_assert!(out.len() <= template.len() + slots * (context.len() + query.len()));
            // Placeholder-free templates come back unchanged.
            if !template.contains(['{', '[']) {
                proptest::prop_assert_eq!(&out, &template);
            }
        }
    }

    #[test]
    fn query_from_multimodal_parts() {
        let m = vec![
            json!({"role": "user", "content": "old"}),
            json!({"role": "assistant", "content": "x"}),
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        ];
        assert_eq!(last_user_query(&m), "a\nb");
    }
}
