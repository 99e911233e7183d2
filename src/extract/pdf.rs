//! PDF text layer via `pdf-extract` (Open WebUI: `PyPDFLoader`, one document per page).
//!
//! `pdf-extract` (and `lopdf` below it) panic on some malformed files, so all parsing runs
//! under `catch_unwind` and a panic becomes [`ExtractError::Corrupt`]. The default panic hook
//! still prints the panic to stderr. Stack overflows and runaway loops cannot be caught here;
//! callers bound extraction with a timeout.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pdf_extract::{Document as PdfDocument, PlainTextOutput, output_doc_page};

use super::{ExtractError, Page};

/// Extracts one [`Page`] per PDF page, numbered from 1, blank pages included.
pub(super) fn extract(bytes: &[u8]) -> Result<Vec<Page>, ExtractError> {
    catch_panics(|| extract_pages(bytes))
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

fn extract_pages(bytes: &[u8]) -> Result<Vec<Page>, ExtractError> {
    // Readers accept the header anywhere in the first KiB; lopdf's own message for a missing
    // one ("invalid file header") would not tell a user that this is not a PDF at all.
    let head = &bytes[..bytes.len().min(1024)];
    if !head.windows(5).any(|w| w == b"%PDF-") {
        return Err(ExtractError::corrupt(
            "pdf",
            "not a PDF file (no %PDF- header)",
        ));
    }
    let mut doc = PdfDocument::load_mem(bytes)
        .map_err(|e| ExtractError::corrupt("pdf", format!("PDF is damaged: {e}")))?;
    // Many PDFs are "encrypted" with an empty user password only to restrict printing or
    // copying; those open without asking anyone for a password.
    if doc.is_encrypted() && doc.decrypt("").is_err() {
        return Err(ExtractError::Encrypted);
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
        let doc = extract(&pdf).unwrap();
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
            let _ = extract(&good[..cut]);
        }
        let mut seed = 7u32;
        for _ in 0..60 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let at = (seed as usize >> 4) % bytes.len();
                bytes[at] = (seed >> 20) as u8;
            }
            let _ = extract(&bytes);
        }
    }

    #[test]
    fn tidy_trims_and_collapses_blank_lines() {
        assert_eq!(tidy("\n\n a  \n\n\n\nb \n\n"), "a\n\nb");
    }
}
