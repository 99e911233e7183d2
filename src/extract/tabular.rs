//! CSV/TSV in the style of LangChain's `CSVLoader` (Open WebUI's CSV loader): every row
//! becomes `header: value` lines, so each row carries its column names into whichever chunk it
//! lands in. Unlike `CSVLoader`, which makes one document (hence at least one chunk and one
//! embedding) per row, all rows go into one page separated by a blank line: the splitter then
//! packs several whole rows into a chunk and prefers to cut between rows.
//!
//! Empty fields are left out; a field without a header (or beyond the header row) is named
//! `column N`. The delimiter of a `.csv` is sniffed from the header line among `,`, `;`, tab
//! and `|` (spreadsheets in many locales export `;`).

use super::ExtractError;
use super::limits::size_label;

/// Longest column name repeated in every row, in bytes (cut at a character boundary).
const MAX_HEADER_BYTES: usize = 256;

/// Renders a CSV text. `delimiter` forces one (TSV); `None` sniffs it.
///
/// Every row repeats the column names, so a CSV with long headers and many short rows would
/// multiply in size: the output is refused beyond `max_bytes` (the per-file inflation limit)
/// and each header is cut to [`MAX_HEADER_BYTES`].
pub(super) fn extract(
    text: &str,
    delimiter: Option<u8>,
    max_bytes: u64,
) -> Result<String, ExtractError> {
    let delimiter = delimiter.unwrap_or_else(|| sniff_delimiter(text));
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(text.as_bytes());
    let invalid = |e: csv::Error| ExtractError::corrupt("csv", format!("invalid CSV: {e}"));
    let headers: Vec<String> = reader
        .headers()
        .map_err(invalid)?
        .iter()
        .map(|h| truncate(h.trim(), MAX_HEADER_BYTES).to_owned())
        .collect();
    let mut out = String::new();
    for record in reader.records() {
        let record = record.map_err(invalid)?;
        let mut row = String::new();
        for (i, value) in record.iter().enumerate() {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            match headers.get(i).filter(|h| !h.is_empty()) {
                Some(header) => row.push_str(header),
                None => row.push_str(&format!("column {}", i + 1)),
            }
            row.push_str(": ");
            row.push_str(value);
            row.push('\n');
        }
        if row.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&row);
        if out.len() as u64 > max_bytes {
            return Err(ExtractError::TooLarge {
                kind: "csv",
                message: format!(
                    "CSV expands beyond the limit of {} (a column name repeated in every row)",
                    size_label(max_bytes)
                ),
            });
        }
    }
    out.truncate(out.trim_end().len());
    Ok(out)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The candidate that occurs most often in the first line outside quotes; `,` on ties.
fn sniff_delimiter(text: &str) -> u8 {
    let first_line = text.lines().next().unwrap_or("");
    let mut counts = [(b',', 0usize), (b';', 0), (b'\t', 0), (b'|', 0)];
    let mut quoted = false;
    for b in first_line.bytes() {
        if b == b'"' {
            quoted = !quoted;
        } else if !quoted && let Some(slot) = counts.iter_mut().find(|(d, _)| *d == b) {
            slot.1 += 1;
        }
    }
    // `max_by_key` returns the last maximum; iterate in reverse so ties favour the comma.
    counts
        .iter()
        .rev()
        .max_by_key(|(_, n)| *n)
        .map_or(b',', |(d, _)| *d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_as_header_value_lines() {
        let csv = "name,city,notes\r\nAda,London,\"likes, commas\"\r\nGrace,,\"multi\nline\"\r\n,,\r\nLinus,Helsinki,x,extra\r\n";
        let doc = crate::extract::extract(csv.as_bytes(), "people.csv", None).unwrap();
        assert_eq!(doc.kind, "csv");
        assert_eq!(
            doc.full_text(),
            "name: Ada\ncity: London\nnotes: likes, commas\n\n\
             name: Grace\nnotes: multi\nline\n\n\
             name: Linus\ncity: Helsinki\nnotes: x\ncolumn 4: extra"
        );
    }

    #[test]
    fn delimiters() {
        assert_eq!(sniff_delimiter("a;b;c\n1;2;3"), b';');
        assert_eq!(sniff_delimiter("\"x,y\";b\n"), b';');
        assert_eq!(sniff_delimiter("a,b;c"), b',');
        assert_eq!(sniff_delimiter("single"), b',');
        let doc = crate::extract::extract(b"k\tv\nx\t1,5\n", "t.tsv", None).unwrap();
        assert_eq!(doc.full_text(), "k: x\nv: 1,5");
        let doc = crate::extract::extract(b"k;v\nx;1,5\n", "t.csv", None).unwrap();
        assert_eq!(doc.full_text(), "k: x\nv: 1,5");
    }

    #[test]
    fn header_only_is_empty() {
        let err = crate::extract::extract(b"a,b,c\n", "t.csv", None).unwrap_err();
        assert_eq!(err.to_string(), "no text found in the CSV file");
    }

    #[test]
    fn repeated_headers_are_bounded() {
        let header = "h".repeat(10_000);
        let csv = format!("{header}\n{}", "x\n".repeat(5000));
        let limits = crate::extract::Limits {
            max_stream_bytes: 1 << 20,
            max_total_bytes: 1 << 20,
        };
        // 5000 rows of a 256-byte name: about 1.3 MB, over the 1 MiB limit.
        let err = crate::extract::extract_with(csv.as_bytes(), "t.csv", None, &limits).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("CSV expands beyond the limit of 1 MiB"),
            "{err}"
        );
        let small = format!("{header}\n{}", "x\n".repeat(100));
        let doc = crate::extract::extract_with(small.as_bytes(), "t.csv", None, &limits).unwrap();
        let first = doc.full_text().lines().next().unwrap().to_owned();
        assert_eq!(first, format!("{}: x", "h".repeat(MAX_HEADER_BYTES)));
    }

    #[test]
    fn latin1_csv() {
        let doc = crate::extract::extract(b"drink,price\ncaf\xe9,2\n", "t.csv", None).unwrap();
        assert_eq!(doc.full_text(), "drink: café\nprice: 2");
    }
}
