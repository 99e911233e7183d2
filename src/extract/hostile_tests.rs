//! Decompression bombs and arbitrary bytes against every loader: each bomb fails with a
//! precise error, nothing panics, and output stays linear in the input.

use std::io::Write;

use flate2::Compression;
use flate2::write::ZlibEncoder;
use proptest::prelude::*;

use super::{ExtractError, Limits, extract_with};

const MIB: usize = 1024 * 1024;

/// Small limits keep the bombs (and the tests) small: 1 MiB per stream, 4 MiB per file.
const SMALL: Limits = Limits {
    max_stream_bytes: MIB as u64,
    max_total_bytes: 4 * MIB as u64,
};

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn ascii85(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in data.chunks(4) {
        let mut group = [0u8; 4];
        group[..chunk.len()].copy_from_slice(chunk);
        let mut n = u32::from_be_bytes(group);
        let mut digits = [0u8; 5];
        for d in digits.iter_mut().rev() {
            *d = (n % 85) as u8 + b'!';
            n /= 85;
        }
        out.extend_from_slice(&digits[..chunk.len() + 1]);
    }
    out.extend_from_slice(b"~>");
    out
}

/// A one-page PDF whose page content is `content` with the stream dictionary entries
/// `dict` (e.g. `/Filter /FlateDecode`), plus `extra` objects (dictionary text, stream data).
fn pdf(dict: &str, content: &[u8], extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>".to_vec(),
    ];
    let stream = |dict: &str, data: &[u8]| {
        let mut s = format!("<< /Length {} {dict} >>\nstream\n", data.len()).into_bytes();
        s.extend_from_slice(data);
        s.extend_from_slice(b"\nendstream");
        s
    };
    objects.push(stream(dict, content));
    objects.push(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec());
    for (d, data) in extra {
        objects.push(stream(d, data));
    }
    let mut out = b"%PDF-1.5\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for o in offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

fn too_large(bytes: &[u8], name: &str) -> String {
    match extract_with(bytes, name, None, &SMALL) {
        Err(e @ ExtractError::TooLarge { .. }) => e.to_string(),
        other => panic!("expected a decompression-bomb error, got {other:?}"),
    }
}

#[test]
fn compressed_pdf_within_limits_still_reads() {
    let text = b"BT /F1 12 Tf 72 720 Td (Compressed hello) Tj ET";
    let doc = extract_with(
        &pdf("/Filter /FlateDecode", &zlib(text), &[]),
        "a.pdf",
        None,
        &SMALL,
    )
    .unwrap();
    assert!(doc.full_text().contains("Compressed hello"), "{doc:?}");
    let stacked = ascii85(&zlib(text));
    let doc = extract_with(
        &pdf("/Filter [/ASCII85Decode /FlateDecode]", &stacked, &[]),
        "a.pdf",
        None,
        &SMALL,
    )
    .unwrap();
    assert!(doc.full_text().contains("Compressed hello"), "{doc:?}");
}

#[test]
fn flate_bomb_in_a_content_stream() {
    // 16 MiB of zeros: about 16 KiB compressed.
    let bomb = zlib(&vec![0u8; 16 * MIB]);
    assert!(bomb.len() < 64 * 1024);
    let err = too_large(&pdf("/Filter /FlateDecode", &bomb, &[]), "bomb.pdf");
    assert_eq!(err, "PDF stream inflates beyond the limit of 1 MiB");
}

#[test]
fn stacked_filters_are_followed() {
    // Each layer is small; only the last inflates.
    let inner = zlib(&vec![b' '; 8 * MIB]);
    let twice = zlib(&inner);
    let err = too_large(
        &pdf("/Filter [/FlateDecode /FlateDecode]", &twice, &[]),
        "s.pdf",
    );
    assert_eq!(err, "PDF stream inflates beyond the limit of 1 MiB");
    let armoured = ascii85(&inner);
    let err = too_large(
        &pdf("/Filter [/ASCII85Decode /FlateDecode]", &armoured, &[]),
        "a.pdf",
    );
    assert_eq!(err, "PDF stream inflates beyond the limit of 1 MiB");
    let mut lzw = weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
    let lzw = lzw.encode(&vec![b'a'; 8 * MIB]).unwrap();
    let err = too_large(&pdf("/Filter /LZWDecode", &lzw, &[]), "l.pdf");
    assert_eq!(err, "PDF stream inflates beyond the limit of 1 MiB");
}

