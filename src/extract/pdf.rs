//! PDF text layer via `pdf-extract` (Open WebUI: `PyPDFLoader`, one document per page).
//!
//! `pdf-extract` (and `lopdf` below it) panic on some malformed files, so all parsing runs
//! under `catch_unwind` and a panic becomes [`ExtractError::Corrupt`]. The default panic hook
//! still prints the panic to stderr. Stack overflows and runaway loops cannot be caught here;
//! callers bound extraction with a timeout (and run it in a child process, see
//! [`crate::extract::isolate`]).
//!
//! lopdf inflates streams without any limit: cross-reference and object streams while it
//! loads the file, content and font streams when pdf-extract reads pages. Before lopdf sees
//! the file, [`check_streams`] inflates every stream of the raw bytes with capped decoders
//! (a worst case of what lopdf can inflate, see there); encrypted files, whose stream bytes
//! are only readable after decryption, are checked again once decrypted.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pdf_extract::{Document as PdfDocument, PlainTextOutput, output_doc_page};

use super::limits::{Budget, Exceeded, Limits, decode_ascii85, inflate_flate, inflate_lzw};
use super::{ExtractError, Page};

/// Extracts one [`Page`] per PDF page, numbered from 1, blank pages included.
pub(super) fn extract(bytes: &[u8], limits: &Limits) -> Result<Vec<Page>, ExtractError> {
    catch_panics(|| extract_pages(bytes, limits))
}

/// The decoding filters lopdf implements; it refuses streams with any other filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    Flate,
    Lzw,
    Ascii85,
}

impl Filter {
    fn from_name(name: &[u8]) -> Option<Filter> {
        match name {
            b"FlateDecode" => Some(Filter::Flate),
            b"LZWDecode" => Some(Filter::Lzw),
            b"ASCII85Decode" => Some(Filter::Ascii85),
            _ => None,
        }
    }

    /// Decodes with a cap. For LZW both code-width conventions are tried and the larger
    /// output kept, since `/EarlyChange` could say either.
    fn decode(self, input: &[u8], cap: u64) -> Result<Vec<u8>, Exceeded> {
        match self {
            Filter::Flate => inflate_flate(input, cap),
            Filter::Lzw => {
                let early = inflate_lzw(input, cap, true)?;
                let late = inflate_lzw(input, cap, false)?;
                Ok(if late.len() > early.len() {
                    late
                } else {
                    early
                })
            }
            Filter::Ascii85 => decode_ascii85(input, cap),
        }
    }
}

/// Most filter names considered for one stream: each combination is decoded.
const MAX_FILTERS: usize = 6;
/// How far back from `stream` we look for the stream's dictionary.
const DICT_WINDOW: usize = 64 * 1024;
/// Streams inside inflated streams (object streams) are scanned this deep.
const MAX_NESTING: u8 = 2;

/// Inflates every stream of `data` with capped decoders, failing when one stream or all
/// together inflate beyond `budget`.
///
/// The scan does not depend on a parser agreeing with lopdf: every `stream` keyword starts a
/// candidate, read up to the end of the data (decoders stop at their own end, so a lying
/// `/Length` can only make lopdf read less). The filter names are every known filter name in
/// the dictionary text before the keyword, and every subsequence of them is decoded: the
/// `/Filter` array lopdf will apply is one of them, whatever decoy names a crafted file adds.
/// Every decoded byte counts against the per-file budget, which also bounds the work.
fn check_streams(data: &[u8], budget: &mut Budget, depth: u8) -> Result<(), ExtractError> {
    let mut from = 0;
    while let Some(found) = find(&data[from..], b"stream") {
        let at = from + found;
        // The dictionary lies after the previous keyword: looking no further back keeps the
        // scan linear however many `stream` words the data holds.
        let previous = from;
        from = at + b"stream".len();
        if data[..at].ends_with(b"end") {
            continue;
        }
        let mut start = from;
        if data.get(start) == Some(&b'\r') {
            start += 1;
        }
        if data.get(start) == Some(&b'\n') {
            start += 1;
        }
        let window = &data[at.saturating_sub(DICT_WINDOW).max(previous)..at];
        let dict = match rfind(window, b"obj") {
            Some(i) => &window[i..],
            None => window,
        };
        let filters = filter_names(dict);
        if filters.is_empty() {
            continue;
        }
        if filters.len() > MAX_FILTERS {
            return Err(ExtractError::corrupt(
                "pdf",
                format!("PDF stream has more than {MAX_FILTERS} filters"),
            ));
        }
        decode_all_chains(&data[start..], &filters, budget, depth)?;
    }
    Ok(())
}

