//! Chunking, with Open WebUI's defaults (`routers/retrieval.py`, `save_docs_to_vector_db`).
//!
//! 1. With `ENABLE_MARKDOWN_HEADER_TEXT_SPLITTER` (default on) each page is first cut at
//!    Markdown ATX headers (`#` … `######` at the start of a line, outside fenced code
//!    blocks); every section keeps its header line, and its chunks record the header path.
//!    Like Open WebUI, this applies to every document kind, not only `.md` files.
//! 2. Each section is then split by `text-splitter`'s [`TextSplitter`] to at most
//!    `CHUNK_SIZE` (1000) characters, or tokens of the embedding model's tokenizer, with up to
//!    `CHUNK_OVERLAP` (100) of overlap. It plays the part of LangChain's
//!    `RecursiveCharacterTextSplitter`: it prefers to cut at blank lines, then lines, then
//!    sentences and words.
//! 3. `start_index` is the chunk's offset in its page's text, in characters (Open WebUI's
//!    `add_start_index`, which counts Python characters, i.e. code points).
//!
//! Chunks are trimmed slices of the page text, never empty or whitespace-only.
//!
//! Header metadata is bounded: each recorded header is cut to [`MAX_HEADER_BYTES`] and the
//! header path of a chunk holds at most [`MAX_HEADER_PATH_BYTES`], so a hostile document (one
//! 20 MB `# ` line) costs a few hundred bytes per chunk, not a copy of the line per chunk.
//! Sections share their header path, so memory stays linear in the input.

use std::fmt;
use std::sync::Arc;

use text_splitter::{ChunkSizer, TextSplitter};

use crate::extract::Document;

/// Longest header text kept in a chunk's metadata, in bytes (cut at a character boundary).
pub const MAX_HEADER_BYTES: usize = 256;
/// Most header bytes kept per chunk, all levels together (six levels of
/// [`MAX_HEADER_BYTES`] would not fit: the innermost headers are dropped first).
pub const MAX_HEADER_PATH_BYTES: usize = 1024;

/// How chunk sizes are measured (Open WebUI's `RAG_TEXT_SPLITTER`).
#[derive(Clone)]
pub enum Splitter {
    /// Characters (Unicode code points): `character`, the default.
    Character,
    /// Tokens of this tokenizer, normally the embedding model's: `token_transformers`.
    Token(Arc<tokenizers::Tokenizer>),
}

impl fmt::Debug for Splitter {
    // A tokenizer's own Debug prints its whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Splitter::Character => f.write_str("Character"),
            Splitter::Token(_) => f.write_str("Token(..)"),
        }
    }
}

/// Chunking settings.
#[derive(Clone, Debug)]
pub struct ChunkConfig {
    /// Largest chunk, in characters or tokens (`CHUNK_SIZE`, default 1000).
    pub size: usize,
    /// Most overlap between consecutive chunks, same unit (`CHUNK_OVERLAP`, default 100).
    pub overlap: usize,
    /// Cut at Markdown headers first (`ENABLE_MARKDOWN_HEADER_TEXT_SPLITTER`, default true).
    pub markdown_headers: bool,
    /// The size unit (`RAG_TEXT_SPLITTER`, default characters).
    pub splitter: Splitter,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            size: 1000,
            overlap: 100,
            markdown_headers: true,
            splitter: Splitter::Character,
        }
    }
}

impl ChunkConfig {
    /// Checks `size > 0` and `overlap < size`, with a message fit for a 400 answer.
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("chunk size must be greater than 0".to_owned());
        }
        if self.overlap >= self.size {
            return Err(format!(
                "chunk overlap ({}) must be smaller than chunk size ({})",
                self.overlap, self.size
            ));
        }
        Ok(())
    }
}

/// A piece of a page, ready to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The text: a trimmed slice of the page text, never empty.
    pub text: String,
    /// Offset of `text` in its page's text, in characters.
    pub start_index: usize,
    /// The page number, for PDFs.
    pub page: Option<u32>,
    /// The enclosing Markdown headers, outermost first, e.g. `["# Intro", "## Setup"]`;
    /// empty without the header splitter or before the first header.
    pub headers: Vec<String>,
}

