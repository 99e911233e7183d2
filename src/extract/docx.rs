//! DOCX: the main body part `word/document.xml`, read with `quick-xml` (Open WebUI:
//! `Docx2txtLoader`).
//!
//! Paragraphs (`w:p`) end with a newline, `w:t` carries the text, `w:tab` is a tab and
//! `w:br`/`w:cr` a line break (only inside runs: `w:tab` also names tab stops in paragraph
//! properties). Table rows become one line each with cells separated by tabs, so a row stays
//! together when chunked. Deleted revisions (`w:delText`) and field codes (`w:instrText`) are
//! not `w:t` and are skipped. Headers, footers, footnotes and comments live in other parts and
//! are not read.

use std::io::Cursor;

use quick_xml::Reader;
use quick_xml::events::Event;

use super::ExtractError;
use super::limits::{Budget, Limits, read_capped};
use super::xml::resolve_entity;

/// Most members a DOCX may have. The ZIP reader keeps a record per member of the central
/// directory, so a file of millions of tiny members would cost far more memory than its
/// size; real documents have a few dozen parts (a few thousand with many images).
pub const MAX_ZIP_MEMBERS: usize = 10_000;

/// Counts central-directory records (`PK\x01\x02`) in the raw bytes, before the ZIP reader
/// allocates anything for them. Compressed data could hold the signature by chance; at one
/// chance in 2^32 per byte that never comes near the limit.
fn zip_members(bytes: &[u8]) -> usize {
    bytes.windows(4).filter(|w| *w == b"PK\x01\x02").count()
}

/// Extracts the body text of a DOCX file; `word/document.xml` inflates within `limits`.
pub(super) fn extract(bytes: &[u8], limits: &Limits) -> Result<String, ExtractError> {
    let corrupt = |msg: String| ExtractError::corrupt("docx", msg);
    if zip_members(bytes) > MAX_ZIP_MEMBERS {
        return Err(ExtractError::TooLarge {
            kind: "docx",
            message: format!("DOCX has more than {MAX_ZIP_MEMBERS} ZIP members"),
        });
    }
    let mut budget = Budget::new(*limits);
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| corrupt(format!("DOCX is not a valid ZIP archive: {e}")))?;
    let mut part = archive.by_name("word/document.xml").map_err(|e| match e {
        zip::result::ZipError::FileNotFound => {
            corrupt("DOCX has no word/document.xml (not a Word document?)".to_owned())
        }
        e => corrupt(format!("DOCX word/document.xml cannot be read: {e}")),
    })?;
    // The declared size is the attacker's word; only the capped read counts.
    if part.size() > limits.max_stream_bytes {
        return Err(budget.stream_error("docx", "DOCX word/document.xml"));
    }
    let raw = read_capped(&mut part, limits.max_stream_bytes)
        .map_err(|_| budget.stream_error("docx", "DOCX word/document.xml"))?;
    budget.charge("docx", "DOCX members", raw.len())?;
    let xml = String::from_utf8(raw)
        .map_err(|_| corrupt("DOCX word/document.xml is not UTF-8".to_owned()))?;
    body_text(&xml).map_err(|e| corrupt(format!("DOCX word/document.xml is not valid XML: {e}")))
}