/// Decodes `input` through every subsequence of `filters` (see [`check_streams`]).
fn decode_all_chains(
    input: &[u8],
    filters: &[Filter],
    budget: &mut Budget,
    depth: u8,
) -> Result<(), ExtractError> {
    for (i, filter) in filters.iter().enumerate() {
        let out = filter
            .decode(input, budget.limits.max_stream_bytes)
            .map_err(|Exceeded| budget.stream_error("pdf", "PDF stream"))?;
        if out.is_empty() {
            continue;
        }
        budget.charge("pdf", "PDF streams", out.len())?;
        if depth < MAX_NESTING {
            check_streams(&out, budget, depth + 1)?;
        }
        decode_all_chains(&out, &filters[i + 1..], budget, depth)?;
    }
    Ok(())
}

/// The known filter names in a dictionary's text, in order.
fn filter_names(dict: &[u8]) -> Vec<Filter> {
    let mut names = Vec::new();
    for (i, _) in dict.iter().enumerate().filter(|(_, b)| **b == b'/') {
        let name = &dict[i + 1..];
        let end = name
            .iter()
            .position(|b| !b.is_ascii_alphanumeric())
            .unwrap_or(name.len());
        if let Some(f) = Filter::from_name(&name[..end]) {
            names.push(f);
        }
    }
    names
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// After decryption the stream bytes are plain: check what lopdf will inflate, with the
/// filters it parsed.
fn check_loaded_streams(doc: &PdfDocument, budget: &mut Budget) -> Result<(), ExtractError> {
    for object in doc.objects.values() {
        let Ok(stream) = object.as_stream() else {
            continue;
        };
        let Ok(names) = stream.filters() else {
            continue;
        };
        let filters: Vec<Filter> = names.iter().filter_map(|n| Filter::from_name(n)).collect();
        if filters.len() > MAX_FILTERS {
            return Err(ExtractError::corrupt(
                "pdf",
                format!("PDF stream has more than {MAX_FILTERS} filters"),
            ));
        }
        decode_all_chains(&stream.content, &filters, budget, MAX_NESTING)?;
    }
    Ok(())
}

/// Runs `parse`, turning a panic into [`ExtractError::Corrupt`].
fn catch_panics<T>(parse: impl FnOnce() -> Result<T, ExtractError>) -> Result<T, ExtractError> {
    // AssertUnwindSafe: nothing `parse` touches outlives a panic (the document is local).
    match catch_unwind(AssertUnwindSafe(parse)) {
        Ok(result) => result,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown error".to_owned());
            Err(ExtractError::corrupt(
                "pdf",
                format!("PDF could not be read (parser failure: {detail})"),
            ))
        }
    }
}