#[test]
fn decoys_and_lying_lengths_do_not_hide_a_bomb() {
    let bomb = zlib(&vec![0u8; 16 * MIB]);
    // A decoy filter name in a nested dictionary before the real one.
    let dict = "/DecodeParms << /Filter /LZWDecode >> /Filter /FlateDecode";
    assert_eq!(
        too_large(&pdf(dict, &bomb, &[]), "d.pdf"),
        "PDF stream inflates beyond the limit of 1 MiB"
    );
    // `/Length` says 10: lopdf falls back to searching `endstream`.
    let mut bytes = pdf("/Filter /FlateDecode", &bomb, &[]);
    let at = bytes.windows(8).position(|w| w == b"/Length ").unwrap() + 8;
    let len_end = at + bytes[at..].iter().position(|b| *b == b' ').unwrap();
    bytes.splice(at..len_end, *b"10");
    assert_eq!(
        too_large(&bytes, "l.pdf"),
        "PDF stream inflates beyond the limit of 1 MiB"
    );
}

#[test]
fn object_stream_bomb_at_load_time() {
    // lopdf inflates object streams while loading, before any page is read.
    let bomb = zlib(&vec![b'0'; 16 * MIB]);
    let bytes = pdf(
        "",
        b"BT ET",
        &[("/Type /ObjStm /N 1 /First 4 /Filter /FlateDecode", &bomb)],
    );
    assert_eq!(
        too_large(&bytes, "o.pdf"),
        "PDF stream inflates beyond the limit of 1 MiB"
    );
}

#[test]
fn many_streams_hit_the_total_limit() {
    // Five streams of 900 KiB each: every one under the stream limit, 4.4 MiB together.
    let part = zlib(&vec![b'x'; 900 * 1024]);
    let extra: Vec<(&str, &[u8])> = (0..5)
        .map(|_| ("/Filter /FlateDecode", &part[..]))
        .collect();
    let err = too_large(&pdf("", b"BT ET", &extra), "m.pdf");
    assert_eq!(
        err,
        "PDF streams inflate beyond the total limit of 4 MiB per file"
    );
}

fn zip(members: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, data) in members {
        w.start_file(*name, options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[test]
fn docx_body_bomb() {
    let mut body = b"<w:document xmlns:w=\"urn:w\"><w:body><w:p><w:r><w:t>".to_vec();
    body.resize(8 * MIB, b'a');
    let bytes = zip(
        &[("word/document.xml", &body)],
        zip::CompressionMethod::Deflated,
    );
    assert!(bytes.len() < 64 * 1024);
    assert_eq!(
        too_large(&bytes, "b.docx"),
        "DOCX word/document.xml inflates beyond the limit of 1 MiB"
    );
}

#[test]
fn zip_with_too_many_members() {
    let names: Vec<String> = (0..=super::MAX_ZIP_MEMBERS)
        .map(|i| format!("m{i}"))
        .collect();
    let members: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
    let bytes = zip(&members, zip::CompressionMethod::Stored);
    assert_eq!(
        too_large(&bytes, "many.docx"),
        format!("DOCX has more than {} ZIP members", super::MAX_ZIP_MEMBERS)
    );
}

#[test]
fn deeply_nested_json_is_bounded() {
    // 127 levels of arrays around short numbers: indentation multiplies the size.
    let depth = 120;
    let inner = vec!["1"; 20_000].join(",");
    let json = format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth));
    let err = too_large(json.as_bytes(), "n.json");
    assert_eq!(err, "JSON expands beyond the limit of 4 MiB when indented");
}

/// Arbitrary bytes under every loader: no panic, and the text is at most a constant times
/// the input plus what the inflation limits allow.
fn check_linear(bytes: &[u8], name: &str) -> Result<(), TestCaseError> {
    if let Ok(doc) = extract_with(bytes, name, None, &SMALL) {
        let out: usize = doc.pages.iter().map(|p| p.text.len()).sum();
        // Legacy encodings and U+FFFD turn one byte into up to three.
        let bound = 3 * bytes.len() + SMALL.max_total_bytes as usize + 64;
        prop_assert!(out <= bound, "{name}: {out} bytes from {}", bytes.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ext in prop::sample::select(
            &["pdf", "docx", "html", "md", "csv", "tsv", "json", "xml", "txt"][..]
        ),
    ) {
        check_linear(&bytes, &format!("x.{ext}"))?;
    }

    #[test]
    fn mutated_pdfs_and_docx_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let text = b"BT /F1 12 Tf 72 720 Td (Hello) Tj ET";
        for (mut bytes, name) in [
            (pdf("/Filter /FlateDecode", &zlib(text), &[]), "m.pdf"),
            (super::docx::tests::make_docx("<w:p><w:r><w:t>Hi</w:t></w:r></w:p>"), "m.docx"),
        ] {
            for (at, b) in &flips {
                let i = at % bytes.len();
                bytes[i] = *b;
            }
            check_linear(&bytes, name)?;
            check_linear(&bytes[..cut % bytes.len()], name)?;
        }
    }

    #[test]
    fn textual_loaders_are_linear(
        text in "[\\[\\]{}<>\"a-z0-9,:;/&#\\n\\t =!-]{0,600}",
        ext in prop::sample::select(&["html", "csv", "tsv", "json", "xml", "txt", "md"][..]),
    ) {
        check_linear(text.as_bytes(), &format!("x.{ext}"))?;
    }
}