/// Walks the WordprocessingML body. Element names are matched by local name so that a
/// non-standard namespace prefix does not lose the text.
fn body_text(xml: &str) -> Result<String, quick_xml::Error> {
    let mut reader = Reader::from_str(xml);
    let mut out = String::new();
    let mut in_text = false;
    let mut run_depth = 0usize;
    let mut table_depth = 0usize;
    loop {
        match reader.read_event()? {
            Event::Start(e) => match e.local_name().into_inner() {
                "t" => in_text = true,
                "r" => run_depth += 1,
                "tbl" => table_depth += 1,
                "tab" if run_depth > 0 => out.push('\t'),
                "br" | "cr" if run_depth > 0 => out.push('\n'),
                _ => {}
            },
            Event::Empty(e) => match e.local_name().into_inner() {
                "tab" if run_depth > 0 => out.push('\t'),
                "br" | "cr" if run_depth > 0 => out.push('\n'),
                "noBreakHyphen" if run_depth > 0 => out.push('-'),
                "p" if table_depth == 0 => out.push('\n'),
                _ => {}
            },
            Event::End(e) => match e.local_name().into_inner() {
                "t" => in_text = false,
                "r" => run_depth = run_depth.saturating_sub(1),
                "p" if table_depth == 0 => out.push('\n'),
                // Paragraphs inside a cell are joined with spaces to keep the row on one line.
                "p" => push_separator(&mut out, ' '),
                "tc" => {
                    trim_end_spaces(&mut out);
                    out.push('\t');
                }
                "tr" => {
                    trim_end_spaces(&mut out);
                    while out.ends_with('\t') {
                        out.pop();
                    }
                    out.push('\n');
                }
                "tbl" => {
                    table_depth = table_depth.saturating_sub(1);
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                }
                _ => {}
            },
            Event::Text(e) if in_text => out.push_str(&e.xml10_content()),
            Event::CData(e) if in_text => out.push_str(&e.xml10_content()),
            Event::GeneralRef(e) if in_text => {
                if let Some(s) = resolve_entity(&e) {
                    out.push_str(&s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out.trim_end().to_owned())
}

fn push_separator(out: &mut String, sep: char) {
    if !out.is_empty() && !out.ends_with([' ', '\t', '\n']) {
        out.push(sep);
    }
}

fn trim_end_spaces(out: &mut String) {
    out.truncate(out.trim_end_matches(' ').len());
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Write;

    use super::*;

    /// Builds a DOCX (a ZIP with the parts Word needs) around a `w:body`.
    pub(in crate::extract) fn make_docx(body: &str) -> Vec<u8> {
        let document = format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>"#
        );
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, content) in [
            (
                "[Content_Types].xml",
                r#"<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#,
            ),
            ("word/document.xml", document.as_str()),
        ] {
            zip.start_file(name, options).unwrap();
            zip.write_all(content.as_bytes()).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn paragraphs_runs_tabs_breaks_and_tables() {
        let body = r#"
<w:p><w:pPr><w:tabs><w:tab w:val="left" w:pos="720"/></w:tabs></w:pPr>
  <w:r><w:t>Hello</w:t></w:r><w:r><w:t xml:space="preserve"> world &amp; co</w:t></w:r></w:p>
<w:p><w:r><w:t>a</w:t><w:tab/><w:t>b</w:t><w:br/><w:t>c</w:t></w:r></w:p>
<w:p/>
<w:p><w:r><w:instrText>PAGE</w:instrText><w:delText>gone</w:delText><w:t>kept</w:t></w:r></w:p>
<w:tbl>
  <w:tr><w:tc><w:p><w:r><w:t>Name</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>Role</w:t></w:r></w:p></w:tc></w:tr>
  <w:tr><w:tc><w:p><w:r><w:t>Ada</w:t></w:r></w:p><w:p><w:r><w:t>Lovelace</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>Engineer</w:t></w:r></w:p></w:tc></w:tr>
</w:tbl>
<w:p><w:r><w:t>After the table</w:t></w:r></w:p>
"#;
        let doc = crate::extract::extract(&make_docx(body), "memo.docx", None).unwrap();
        assert_eq!(doc.kind, "docx");
        assert_eq!(
            doc.full_text(),
            "Hello world & co\na\tb\nc\n\nkept\nName\tRole\nAda Lovelace\tEngineer\nAfter the table"
        );
    }

    #[test]
    fn not_a_zip() {
        let err = crate::extract::extract(b"PK\x03\x04 broken", "x.docx", None).unwrap_err();
        assert!(matches!(err, ExtractError::Corrupt { kind: "docx", .. }));
        assert!(
            err.to_string()
                .starts_with("DOCX is not a valid ZIP archive: "),
            "{err}"
        );
        // An old binary .doc renamed to .docx.
        let err = crate::extract::extract(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "x.docx", None)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("DOCX is not a valid ZIP archive")
        );
    }

    #[test]
    fn zip_without_document_part() {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file("hello.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"hi").unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        let err = crate::extract::extract(&bytes, "x.docx", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DOCX has no word/document.xml (not a Word document?)"
        );
    }

    #[test]
    fn empty_body() {
        let err = crate::extract::extract(&make_docx("<w:p/>"), "x.docx", None).unwrap_err();
        assert_eq!(err.to_string(), "no text found in the DOCX file");
    }

    #[test]
    fn malformed_xml() {
        let err =
            crate::extract::extract(&make_docx("<w:p><w:r></w:p>"), "x.docx", None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("DOCX word/document.xml is not valid XML"),
            "{err}"
        );
    }
}