fn extract_pages(bytes: &[u8], limits: &Limits) -> Result<Vec<Page>, ExtractError> {
    // Readers accept the header anywhere in the first KiB; lopdf's own message for a missing
    // one ("invalid file header") would not tell a user that this is not a PDF at all.
    let head = &bytes[..bytes.len().min(1024)];
    if !head.windows(5).any(|w| w == b"%PDF-") {
        return Err(ExtractError::corrupt(
            "pdf",
            "not a PDF file (no %PDF- header)",
        ));
    }
    let mut budget = Budget::new(*limits);
    check_streams(bytes, &mut budget, 0)?;
    let mut doc = PdfDocument::load_mem(bytes)
        .map_err(|e| ExtractError::corrupt("pdf", format!("PDF is damaged: {e}")))?;
    // Many PDFs are "encrypted" with an empty user password only to restrict printing or
    // copying; those open without asking anyone for a password.
    if doc.is_encrypted() {
        if doc.decrypt("").is_err() {
            return Err(ExtractError::Encrypted);
        }
        check_loaded_streams(&doc, &mut Budget::new(*limits))?;
    }
    let numbers: Vec<u32> = doc.get_pages().into_keys().collect();
    if numbers.is_empty() {
        return Err(ExtractError::corrupt("pdf", "PDF has no pages"));
    }
    let mut pages = Vec::with_capacity(numbers.len());
    let mut first_error = None;
    for number in numbers {
        let mut text = String::new();
        let result = {
            let mut output = PlainTextOutput::new(&mut text);
            output_doc_page(&doc, &mut output, number)
        };
        // One unreadable page (an odd font, a broken content stream) should not cost the
        // text of the others.
        if let Err(e) = result {
            tracing::debug!(page = number, error = %e, "PDF page text could not be extracted");
            first_error.get_or_insert(e.to_string());
            text.clear();
        }
        pages.push(Page {
            text: tidy(&text),
            page: Some(number),
        });
    }
    if pages.iter().all(|p| p.text.trim().is_empty()) {
        return Err(match first_error {
            Some(e) => ExtractError::corrupt("pdf", format!("PDF text could not be read: {e}")),
            None => ExtractError::NoTextLayer,
        });
    }
    Ok(pages)
}

