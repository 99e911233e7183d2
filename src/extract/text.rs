//! Bytes → text with encoding detection (Open WebUI's `TextLoader(autodetect_encoding=True)`).
//!
//! Order: a BOM (UTF-8, UTF-16LE/BE) wins; then bytes without NULs that are valid UTF-8; then
//! UTF-16 without BOM, recognised by NULs in alternating positions; then `chardetng` guesses a
//! legacy encoding (Windows-1252, Shift_JIS, …) decoded by `encoding_rs`. NULs that are not
//! UTF-16, or many control characters, mean binary data: we refuse rather than index garbage.

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE};

use super::ExtractError;

/// How many leading bytes the UTF-16 heuristic looks at.
const SNIFF_BYTES: usize = 8192;
/// How many leading characters the control-character check looks at.
const SNIFF_CHARS: usize = 65_536;

/// Decodes `bytes` as text. `file_type` (`.ext` or `the`) is only used in error messages.
pub(super) fn decode(bytes: &[u8], file_type: &str) -> Result<String, ExtractError> {
    let binary = || ExtractError::Binary {
        file_type: file_type.to_owned(),
    };
    let text = if let Some((encoding, _)) = Encoding::for_bom(bytes) {
        // `decode_with_bom_removal` strips the BOM it found; invalid sequences become U+FFFD.
        encoding.decode_with_bom_removal(bytes).0.into_owned()
    } else if bytes.contains(&0) {
        // NUL bytes are valid UTF-8, so UTF-16 must be ruled out before trying UTF-8.
        let encoding = utf16_without_bom(bytes).ok_or_else(binary)?;
        encoding
            .decode_without_bom_handling_and_without_replacement(bytes)
            .ok_or_else(binary)?
            .into_owned()
    } else if let Ok(text) = std::str::from_utf8(bytes) {
        text.to_owned()
    } else {
        let mut detector = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Deny);
        detector.feed(bytes, true);
        // UTF-8 was ruled out above, so let the guess fall on a legacy encoding.
        let encoding = detector.guess(None, chardetng::Utf8Detection::Deny);
        let (text, _, _) = encoding.decode(bytes);
        text.into_owned()
    };
    if looks_binary(&text) {
        return Err(binary());
    }
    Ok(text)
}

/// UTF-16 text of mostly Latin script has a NUL in every other byte: odd offsets for LE,
/// even ones for BE. Anything else with NULs is treated as binary.
fn utf16_without_bom(bytes: &[u8]) -> Option<&'static Encoding> {
    let sample = &bytes[..bytes.len().min(SNIFF_BYTES)];
    let pairs = sample.len() / 2;
    if pairs == 0 || !bytes.len().is_multiple_of(2) {
        return None;
    }
    let (mut even, mut odd) = (0usize, 0usize);
    for (i, b) in sample.iter().enumerate() {
        if *b == 0 {
            if i.is_multiple_of(2) {
                even += 1;
            } else {
                odd += 1;
            }
        }
    }
    // At least 40 % of code units with a zero high byte, and almost no zero low bytes.
    let mostly = |n: usize| n * 10 >= pairs * 4;
    let rarely = |n: usize| n * 20 <= pairs;
    if mostly(odd) && rarely(even) {
        Some(UTF_16LE)
    } else if mostly(even) && rarely(odd) {
        Some(UTF_16BE)
    } else {
        None
    }
}

/// More than 2 % C0 control characters (other than tab, newlines, form feed and escape) in
/// the first characters: not text a person wrote.
fn looks_binary(text: &str) -> bool {
    let mut total = 0usize;
    let mut control = 0usize;
    for c in text.chars().take(SNIFF_CHARS) {
        total += 1;
        if (c < ' ' && !matches!(c, '\t' | '\n' | '\r' | '\x0c' | '\x1b')) || c == '\x7f' {
            control += 1;
        }
    }
    control * 50 > total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16le(s: &str, bom: bool) -> Vec<u8> {
        let mut out = if bom { vec![0xFF, 0xFE] } else { vec![] };
        for u in s.encode_utf16() {
            out.extend_from_slice(&u.to_le_bytes());
        }
        out
    }

    fn utf16be(s: &str, bom: bool) -> Vec<u8> {
        let mut out = if bom { vec![0xFE, 0xFF] } else { vec![] };
        for u in s.encode_utf16() {
            out.extend_from_slice(&u.to_be_bytes());
        }
        out
    }

    #[test]
    fn utf8_plain_and_with_bom() {
        assert_eq!(
            decode("héllo wörld".as_bytes(), ".txt").unwrap(),
            "héllo wörld"
        );
        let mut bom = vec![0xEF, 0xBB, 0xBF];
        bom.extend_from_slice("café".as_bytes());
        assert_eq!(decode(&bom, ".txt").unwrap(), "café");
    }

    #[test]
    fn utf16_with_bom() {
        let text = "Grüße, 世界!\nline two";
        assert_eq!(decode(&utf16le(text, true), ".txt").unwrap(), text);
        assert_eq!(decode(&utf16be(text, true), ".txt").unwrap(), text);
    }

    #[test]
    fn utf16_without_bom_by_nul_pattern() {
        let text = "Hello, this is UTF-16 text without a byte order mark.\n";
        assert_eq!(decode(&utf16le(text, false), ".txt").unwrap(), text);
        assert_eq!(decode(&utf16be(text, false), ".txt").unwrap(), text);
    }

    #[test]
    fn latin1_detected() {
        // "café au lait, crème brûlée" in ISO-8859-1 / Windows-1252.
        let bytes = b"Un caf\xe9 au lait et une cr\xe8me br\xfbl\xe9e, s'il vous pla\xeet.";
        assert_eq!(
            decode(bytes, ".txt").unwrap(),
            "Un café au lait et une crème brûlée, s'il vous plaît."
        );
        assert_eq!(decode(b"caf\xe9", ".txt").unwrap(), "café");
    }

    #[test]
    fn binary_rejected() {
        // An ELF header and a PNG header: NULs that are not UTF-16.
        let elf = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00\x3e\x00\x01";
        let err = decode(elf, ".txt").unwrap_err();
        assert!(matches!(err, ExtractError::Binary { .. }));
        assert_eq!(err.to_string(), ".txt file contains binary data, not text");
        let png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06";
        assert!(matches!(
            decode(png, ".log"),
            Err(ExtractError::Binary { .. })
        ));
        // No NUL, but mostly control bytes.
        let controls: Vec<u8> = (1u8..32).cycle().take(500).collect();
        assert!(matches!(
            decode(&controls, ".txt"),
            Err(ExtractError::Binary { .. })
        ));
    }

    #[test]
    fn text_with_a_few_controls_accepted() {
        let text = "colour: \x1b[31mred\x1b[0m\x0c\nnext page\n";
        assert_eq!(decode(text.as_bytes(), ".log").unwrap(), text);
    }
}