/// Splits every page of `doc` into chunks, in page and text order.
///
/// An invalid configuration (see [`ChunkConfig::validate`]) does not panic: the size is
/// raised to 1 and the overlap lowered below the size.
pub fn split(doc: &Document, cfg: &ChunkConfig) -> Vec<Chunk> {
    let size = cfg.size.max(1);
    let overlap = cfg.overlap.min(size - 1);
    match &cfg.splitter {
        Splitter::Character => {
            let config = text_splitter::ChunkConfig::new(size)
                .with_overlap(overlap)
                .expect("overlap is clamped below size");
            split_with(doc, cfg.markdown_headers, &TextSplitter::new(config), size)
        }
        Splitter::Token(tokenizer) => {
            let config = text_splitter::ChunkConfig::new(size)
                .with_sizer(TokenCounter::new(tokenizer))
                .with_overlap(overlap)
                .expect("overlap is clamped below size");
            split_with(doc, cfg.markdown_headers, &TextSplitter::new(config), size)
        }
    }
}

/// Longest document title carried into each chunk, in characters: a title, not a paragraph.
pub const MAX_TITLE_CHARS: usize = 200;

/// A document's title for contextual chunk headers (`rag.title-in-chunks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title {
    /// The title as carried into chunks.
    pub text: String,
    /// The line of the document it came from (`None` for a file name): a chunk that starts
    /// with it already carries the title.
    line: Option<String>,
}

impl Title {
    /// The title of `doc`: a leading Markdown heading, or a first line that stands alone
    /// (followed by a blank line) as titles of plain-text documents do; otherwise the file
    /// name without its extension, unless that reads as an identifier (`MED-10.txt`,
    /// a UUID), which would tell the ranking nothing. Only the start of the first page is read.
    pub fn of(doc: &Document, filename: &str) -> Option<Title> {
        doc.pages
            .iter()
            .find(|p| !p.text.trim().is_empty())
            .and_then(|p| first_line_title(&p.text))
            .or_else(|| filename_title(filename))
    }

    /// The title a chunk is carried under, or `None` when it begins with the title line
    /// (it already carries it).
    pub fn context_for(title: Option<&Title>, chunk: &str) -> Option<String> {
        title
            .filter(|t| !t.line.as_deref().is_some_and(|l| chunk.starts_with(l)))
            .map(|t| t.text.clone())
    }

    /// The text a chunk is embedded and indexed by: the title, a line break and the chunk,
    /// or the chunk alone when it begins with the title line.
    pub fn apply<'a>(title: Option<&Title>, chunk: &'a str) -> std::borrow::Cow<'a, str> {
        match Self::context_for(title, chunk) {
            Some(t) => std::borrow::Cow::Owned(format!("{t}\n{chunk}")),
            None => std::borrow::Cow::Borrowed(chunk),
        }
    }
}

fn first_line_title(text: &str) -> Option<Title> {
    let text = text.trim_start();
    // Bounded look-ahead: a huge single-line document is not scanned for its line end.
    let head = &text[..floor_char_boundary(text, MAX_TITLE_CHARS * 4 + 2)];
    let (line, rest) = head.split_once('\n')?;
    let line = line.trim_end_matches('\r');
    let words = line.trim();
    if words.is_empty() || words.chars().count() > MAX_TITLE_CHARS {
        return None;
    }
    let title = match header_level(line) {
        Some(_) => words.trim_start_matches('#').trim(),
        None => {
            let next = rest.split('\n').next().unwrap_or_default();
            if !next.trim().is_empty() || rest.is_empty() {
                return None;
            }
            words
        }
    };
    title.chars().any(char::is_alphabetic).then(|| Title {
        text: title.to_owned(),
        line: Some(line.to_owned()),
    })
}

