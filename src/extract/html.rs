//! HTML: the visible text, like BeautifulSoup's `get_text()` in Open WebUI's `BSHTMLLoader`,
//! but laid out: block elements start new lines (paragraph-like ones leave a blank line, which
//! the splitter prefers to cut at), table cells are separated by tabs, runs of whitespace
//! collapse to one space except inside `<pre>`/`<textarea>`.
//!
//! Dropped: `script`, `style`, `noscript`, `template`, `svg`, `math`, `iframe`, `object`,
//! `canvas`, elements with the `hidden` attribute, and comments. The `<title>` is kept as the
//! first line, as `get_text()` keeps it.

use scraper::{Html, Node};

/// Extracts the visible text of an HTML document.
pub(super) fn extract(source: &str) -> String {
    let html = Html::parse_document(source);
    let mut out = Output::default();
    let root = html.tree.root();
    // Iterative depth-first walk: hostile documents nest deeply enough to overflow the stack
    // of a recursive one.
    let mut node = root;
    let mut pre_depth = 0usize;
    'walk: loop {
        let mut descend = false;
        match node.value() {
            Node::Text(text) => out.text(text, pre_depth > 0),
            Node::Element(el) => {
                let name = el.name();
                if !is_hidden(name) && el.attr("hidden").is_none() {
                    descend = true;
                    out.open(name);
                    if matches!(name, "pre" | "textarea" | "listing" | "plaintext") {
                        pre_depth += 1;
                    }
                }
            }
            Node::Document | Node::Fragment => descend = true,
            _ => {}
        }
        if descend && let Some(child) = node.first_child() {
            node = child;
            continue;
        }
        // Leave this node (if it was entered) and every ancestor that has no next sibling.
        loop {
            if let Node::Element(el) = node.value()
                && descend_was_allowed(el)
            {
                let name = el.name();
                out.close(name);
                if matches!(name, "pre" | "textarea" | "listing" | "plaintext") {
                    pre_depth = pre_depth.saturating_sub(1);
                }
            }
            if node.id() == root.id() {
                break 'walk;
            }
            if let Some(next) = node.next_sibling() {
                node = next;
                continue 'walk;
            }
            match node.parent() {
                Some(parent) => node = parent,
                None => break 'walk,
            }
        }
    }
    out.finish()
}

fn descend_was_allowed(el: &scraper::node::Element) -> bool {
    !is_hidden(el.name()) && el.attr("hidden").is_none()
}

fn is_hidden(name: &str) -> bool {
    matches!(
        name,
        "script"
            | "style"
            | "noscript"
            | "template"
            | "svg"
            | "math"
            | "iframe"
            | "object"
            | "embed"
            | "canvas"
            | "audio"
            | "video"
            | "select"
            | "datalist"
    )
}

/// What separates the next piece of text from the previous one; larger wins.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Break {
    #[default]
    None,
    Space,
    Tab,
    Line,
    Paragraph,
}

fn break_around(name: &str) -> Break {
    match name {
        "p" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "title" | "pre" | "blockquote"
        | "table" | "ul" | "ol" | "dl" | "section" | "article" | "header" | "footer" | "nav"
        | "aside" | "main" | "figure" | "form" | "fieldset" | "details" | "hr" | "address"
        | "hgroup" => Break::Paragraph,
        "div" | "br" | "li" | "tr" | "dt" | "dd" | "caption" | "figcaption" | "summary"
        | "legend" | "thead" | "tbody" | "tfoot" | "body" | "html" | "head" | "option"
        | "textarea" | "center" | "dialog" | "search" | "menu" | "listing" | "plaintext" => {
            Break::Line
        }
        "td" | "th" => Break::Tab,
        _ => Break::None,
    }
}

#[derive(Default)]
struct Output {
    buf: String,
    pending: Break,
    /// A cell separator is only wanted between cells of one row, not before the first.
    row_started: bool,
}

impl Output {
    fn brk(&mut self, b: Break) {
        self.pending = self.pending.max(b);
    }

    fn open(&mut self, name: &str) {
        match name {
            "tr" => {
                self.brk(Break::Line);
                self.row_started = false;
            }
            "td" | "th" => {
                if self.row_started {
                    self.brk(Break::Tab);
                }
                self.row_started = true;
            }
            "br" => self.brk(Break::Line),
            _ => self.brk(break_around(name)),
        }
    }

    fn close(&mut self, name: &str) {
        match name {
            // The next cell's opening decides; `br` already broke on open.
            "td" | "th" | "br" => {}
            _ => self.brk(break_around(name)),
        }
    }

    fn text(&mut self, text: &str, preformatted: bool) {
        if preformatted {
            if !text.is_empty() {
                self.push(text);
            }
            return;
        }
        if text.starts_with(char::is_whitespace) {
            self.brk(Break::Space);
        }
        let mut words = text.split_whitespace();
        if let Some(first) = words.next() {
            self.push(first);
            for word in words {
                self.buf.push(' ');
                self.buf.push_str(word);
            }
            if text.ends_with(char::is_whitespace) {
                self.brk(Break::Space);
            }
        }
    }

    fn push(&mut self, s: &str) {
        if !self.buf.is_empty() {
            match self.pending {
                Break::None => {}
                Break::Space => self.buf.push(' '),
                Break::Tab => self.buf.push('\t'),
                Break::Line => self.buf.push('\n'),
                Break::Paragraph => self.buf.push_str("\n\n"),
            }
        }
        self.pending = Break::None;
        self.buf.push_str(s);
    }

    fn finish(self) -> String {
        // Preformatted text may bring its own trailing blank lines.
        self.buf.trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_text_only_with_layout() {
        let page = r#"<!DOCTYPE html>
<html><head><title>My   Page</title>
<style>body { color: red }</style>
<script>var secret = "do not index";</script>
<meta charset="utf-8"></head>
<body>
  <!-- a comment -->
  <noscript>Enable JS</noscript>
  <h1>Heading</h1>
  <p>Some <b>bold</b>
     and <a href="/x">linked</a> text.<br>Next line</p>
  <div hidden>invisible</div>
  <template><p>template</p></template>
  <ul><li>one</li><li>two</li></ul>
  <table><tr><th>Name</th><th>Role</th></tr><tr><td>Ada</td><td>Engineer</td></tr></table>
  <pre>  keep
    indentation</pre>
  <svg><text>icon</text></svg>
  Tail&nbsp;text &amp; more
</body></html>"#;
        let doc = crate::extract::extract(page.as_bytes(), "page.html", None).unwrap();
        assert_eq!(doc.kind, "html");
        assert_eq!(
            doc.full_text(),
            "My Page\n\nHeading\n\nSome bold and linked text.\nNext line\n\none\ntwo\n\n\
             Name\tRole\nAda\tEngineer\n\n  keep\n    indentation\n\nTail text & more"
        );
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 20_000;
        let page = format!(
            "<div>{}deep{}</div>",
            "<span>".repeat(depth),
            "</span>".repeat(depth)
        );
        assert!(extract(&page).contains("deep"));
    }

    #[test]
    fn fragment_without_html_tags() {
        assert_eq!(extract("hello <i>world</i>"), "hello world");
    }
}
