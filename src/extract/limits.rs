//! Bounds on decompression during extraction: every inflated stream (PDF filters, ZIP
//! members) is decoded by a decoder that stops at a cap, so a file of a few KiB cannot make
//! the process allocate gigabytes (a "decompression bomb").
//!
//! Two caps apply, both derived from the upload limit by default (see `rag.extract-*` in
//! `conf/ragway.toml`): one per stream, and one for everything a single file inflates.

use std::io::{self, Read, Write};

use super::ExtractError;

/// How much one file may inflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest output of one decompressed stream or archive member, in bytes.
    pub max_stream_bytes: u64,
    /// Largest sum of every decompressed stream of one file, in bytes.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    /// The defaults for the default upload limit of 100 MiB: 100 MiB per stream, 4 × that
    /// in total.
    fn default() -> Self {
        Limits {
            max_stream_bytes: 100 * MIB,
            max_total_bytes: 400 * MIB,
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// `bytes` for a message: whole MiB when it is one, else KiB.
pub(crate) fn size_label(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// What one file has inflated so far.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) limits: Limits,
    used: u64,
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Self {
        Budget { limits, used: 0 }
    }

    /// Counts `n` more inflated bytes; `what` names the streams in the error, e.g.
    /// `PDF streams`.
    pub(crate) fn charge(
        &mut self,
        kind: &'static str,
        what: &str,
        n: usize,
    ) -> Result<(), ExtractError> {
        self.used = self.used.saturating_add(n as u64);
        if self.used > self.limits.max_total_bytes {
            return Err(ExtractError::TooLarge {
                kind,
                message: format!(
                    "{what} inflate beyond the total limit of {} per file",
                    size_label(self.limits.max_total_bytes)
                ),
            });
        }
        Ok(())
    }

    /// The error for one stream above [`Limits::max_stream_bytes`].
    pub(crate) fn stream_error(&self, kind: &'static str, what: &str) -> ExtractError {
        ExtractError::TooLarge {
            kind,
            message: format!(
                "{what} inflates beyond the limit of {}",
                size_label(self.limits.max_stream_bytes)
            ),
        }
    }
}

/// Marks a decoder output that went past its cap.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Exceeded;

/// Reads `reader` to its end or its first error (keeping what came before, as lenient
/// parsers do), but never more than `cap` bytes.
pub(crate) fn read_capped(reader: impl Read, cap: u64) -> Result<Vec<u8>, Exceeded> {
    let mut out = Vec::new();
    // The error is deliberately ignored: the output up to it is what a lenient reader uses.
    let _ = reader.take(cap.saturating_add(1)).read_to_end(&mut out);
    if out.len() as u64 > cap {
        return Err(Exceeded);
    }
    Ok(out)
}

/// Zlib, falling back to raw deflate after the 2-byte header when zlib yields nothing:
/// exactly what lopdf does for `/FlateDecode`, so we see at least what it will inflate.
pub(crate) fn inflate_flate(input: &[u8], cap: u64) -> Result<Vec<u8>, Exceeded> {
    let out = read_capped(flate2::read::ZlibDecoder::new(input), cap)?;
    if out.is_empty() && input.len() > 2 {
        return read_capped(flate2::read::DeflateDecoder::new(&input[2..]), cap);
    }
    Ok(out)
}

/// A writer that refuses to grow past its cap.
struct CappedWriter {
    out: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.cap {
            self.exceeded = true;
            return Err(io::Error::other("inflation limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// PDF `/LZWDecode` (MSB first, 8-bit codes, with or without early change: both are tried
/// by the caller's worst case, here the early-change default of PDF).
pub(crate) fn inflate_lzw(input: &[u8], cap: u64, early_change: bool) -> Result<Vec<u8>, Exceeded> {
    use weezl::{BitOrder, decode::Decoder};
    let mut decoder = if early_change {
        Decoder::with_tiff_size_switch(BitOrder::Msb, 8)
    } else {
        Decoder::new(BitOrder::Msb, 8)
    };
    let mut writer = CappedWriter {
        out: Vec::new(),
        cap: usize::try_from(cap).unwrap_or(usize::MAX),
        exceeded: false,
    };
    let _ = decoder.into_stream(&mut writer).decode_all(input);
    if writer.exceeded {
        return Err(Exceeded);
    }
    Ok(writer.out)
}

/// PDF `/ASCII85Decode`, as lenient as lopdf (stops at the first character outside the
/// alphabet); `z` is four zero bytes, the only way this filter grows.
pub(crate) fn decode_ascii85(input: &[u8], cap: u64) -> Result<Vec<u8>, Exceeded> {
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    let (mut group, mut count) = (0u32, 0);
    for &c in input {
        if out.len() > cap {
            return Err(Exceeded);
        }
        match c {
            b'z' if count == 0 => out.extend_from_slice(&[0; 4]),
            c if c.is_ascii_whitespace() => {}
            b'!'..=b'u' => {
                group = group.wrapping_mul(85).wrapping_add(u32::from(c - b'!'));
                count += 1;
                if count == 5 {
                    out.extend_from_slice(&group.to_be_bytes());
                    (group, count) = (0, 0);
                }
            }
            _ => break,
        }
    }
    // A final partial group of n characters is n - 1 bytes (padded with `u`).
    if count > 1 {
        for _ in count..5 {
            group = group.wrapping_mul(85).wrapping_add(84);
        }
        out.extend_from_slice(&group.to_be_bytes()[..count - 1]);
    }
    if out.len() > cap {
        return Err(Exceeded);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::ZlibEncoder;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn flate_stops_at_the_cap() {
        let bomb = zlib(&vec![0u8; 4 * 1024 * 1024]);
        assert!(bomb.len() < 16 * 1024);
        assert_eq!(inflate_flate(&bomb, 1024 * 1024), Err(Exceeded));
        assert_eq!(
            inflate_flate(&bomb, 4 * 1024 * 1024).unwrap().len(),
            4 * 1024 * 1024
        );
        // Raw deflate behind a broken zlib header, as lopdf retries it.
        let mut raw = flate2::write::DeflateEncoder::new(vec![b'?', b'?'], Compression::best());
        raw.write_all(&vec![7u8; 2 * 1024 * 1024]).unwrap();
        let raw = raw.finish().unwrap();
        assert_eq!(inflate_flate(&raw, 1024 * 1024), Err(Exceeded));
        // Garbage inflates to nothing rather than failing.
        assert!(inflate_flate(b"not deflate at all", 10).unwrap().len() <= 10);
    }

    #[test]
    fn lzw_and_ascii85_stop_at_the_cap() {
        let mut enc = weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
        let lzw = enc.encode(&vec![b'a'; 1024 * 1024]).unwrap();
        assert!(lzw.len() < 64 * 1024, "{}", lzw.len());
        assert_eq!(inflate_lzw(&lzw, 64 * 1024, true), Err(Exceeded));
        assert_eq!(
            inflate_lzw(&lzw, 1024 * 1024, true).unwrap().len(),
            1024 * 1024
        );
        let zs = vec![b'z'; 10_000];
        assert_eq!(decode_ascii85(&zs, 1000), Err(Exceeded));
        assert_eq!(decode_ascii85(&zs, 40_000).unwrap().len(), 40_000);
        assert_eq!(decode_ascii85(b"9jqo^F*2M7~>", 100).unwrap(), b"Man sure");
        // A final partial group.
        assert_eq!(decode_ascii85(b"87cURDZ~>", 100).unwrap(), b"Hello");
    }

    #[test]
    fn budget_counts_every_stream() {
        let mut b = Budget::new(Limits {
            max_stream_bytes: 10,
            max_total_bytes: 25,
        });
        b.charge("pdf", "PDF streams", 10).unwrap();
        b.charge("pdf", "PDF streams", 10).unwrap();
        let err = b.charge("pdf", "PDF streams", 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PDF streams inflate beyond the total limit of 1 KiB per file"
        );
        assert_eq!(
            b.stream_error("pdf", "PDF stream").to_string(),
            "PDF stream inflates beyond the limit of 1 KiB"
        );
        assert_eq!(size_label(8 * MIB), "8 MiB");
        assert_eq!(size_label(3 * MIB / 2), "1.5 MiB");
    }
}