fn filename_title(filename: &str) -> Option<Title> {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let stem = base.rsplit_once('.').map_or(base, |(s, _)| s).trim();
    if stem.is_empty() || stem.chars().count() > MAX_TITLE_CHARS {
        return None;
    }
    let words: Vec<&str> = stem
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let alphabetic = words
        .iter()
        .filter(|w| w.chars().all(char::is_alphabetic))
        .count();
    // Two words, or one word with nothing else: a name a person gave. One word next to
    // numbers or letter-digit runs: an identifier.
    if alphabetic >= 2 || (alphabetic == 1 && words.len() == 1) {
        Some(Title {
            text: stem.replace(['_', '-'], " "),
            line: None,
        })
    } else {
        None
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn split_with<S: ChunkSizer>(
    doc: &Document,
    markdown_headers: bool,
    splitter: &TextSplitter<S>,
    size: usize,
) -> Vec<Chunk> {
    let window_bytes = size.max(256).saturating_mul(WINDOW_CHUNKS);
    let mut chunks = Vec::new();
    for page in &doc.pages {
        let text = page.text.as_str();
        let sections = if markdown_headers {
            markdown_sections(text)
        } else {
            vec![Section {
                start: 0,
                end: text.len(),
                headers: Arc::from(Vec::new()),
            }]
        };
        // Character offset of `byte_pos`, advanced section by section to stay linear.
        let (mut byte_pos, mut char_pos) = (0usize, 0usize);
        for section in sections {
            for (start, window) in windows(&text[section.start..section.end], window_bytes) {
                let start = section.start + start;
                char_pos += text[byte_pos..start].chars().count();
                byte_pos = start;
                for piece in splitter.chunk_char_indices(window) {
                    if piece.chunk.trim().is_empty() {
                        continue;
                    }
                    chunks.push(Chunk {
                        text: piece.chunk.to_owned(),
                        start_index: char_pos + piece.char_offset,
                        page: page.page,
                        headers: section.headers.to_vec(),
                    });
                }
            }
        }
    }
    chunks
}

/// Sections are handed to the splitter in windows of about this many chunks (of the largest
/// size in bytes). The splitter's cost grows faster than linearly with the length of text
/// without separators it is given (a 900 KB single line took minutes), so one huge line or
/// paragraph is cut first, at a line break or else a space in the window's second half. Only
/// text longer than a window is affected: a chunk never spans two windows.
const WINDOW_CHUNKS: usize = 64;

/// `text` in pieces of at most `max` bytes (unless no cut point exists), with their offsets.
fn windows(text: &str, max: usize) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= text.len() {
            return None;
        }
        let rest = &text[start..];
        let mut end = rest.len();
        if rest.len() > max {
            let mut limit = max;
            while !rest.is_char_boundary(limit) {
                limit -= 1;
            }
            let mut half = limit / 2;
            while !rest.is_char_boundary(half) {
                half -= 1;
            }
            let head = &rest[..limit];
            end = head[half..]
                .rfind('\n')
                .or_else(|| head[half..].rfind(char::is_whitespace))
                .map_or(limit, |i| half + i + 1);
            // Stay on a character boundary after a multi-byte whitespace.
            while !rest.is_char_boundary(end) {
                end += 1;
            }
        }
        let piece = (start, &rest[..end]);
        start += end;
        Some(piece)
    })
}

/// A byte range of a page under one header path.
#[derive(Debug, PartialEq, Eq)]
struct Section {
    start: usize,
    end: usize,
    /// Shared by every section under the same header path.
    headers: Arc<[String]>,
}

/// Cuts `text` before every ATX header line outside fenced code. Each section runs from its
/// header line to the next header; text before the first header has no headers. Sections
/// with only whitespace are left out.
fn markdown_sections(text: &str) -> Vec<Section> {
    let mut sections = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut current: (usize, Arc<[String]>) = (0usize, Arc::from(Vec::new()));
    let mut fence: Option<(u8, usize)> = None;
    let mut offset = 0usize;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        if let Some((ch, len)) = fence {
            if is_closing_fence(content, ch, len) {
                fence = None;
            }
            continue;
        }
        if let Some(opening) = opening_fence(content) {
            fence = Some(opening);
            continue;
        }
        let Some(level) = header_level(content) else {
            continue;
        };
        push_section(&mut sections, text, current.0, line_start, &current.1);
        while stack.last().is_some_and(|(l, _)| *l >= level) {
            stack.pop();
        }
        stack.push((level, truncate_header(content.trim()).to_owned()));
        current = (line_start, header_path(&stack));
    }
    push_section(&mut sections, text, current.0, text.len(), &current.1);
    sections
}

fn push_section(
    sections: &mut Vec<Section>,
    text: &str,
    start: usize,
    end: usize,
    headers: &Arc<[String]>,
) {
    if !text[start..end].trim().is_empty() {
        sections.push(Section {
            start,
            end,
            headers: Arc::clone(headers),
        });
    }
}

/// `header` cut to at most [`MAX_HEADER_BYTES`], at a character boundary.
fn truncate_header(header: &str) -> &str {
    if header.len() <= MAX_HEADER_BYTES {
        return header;
    }
    let mut end = MAX_HEADER_BYTES;
    while !header.is_char_boundary(end) {
        end -= 1;
    }
    &header[..end]
}

/// The outermost headers of `stack` that fit in [`MAX_HEADER_PATH_BYTES`].
fn header_path(stack: &[(usize, String)]) -> Arc<[String]> {
    let mut used = 0;
    stack
        .iter()
        .map(|(_, h)| h)
        .take_while(|h| {
            used += h.len();
            used <= MAX_HEADER_PATH_BYTES
        })
        .cloned()
        .collect()
}