/// pdf-extract lays text out with spaces and newlines from glyph positions: trailing spaces
/// and long runs of blank lines carry no meaning, and would only waste chunk space.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.trim().lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A minimal PDF, written by hand with a correct xref table: one page per entry of
    /// `pages`, each line of text shown with the standard Helvetica font.
    pub(in crate::extract) fn make_pdf(pages: &[&[&str]]) -> Vec<u8> {
        let n = pages.len();
        // Objects: 1 catalog, 2 page tree, 3 font, then a page and its content per page.
        let page_id = |i: usize| 4 + 2 * i;
        let mut objects: Vec<Vec<u8>> = vec![
            b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
            format!(
                "<< /Type /Pages /Kids [{}] /Count {n} >>",
                (0..n)
                    .map(|i| format!("{} 0 R", page_id(i)))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
            .into_bytes(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
                .to_vec(),
        ];
        for (i, lines) in pages.iter().enumerate() {
            let mut content = String::from("BT /F1 12 Tf 72 720 Td 16 TL\n");
            for line in *lines {
                let escaped = line
                    .replace('\\', "\\\\")
                    .replace('(', "\\(")
                    .replace(')', "\\)");
                content.push_str(&format!("({escaped}) Tj T*\n"));
            }
            content.push_str("ET");
            objects.push(
                format!(
                    "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
                     /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                    page_id(i) + 1
                )
                .into_bytes(),
            );
            let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
            stream.extend_from_slice(content.as_bytes());
            stream.extend_from_slice(b"\nendstream");
            objects.push(stream);
        }
        let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
        let mut offsets = Vec::new();
        for (i, body) in objects.iter().enumerate() {
            offsets.push(pdf.len());
            pdf.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
            pdf.extend_from_slice(body);
            pdf.extend_from_slice(b"\nendobj\n");
        }
        let xref = pdf.len();
        pdf.extend_from_slice(
            format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
        );
        for offset in offsets {
            pdf.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
        }
        pdf.extend_from_slice(
            format!(
                "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
                objects.len() + 1
            )
            .as_bytes(),
        );
        pdf
    }

    #[test]
    fn two_pages_with_numbers() {
        let pdf = make_pdf(&[
            &["Hello from page one.", "Second line (with parens)."],
            &["Page two says goodbye."],
        ]);
        let doc = crate::extract::extract(&pdf, "report.pdf", Some("application/pdf")).unwrap();
        assert_eq!(doc.kind, "pdf");
        assert_eq!(doc.pages.len(), 2);
        assert_eq!(doc.pages[0].page, Some(1));
        assert_eq!(doc.pages[1].page, Some(2));
        assert!(
            doc.pages[0].text.contains("Hello from page one."),
            "{:?}",
            doc.pages[0]
        );
        assert!(
            doc.pages[0].text.contains("Second line (with parens)."),
            "{:?}",
            doc.pages[0]
        );
        assert!(
            doc.pages[1].text.contains("Page two says goodbye."),
            "{:?}",
            doc.pages[1]
        );
        assert!(!doc.pages[1].text.contains("Hello"));
        assert!(
            doc.full_text().contains("one.\nSecond") || doc.full_text().contains("one. Second")
        );
    }

    #[test]
    fn blank_pages_mean_no_text_layer() {
        let pdf = make_pdf(&[&[], &[]]);
        let err = crate::extract::extract(&pdf, "scan.pdf", None).unwrap_err();
        assert!(matches!(err, ExtractError::NoTextLayer), "{err:?}");
        assert_eq!(err.to_string(), "PDF has no text layer (scanned images?)");
    }

    #[test]
    fn blank_page_kept_between_text_pages() {
        let pdf = make_pdf(&[&["first"], &[], &["third"]]);
        let doc = extract(&pdf, &Limits::default()).unwrap();
        assert_eq!(doc.len(), 3);
        assert_eq!(doc[1].text, "");
        assert_eq!(doc[2].page, Some(3));
        assert_eq!(doc[2].text, "third");
    }

    #[test]
    fn corrupt_pdfs_are_errors_not_panics() {
        let good = make_pdf(&[&["Some text here"]]);
        let mut cases: Vec<Vec<u8>> = vec![
            b"not a pdf at all".to_vec(),
            b"%PDF-1.4\n".to_vec(),
            b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF"
                .to_vec(),
            good[..good.len() / 2].to_vec(),
        ];
        // Garbage in the middle of an otherwise valid file.
        let mut mangled = good.clone();
        for b in mangled.iter_mut().skip(40).step_by(7) {
            *b = b'#';
        }
        cases.push(mangled);
        for (i, case) in cases.iter().enumerate() {
            match crate::extract::extract(case, "x.pdf", None) {
                Err(
                    ExtractError::Corrupt { kind: "pdf", .. }
                    | ExtractError::NoTextLayer
                    | ExtractError::Empty { .. },
                ) => {}
                other => panic!("case {i}: {other:?}"),
            }
        }
        let err = crate::extract::extract(b"hello", "x.pdf", None).unwrap_err();
        assert_eq!(err.to_string(), "not a PDF file (no %PDF- header)");
    }

    #[test]
    fn parser_panic_becomes_corrupt() {
        let err = catch_panics::<()>(|| panic!("index out of bounds")).unwrap_err();
        assert!(matches!(err, ExtractError::Corrupt { kind: "pdf", .. }));
        assert_eq!(
            err.to_string(),
            "PDF could not be read (parser failure: index out of bounds)"
        );
    }

    #[test]
    fn truncated_and_mutated_pdfs_never_panic() {
        let good = make_pdf(&[&["Alpha beta gamma"], &["Delta epsilon"]]);
        for cut in (0..good.len()).step_by(23) {
            let _ = extract(&good[..cut], &Limits::default());
        }
        let mut seed = 7u32;
        for _ in 0..60 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let at = (seed as usize >> 4) % bytes.len();
                bytes[at] = (seed >> 20) as u8;
            }
            let _ = extract(&bytes, &Limits::default());
        }
    }

    #[test]
    fn tidy_trims_and_collapses_blank_lines() {
        assert_eq!(tidy("\n\n a  \n\n\n\nb \n\n"), "a\n\nb");
    }
}