/// Up to three spaces of indentation are allowed before a header or a fence; four make an
/// indented code block (CommonMark).
fn unindent(line: &str) -> Option<&str> {
    let rest = line.trim_start_matches(' ');
    (line.len() - rest.len() <= 3).then_some(rest)
}

/// `#`…`######` followed by a space, a tab or the end of the line.
fn header_level(line: &str) -> Option<usize> {
    let rest = unindent(line)?;
    let level = rest.bytes().take_while(|b| *b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    match rest.as_bytes().get(level) {
        None | Some(b' ') | Some(b'\t') => Some(level),
        _ => None,
    }
}

/// Three or more backticks or tildes open a fenced code block.
fn opening_fence(line: &str) -> Option<(u8, usize)> {
    let rest = unindent(line)?;
    let ch = *rest.as_bytes().first()?;
    if ch != b'`' && ch != b'~' {
        return None;
    }
    let len = rest.bytes().take_while(|b| *b == ch).count();
    (len >= 3).then_some((ch, len))
}

/// The same character, at least as many times, and nothing else but whitespace.
fn is_closing_fence(line: &str, ch: u8, len: usize) -> bool {
    let Some(rest) = unindent(line) else {
        return false;
    };
    let run = rest.bytes().take_while(|b| *b == ch).count();
    run >= len && rest[run..].trim().is_empty()
}

/// Counts tokens with the embedding model's tokenizer, without special tokens. Implemented
/// here rather than through text-splitter's `tokenizers` feature, which would pull in a
/// second, C-backed build of `tokenizers`.
struct TokenCounter(Arc<tokenizers::Tokenizer>);

impl TokenCounter {
    /// An embedding tokenizer usually truncates (and may pad) to the model's input length,
    /// which would make every long text look short: count with a copy that does neither.
    fn new(tokenizer: &Arc<tokenizers::Tokenizer>) -> Self {
        if tokenizer.get_truncation().is_none() && tokenizer.get_padding().is_none() {
            return Self(Arc::clone(tokenizer));
        }
        let mut plain = (**tokenizer).clone();
        // Removing truncation cannot fail; only setting one is validated.
        let _ = plain.with_truncation(None);
        plain.with_padding(None);
        Self(Arc::new(plain))
    }
}

impl ChunkSizer for TokenCounter {
    fn size(&self, chunk: &str) -> usize {
        match self.0.encode_fast(chunk, false) {
            Ok(encoding) => encoding.len(),
            // Not expected with byte-level or `[UNK]`-capable tokenizers; characters are an
            // upper bound for almost every tokenizer, so chunks still fit.
            Err(_) => chunk.chars().count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::Page;

    fn doc(pages: &[&str]) -> Document {
        Document {
            pages: pages
                .iter()
                .map(|t| Page {
                    text: (*t).to_owned(),
                    page: None,
                })
                .collect(),
            kind: "text",
        }
    }

    fn title(pages: &[&str], name: &str) -> Option<String> {
        Title::of(&doc(pages), name).map(|t| t.text)
    }

    #[test]
    fn title_is_a_heading_or_a_standalone_first_line() {
        let abs = "Statin Use and Breast Cancer Survival\n\nRecent studies have suggested...";
        assert_eq!(
            title(&[abs], "MED-10.txt").as_deref(),
            Some("Statin Use and Breast Cancer Survival")
        );
        assert_eq!(
            title(&["\n  # Install guide\nRun it."], "x.md").as_deref(),
            Some("Install guide")
        );
        // A first line running into the next is the start of the text, not a title.
        assert_eq!(
            title(
                &["SYNOPSIS\ngcloud beta dns\n\nmore"],
                "gcloud_beta_dns.txt"
            )
            .as_deref(),
            Some("gcloud beta dns")
        );
        // Too long, no letters, or a single line: no line title.
        let long = format!("{}\n\nbody", "word ".repeat(60));
        assert_eq!(title(&[&long], "MED-1.txt"), None);
        assert_eq!(title(&["1234\n\nbody"], "a1b2c3.txt"), None);
        assert_eq!(
            title(&["only one line"], "notes.txt").as_deref(),
            Some("notes")
        );
        // Blank leading pages are skipped.
        assert_eq!(
            title(&["", "Title\n\nbody"], "x1.pdf").as_deref(),
            Some("Title")
        );
    }

    #[test]
    fn file_names_that_read_as_identifiers_are_no_title() {
        for id in [
            "MED-10.txt",
            "3f2a9c1e-7b44-4c1a-9d2e-0c5b8a6f1e22.txt",
            "report-2024.pdf",
            "doc42.txt",
            ".txt",
        ] {
            assert_eq!(title(&["text"], id), None, "{id}");
        }
        assert_eq!(
            title(&["text"], "dir/perf-timechart.txt").as_deref(),
            Some("perf timechart")
        );
        assert_eq!(title(&["text"], "README").as_deref(), Some("README"));
        assert_eq!(title(&["text"], &format!("{}.txt", "a".repeat(300))), None);
    }

    #[test]
    fn title_leads_every_chunk_but_the_one_that_starts_with_it() {
        let d = doc(&["Heart disease and diet\n\nFirst part.\n\nSecond part."]);
        let t = Title::of(&d, "MED-1.txt");
        assert_eq!(
            Title::apply(t.as_ref(), "Heart disease and diet\n\nFirst part."),
            "Heart disease and diet\n\nFirst part."
        );
        assert_eq!(
            Title::apply(t.as_ref(), "Second part."),
            "Heart disease and diet\nSecond part."
        );
        assert_eq!(Title::apply(None, "Second part."), "Second part.");
        // A file-name title has no line in the text: every chunk gets it.
        let named = Title::of(&doc(&["ls lists files"]), "ls-manual.txt");
        assert_eq!(
            Title::apply(named.as_ref(), "ls lists files"),
            "ls manual\nls lists files"
        );
    }

    #[test]
    fn title_search_reads_a_bounded_prefix_of_a_huge_line() {
        let huge = "x".repeat(5_000_000) + "\n\nbody";
        assert_eq!(title(&[&huge], "big-file.txt").as_deref(), Some("big file"));
        let multibyte = "é".repeat(1000) + "\n\nbody";
        assert_eq!(title(&[&multibyte], "1.txt"), None);
    }

    fn chars_at(text: &str, start: usize, len: usize) -> String {
        text.chars().skip(start).take(len).collect()
    }

    /// A small deterministic generator (no `rand` in tests' hot path, reproducible failures).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() as usize) % items.len()]
        }
    }

    fn generated_text(seed: u64, words: usize) -> String {
        let mut rng = Lcg(seed);
        let vocab = [
            "alpha",
            "beta",
            "gamma",
            "café",
            "naïve",
            "世界",
            "数据",
            "🦀",
            "x",
            "longerwordhere",
            "über",
            "ok.",
            "end.",
            "a,",
            "—",
            "e\u{301}",
        ];
        let seps = [" ", " ", " ", " ", "\n", "\n\n", "  ", "\t", " \n \n"];
        let mut out = String::new();
        for i in 0..words {
            match rng.next() % 40 {
                0 => out.push_str("\n# Title\n"),
                1 => out.push_str("\n## Section two\n"),
                2 => out.push_str("\n```\n# not a header\n```\n"),
                3 => out.push_str(&"z".repeat(300)),
                4 => out.push_str("\r\n"),
                _ => {}
            }
            out.push_str(rng.pick(&vocab));
            if i + 1 < words {
                out.push_str(rng.pick(&seps));
            }
        }
        out
    }

    /// The invariants every character-split result must satisfy.
    fn check_invariants(doc: &Document, cfg: &ChunkConfig, chunks: &[Chunk]) {
        // Pages of the generated documents have distinct numbers.
        for page in &doc.pages {
            let page_chunks: Vec<&Chunk> = chunks.iter().filter(|c| c.page == page.page).collect();
            // Indexable characters: comparing with `chars_at` per chunk is quadratic.
            let chars: Vec<char> = page.text.chars().collect();
            let mut covered = vec![false; chars.len()];
            let mut prev: Option<(usize, usize)> = None;
            for chunk in &page_chunks {
                let chunk_chars: Vec<char> = chunk.text.chars().collect();
                let len = chunk_chars.len();
                assert!(!chunk.text.trim().is_empty(), "empty chunk {chunk:?}");
                assert_eq!(chunk.text.trim(), chunk.text, "untrimmed {chunk:?}");
                assert!(len <= cfg.size, "{len} > {} in {chunk:?}", cfg.size);
                assert_eq!(
                    chars.get(chunk.start_index..chunk.start_index + len),
                    Some(chunk_chars.as_slice()),
                    "text differs at start_index {}",
                    chunk.start_index
                );
                if let Some((prev_start, prev_end)) = prev {
                    assert!(chunk.start_index > prev_start, "chunks out of order");
                    let overlap = prev_end.saturating_sub(chunk.start_index);
                    assert!(
                        overlap <= cfg.overlap,
                        "overlap {overlap} > {}",
                        cfg.overlap
                    );
                }
                prev = Some((chunk.start_index, chunk.start_index + len));
                covered[chunk.start_index..chunk.start_index + len].fill(true);
            }
            // Nothing but whitespace is lost.
            for (i, c) in chars.iter().enumerate() {
                assert!(
                    covered[i] || c.is_whitespace(),
                    "char {i} {c:?} not in any chunk"
                );
            }
        }
    }

    #[test]
    fn defaults_match_open_webui() {
        let cfg = ChunkConfig::default();
        assert_eq!(
            (cfg.size, cfg.overlap, cfg.markdown_headers),
            (1000, 100, true)
        );
        assert!(matches!(cfg.splitter, Splitter::Character));
        assert!(cfg.validate().is_ok());
        let bad = ChunkConfig {
            size: 100,
            overlap: 100,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err(),
            "chunk overlap (100) must be smaller than chunk size (100)"
        );
        let zero = ChunkConfig {
            size: 0,
            overlap: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        // Invalid settings do not panic.
        assert!(!split(&doc(&["some text"]), &bad).is_empty());
        assert!(!split(&doc(&["some text"]), &zero).is_empty());
    }

    #[test]
    fn header_sections_and_paths() {
        let text = "intro line\n\n# Intro\nhello\n## Setup\nsteps\n```sh\n# comment, not a header\n```\n### Deep\nx\n## Usage\nuse it\n# Next\n#hashtag is text\n    # indented code\nend";
        let sections = markdown_sections(text);
        let got: Vec<(&str, Vec<String>)> = sections
            .iter()
            .map(|s| (&text[s.start..s.end], s.headers.to_vec()))
            .collect();
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                ("intro line\n\n", h(&[])),
                ("# Intro\nhello\n", h(&["# Intro"])),
                (
                    "## Setup\nsteps\n```sh\n# comment, not a header\n```\n",
                    h(&["# Intro", "## Setup"])
                ),
                ("### Deep\nx\n", h(&["# Intro", "## Setup", "### Deep"])),
                ("## Usage\nuse it\n", h(&["# Intro", "## Usage"])),
                (
                    "# Next\n#hashtag is text\n    # indented code\nend",
                    h(&["# Next"])
                ),
            ]
        );
    }

    #[test]
    fn chunks_carry_headers_and_offsets() {
        let text = "# Intro\nhello world\n\n## Setup\nrun it";
        let chunks = split(&doc(&[text]), &ChunkConfig::default());
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].text, "# Intro\nhello world");
        assert_eq!(chunks[0].start_index, 0);
        assert_eq!(chunks[0].headers, vec!["# Intro"]);
        assert_eq!(chunks[1].text, "## Setup\nrun it");
        assert_eq!(chunks[1].start_index, 21);
        assert_eq!(chunks[1].headers, vec!["# Intro", "## Setup"]);

        let off = ChunkConfig {
            markdown_headers: false,
            ..Default::default()
        };
        let chunks = split(&doc(&[text]), &off);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, text);
        assert!(chunks[0].headers.is_empty());
    }

    #[test]
    fn start_index_counts_characters_not_bytes() {
        let text = "é".repeat(30) + "\n\n# Ünïcode\n" + &"数".repeat(10);
        let chunks = split(&doc(&[&text]), &ChunkConfig::default());
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].start_index, 32);
        assert_eq!(
            chars_at(&text, 32, chunks[1].text.chars().count()),
            chunks[1].text
        );
    }

    #[test]
    fn pages_are_chunked_separately() {
        let d = Document {
            pages: vec![
                Page {
                    text: "first page text".into(),
                    page: Some(1),
                },
                Page {
                    text: "   ".into(),
                    page: Some(2),
                },
                Page {
                    text: "third page".into(),
                    page: Some(3),
                },
            ],
            kind: "pdf",
        };
        let chunks = split(&d, &ChunkConfig::default());
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].page, chunks[0].start_index), (Some(1), 0));
        assert_eq!((chunks[1].page, chunks[1].start_index), (Some(3), 0));
        assert_eq!(chunks[1].text, "third page");
    }

    #[test]
    fn generated_texts_keep_invariants() {
        let configs = [(1000, 100), (50, 10), (20, 0), (7, 3), (200, 199), (1, 0)];
        // Kept small: small chunk sizes make text-splitter slow in debug builds.
        for seed in 0..6u64 {
            let words = 20 + (seed as usize * 53) % 250;
            let pages: Vec<Page> = (0..2)
                .map(|p| Page {
                    text: generated_text(seed * 2 + p, words),
                    page: Some(p as u32 + 1),
                })
                .collect();
            let d = Document { pages, kind: "pdf" };
            for (size, overlap) in configs {
                for markdown_headers in [true, false] {
                    let cfg = ChunkConfig {
                        size,
                        overlap,
                        markdown_headers,
                        splitter: Splitter::Character,
                    };
                    let chunks = split(&d, &cfg);
                    assert!(!chunks.is_empty());
                    check_invariants(&d, &cfg, &chunks);
                }
            }
        }
    }

    #[test]
    fn overlap_is_used_when_text_is_split_mid_paragraph() {
        let text = (0..200)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let cfg = ChunkConfig {
            size: 100,
            overlap: 30,
            ..Default::default()
        };
        let chunks = split(&doc(&[&text]), &cfg);
        assert!(chunks.len() > 10);
        let overlapping = chunks
            .windows(2)
            .filter(|w| w[0].start_index + w[0].text.chars().count() > w[1].start_index)
            .count();
        assert!(overlapping > 0, "no chunk overlaps its predecessor");
    }

    /// A word-level tokenizer: one token per word or punctuation run.
    fn word_tokenizer(truncate_to: Option<usize>) -> Arc<tokenizers::Tokenizer> {
        let truncation = match truncate_to {
            Some(n) => format!(
                r#"{{"direction":"Right","max_length":{n},"strategy":"LongestFirst","stride":0}}"#
            ),
            None => "null".to_owned(),
        };
        let json = format!(
            r#"{{"version":"1.0","truncation":{truncation},"padding":null,"added_tokens":[],
                "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,
                "decoder":null,"model":{{"type":"WordLevel","vocab":{{"[UNK]":0,"the":1}},
                "unk_token":"[UNK]"}}}}"#
        );
        Arc::new(tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap())
    }

    #[test]
    fn token_splitter_counts_tokens() {
        let text = (0..300)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
            + ".";
        for truncate_to in [None, Some(8)] {
            let tokenizer = word_tokenizer(truncate_to);
            let counter = TokenCounter::new(&tokenizer);
            assert_eq!(counter.size("the quick brown fox."), 5);
            let cfg = ChunkConfig {
                size: 50,
                overlap: 5,
                markdown_headers: true,
                splitter: Splitter::Token(tokenizer),
            };
            let chunks = split(&doc(&[&text]), &cfg);
            // 301 tokens in chunks of at most 50 with overlap: at least 7 chunks. With a
            // truncating counter every text would look like 8 tokens and make fewer, larger
            // chunks.
            assert!(chunks.len() >= 7, "{} chunks", chunks.len());
            for pair in chunks.windows(2) {
                let prev_end = pair[0].start_index + pair[0].text.chars().count();
                let shared: String = chars_at(
                    &text,
                    pair[1].start_index,
                    prev_end.saturating_sub(pair[1].start_index),
                );
                assert!(counter.size(&shared) <= 5, "overlap {shared:?}");
            }
            for chunk in &chunks {
                assert!(
                    counter.size(&chunk.text) <= 50,
                    "{} tokens",
                    counter.size(&chunk.text)
                );
                assert_eq!(
                    chars_at(&text, chunk.start_index, chunk.text.chars().count()),
                    chunk.text
                );
            }
        }
    }

    #[test]
    fn huge_header_line_is_truncated_in_every_chunk() {
        // Scaled down from the 20 MB line of the report (debug builds chunk slowly); the
        // release-binary test in tests/memory_extract.rs uploads the full size.
        let line = format!("# {}", "héader ".repeat(3000));
        let text = format!("{line}\n## {}\nbody", "x".repeat(5000));
        let chunks = split(&doc(&[&text]), &ChunkConfig::default());
        assert!(chunks.len() > 20, "{} chunks", chunks.len());
        for chunk in &chunks {
            let bytes: usize = chunk.headers.iter().map(String::len).sum();
            assert!(bytes <= MAX_HEADER_PATH_BYTES, "{bytes} header bytes");
            assert!(chunk.headers.iter().all(|h| h.len() <= MAX_HEADER_BYTES));
            assert!(chunk.headers[0].starts_with("# héader"));
        }
        let last = chunks.last().unwrap();
        assert_eq!(last.headers.len(), 2, "both levels fit in the path budget");
        assert_eq!(last.headers[1].len(), MAX_HEADER_BYTES);
    }

    #[test]
    fn windows_cut_long_text_at_separators() {
        let text = "aaaa bbbb\ncccc dddd eeee";
        let pieces: Vec<(usize, &str)> = windows(text, 12).collect();
        assert_eq!(
            pieces,
            vec![(0, "aaaa bbbb\n"), (10, "cccc dddd "), (20, "eeee")]
        );
        let solid = "é".repeat(20);
        let pieces: Vec<&str> = windows(&solid, 7).map(|(_, p)| p).collect();
        assert_eq!(pieces.concat(), solid);
        assert!(pieces.iter().all(|p| p.len() <= 7));
        // A long single line is chunked piecewise, offsets still exact.
        let line = format!("# {}", "word ".repeat(8_000));
        let cfg = ChunkConfig {
            size: 100,
            overlap: 10,
            ..Default::default()
        };
        let d = doc(&[&line]);
        let chunks = split(&d, &cfg);
        check_invariants(&d, &cfg, &chunks);
    }

    #[test]
    fn header_truncation_respects_char_boundaries() {
        let header = "é".repeat(MAX_HEADER_BYTES);
        let cut = truncate_header(&header);
        assert!(cut.len() <= MAX_HEADER_BYTES && cut.len() >= MAX_HEADER_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate_header("# short"), "# short");
        // Six long levels: the path keeps the outermost ones that fit.
        let text: String = (1..=6)
            .map(|l| format!("{} {}\n", "#".repeat(l), "y".repeat(1000)))
            .collect::<String>()
            + "text";
        let chunks = split(&doc(&[&text]), &ChunkConfig::default());
        let path = &chunks.last().unwrap().headers;
        assert_eq!(path.len(), MAX_HEADER_PATH_BYTES / MAX_HEADER_BYTES);
        assert!(path[0].starts_with("# y"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Markdown-ish lines: headers (some very long), fences, text, blank lines.
        fn markdownish() -> impl Strategy<Value = String> {
            let line = prop_oneof![
                "#{1,7}[ \t]?[a-zé世 ]{0,40}",
                "#{1,6} [x]{200,700}",
                "(```|~~~)[a-z]{0,5}",
                "[ ]{0,5}[a-zA-Z0-9 .,é世🦀]{0,80}",
                Just(String::new()),
                "\\PC{0,30}",
            ];
            proptest::collection::vec(line, 0..60).prop_map(|lines| lines.join("\n"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]

            #[test]
            fn chunk_output_is_linear_in_the_input(
                text in markdownish(),
                size in 20usize..400,
                overlap_pct in 0usize..50,
                markdown_headers in any::<bool>(),
            ) {
                let overlap = size * overlap_pct / 100;
                let cfg = ChunkConfig { size, overlap, markdown_headers, splitter: Splitter::Character };
                let d = doc(&[&text]);
                let chunks = split(&d, &cfg);
                let input = text.len();
                let text_bytes: usize = chunks.iter().map(|c| c.text.len()).sum();
                let header_bytes: usize =
                    chunks.iter().flat_map(|c| &c.headers).map(String::len).sum();
                // Overlap is under half a chunk, so each byte is in at most two chunks.
                prop_assert!(text_bytes <= 2 * input, "{text_bytes} > 2 x {input}");
                prop_assert!(chunks.len() <= input, "{} chunks for {input} bytes", chunks.len());
                prop_assert!(header_bytes <= MAX_HEADER_PATH_BYTES * chunks.len());
                for c in &chunks {
                    prop_assert!(c.headers.iter().all(|h| h.len() <= MAX_HEADER_BYTES));
                }
                if !chunks.is_empty() {
                    check_invariants(&d, &cfg, &chunks);
                }
            }

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}", size in 1usize..50) {
                let cfg = ChunkConfig { size, overlap: size / 3, ..Default::default() };
                let chunks = split(&doc(&[&text]), &cfg);
                prop_assert!(chunks.iter().map(|c| c.text.len()).sum::<usize>() <= 2 * text.len());
            }
        }
    }

    #[test]
    fn extracted_markdown_end_to_end() {
        let md = "# Guide\n\nIntro.\n\n## Install\n\n```\n# not a header\ncargo install\n```\n\n## Use\n\nRun it.\n";
        let d = crate::extract::extract(md.as_bytes(), "guide.md", None).unwrap();
        let chunks = split(&d, &ChunkConfig::default());
        let headers: Vec<Vec<String>> = chunks.iter().map(|c| c.headers.clone()).collect();
        assert_eq!(
            headers,
            vec![
                vec!["# Guide".to_owned()],
                vec!["# Guide".to_owned(), "## Install".to_owned()],
                vec!["# Guide".to_owned(), "## Use".to_owned()],
            ]
        );
        assert!(chunks[1].text.contains("# not a header\ncargo install"));
    }
}
