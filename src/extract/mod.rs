//! Text extraction from uploaded files.
//!
//! The counterpart of Open WebUI's local loaders (`retrieval/loaders/main.py`): the loader is
//! chosen by file extension, then by content type, and every loader returns plain text split
//! into [`Page`]s (one per PDF page, a single page otherwise). Extraction is CPU-bound and
//! synchronous; callers run [`extract`] on a blocking thread.
//!
//! | Extension | Loader (`Document::kind`) | Open WebUI equivalent |
//! |---|---|---|
//! | `.pdf` | `pdf`: text layer, one page each | `PyPDFLoader`, `mode=page` |
//! | `.docx` | `docx`: paragraphs, tabs, breaks, table rows | `Docx2txtLoader` |
//! | `.html`, `.htm`, `.xhtml` | `html`: visible text | `BSHTMLLoader` |
//! | `.md`, `.markdown`, … | `markdown`: as is | `TextLoader` |
//! | `.csv`, `.tsv` | `csv`: `column: value` lines, blank line between rows | `CSVLoader` |
//! | `.json`, `.ipynb`, … | `json`: pretty-printed, key order kept | `TextLoader` |
//! | `.xml`, `.rss`, … | `xml`: text nodes, one per line | Unstructured |
//! | `.txt`, code, config, no extension | `text`: encoding detected | `TextLoader(autodetect)` |
//!
//! Media, archives, executables and the Office formats we have no loader for (`.doc`, `.xlsx`,
//! `.pptx`, …) are rejected with [`ExtractError::Unsupported`], so an upload can be refused with
//! a 400 before it is stored ([`is_supported`]).

mod docx;
#[cfg(test)]
mod hostile_tests;
mod html;
pub mod isolate;
mod json;
pub mod limits;
mod pdf;
mod tabular;
mod text;
mod xml;

pub use docx::MAX_ZIP_MEMBERS;
pub use limits::Limits;

/// A page of extracted text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The text, with `\n` line endings.
    pub text: String,
    /// 1-based page number for PDFs; `None` for formats without pages.
    pub page: Option<u32>,
}

/// The text extracted from one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The pages, in order. PDFs keep blank pages so that numbering stays visible.
    pub pages: Vec<Page>,
    /// The loader used: `"pdf"`, `"docx"`, `"html"`, `"markdown"`, `"csv"`, `"json"`, `"xml"`
    /// or `"text"`.
    pub kind: &'static str,
}

impl Document {
    /// All pages joined with `"\n"` (the text stored as the file's content).
    pub fn full_text(&self) -> String {
        let mut out = String::with_capacity(self.pages.iter().map(|p| p.text.len() + 1).sum());
        for (i, page) in self.pages.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&page.text);
        }
        out
    }
}

/// Why a file yielded no text. The `Display` messages are meant for end users (they end up in
/// the file's `data.error`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// No loader for this type, e.g. `unsupported file type .exe`.
    #[error("unsupported file type {file_type}")]
    Unsupported {
        /// `.ext` when the name has one, else the content type.
        file_type: String,
    },
    /// A file that should hold text holds binary data (NUL or control bytes).
    #[error("{file_type} file contains binary data, not text")]
    Binary {
        /// `.ext` when the name has one, else `the`.
        file_type: String,
    },
    /// The file is damaged or is not what its name says; `message` says what is wrong, e.g.
    /// `DOCX is not a valid ZIP archive: …` or `invalid JSON: …`.
    #[error("{message}")]
    Corrupt {
        /// The loader that failed.
        kind: &'static str,
        /// The full user-facing message.
        message: String,
    },
    /// A PDF that needs a password to open.
    #[error("PDF is password-protected")]
    Encrypted,
    /// A PDF whose pages carry no text (typically scanned images; we do no OCR).
    #[error("PDF has no text layer (scanned images?)")]
    NoTextLayer,
    /// A decompression bomb: a stream or archive member inflates beyond [`Limits`], e.g.
    /// `PDF stream inflates beyond the limit of 100 MiB`.
    #[error("{message}")]
    TooLarge {
        /// The loader that stopped.
        kind: &'static str,
        /// The full user-facing message.
        message: String,
    },
    /// Nothing to index: `None` for a zero-byte file, else the loader that found no text.
    #[error("{}", empty_message(*.kind))]
    Empty {
        /// The loader, or `None` when the file has no bytes at all.
        kind: Option<&'static str>,
    },
}

fn empty_message(kind: Option<&'static str>) -> String {
    match kind {
        None => "file is empty".to_owned(),
        Some("text") | Some("markdown") => "file contains only whitespace".to_owned(),
        Some(kind) => format!("no text found in the {} file", label(kind)),
    }
}

/// How a loader is named in messages.
fn label(kind: &str) -> &str {
    match kind {
        "pdf" => "PDF",
        "docx" => "DOCX",
        "html" => "HTML",
        "csv" => "CSV",
        "json" => "JSON",
        "xml" => "XML",
        "markdown" => "Markdown",
        other => other,
    }
}

impl ExtractError {
    pub(crate) fn corrupt(kind: &'static str, message: impl Into<String>) -> Self {
        Self::Corrupt {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loader {
    Pdf,
    Docx,
    Html,
    Markdown,
    Csv,
    Tsv,
    Json,
    Xml,
    Text,
}

impl Loader {
    fn kind(self) -> &'static str {
        match self {
            Loader::Pdf => "pdf",
            Loader::Docx => "docx",
            Loader::Html => "html",
            Loader::Markdown => "markdown",
            Loader::Csv | Loader::Tsv => "csv",
            Loader::Json => "json",
            Loader::Xml => "xml",
            Loader::Text => "text",
        }
    }
}

/// Plain-text and source-code extensions read by the text loader.
#[rustfmt::skip] // grouped by family, one family per line
const TEXT_EXTENSIONS: &[&str] = &[
    // prose, logs, subtitles
    "txt", "text", "rst", "log", "out", "nfo", "org", "adoc", "asciidoc", "textile", "tex",
    "bib", "srt", "vtt", "diff", "patch", "jsonl", "ndjson",
    // code
    "py", "pyi", "pyw", "rs", "js", "mjs", "cjs", "jsx", "ts", "mts", "cts", "tsx", "go",
    "java", "kt", "kts", "scala", "sc", "groovy", "gradle", "swift", "c", "h", "cc", "cpp",
    "cxx", "c++", "hh", "hpp", "hxx", "inl", "m", "mm", "cs", "fs", "fsx", "vb", "rb", "php",
    "pl", "pm", "lua", "r", "jl", "hs", "lhs", "ml", "mli", "ex", "exs", "erl", "hrl", "clj",
    "cljs", "edn", "el", "lisp", "scm", "rkt", "dart", "zig", "nim", "v", "sv", "vhd", "vhdl",
    "asm", "s", "sol", "wgsl", "glsl", "hlsl", "cu", "f", "f90", "for", "pas", "d", "cob",
    "ada", "adb", "ads", "awk", "sed", "tcl",
    // shell and scripts
    "sh", "bash", "zsh", "fish", "ksh", "ps1", "psm1", "bat", "cmd",
    // web
    "css", "scss", "sass", "less", "vue", "svelte", "astro", "graphql", "gql", "proto",
    "thrift", "avsc",
    // config and build
    "yaml", "yml", "toml", "ini", "cfg", "conf", "config", "env", "properties", "props", "lock",
    "sql", "ddl", "hcl", "tf", "tfvars", "nix", "dockerfile", "containerfile", "mk", "make",
    "cmake", "bazel", "bzl", "gitignore", "gitattributes", "editorconfig", "csproj", "sln",
];

/// Extensions we never read as text, whatever the content type says, so the user gets
/// "unsupported file type .png" rather than "contains binary data".
#[rustfmt::skip] // grouped by family, one family per line
const REJECTED_EXTENSIONS: &[&str] = &[
    // images
    "png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff", "ico", "icns", "heic", "heif",
    "avif", "svg", "psd", "raw", "cr2", "nef",
    // audio
    "mp3", "wav", "ogg", "oga", "flac", "m4a", "aac", "opus", "wma", "aiff", "mid", "midi",
    // video
    "mp4", "m4v", "mkv", "avi", "mov", "webm", "wmv", "flv", "mpg", "mpeg", "3gp",
    // archives and disk images
    "zip", "tar", "gz", "tgz", "bz2", "tbz2", "xz", "txz", "7z", "rar", "zst", "lz", "lz4",
    "cab", "iso", "img", "dmg", "vmdk",
    // executables and binaries
    "exe", "dll", "so", "dylib", "bin", "msi", "deb", "rpm", "apk", "ipa", "jar", "war",
    "class", "pyc", "pyo", "o", "obj", "a", "lib", "wasm", "elf", "com",
    // data stores and model files
    "db", "sqlite", "sqlite3", "mdb", "accdb", "parquet", "avro", "pkl", "pickle", "npy",
    "npz", "h5", "onnx", "safetensors", "gguf", "pt",
    // office formats without a loader here
    "doc", "dot", "docm", "dotx", "xls", "xlsx", "xlsm", "xlsb", "ods", "ppt", "pptx", "pps",
    "ppsx", "odp", "odt", "rtf", "epub", "mobi", "msg", "eml", "pages", "numbers", "key",
    // fonts
    "ttf", "otf", "woff", "woff2", "eot",
];

fn loader_for_extension(ext: &str) -> Option<Loader> {
    Some(match ext {
        "pdf" => Loader::Pdf,
        "docx" => Loader::Docx,
        "html" | "htm" | "xhtml" | "shtml" => Loader::Html,
        "md" | "markdown" | "mdx" | "mkd" | "mdown" | "mkdn" => Loader::Markdown,
        "csv" => Loader::Csv,
        "tsv" | "tab" => Loader::Tsv,
        "json" | "ipynb" | "geojson" | "webmanifest" => Loader::Json,
        "xml" | "xsd" | "xsl" | "xslt" | "rss" | "atom" | "opml" | "kml" | "gpx" | "xlf"
        | "xliff" | "resx" | "plist" => Loader::Xml,
        _ if TEXT_EXTENSIONS.contains(&ext) => Loader::Text,
        _ => return None,
    })
}

fn loader_for_content_type(content_type: &str) -> Option<Loader> {
    // Parameters such as `; charset=utf-8` do not change the loader; the charset is detected
    // from the bytes, as Open WebUI's `TextLoader(autodetect_encoding=True)` does.
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Some(match essence.as_str() {
        "application/pdf" => Loader::Pdf,
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => Loader::Docx,
        "text/html" | "application/xhtml+xml" => Loader::Html,
        "text/markdown" | "text/x-markdown" => Loader::Markdown,
        "text/csv" => Loader::Csv,
        "text/tab-separated-values" => Loader::Tsv,
        "application/json" => Loader::Json,
        "application/xml" | "text/xml" => Loader::Xml,
        "image/svg+xml" => return None,
        "application/javascript"
        | "application/x-javascript"
        | "application/ecmascript"
        | "application/typescript"
        | "application/x-sh"
        | "application/x-shellscript"
        | "application/x-yaml"
        | "application/yaml"
        | "application/toml"
        | "application/sql"
        | "application/x-tex"
        | "application/x-latex"
        | "application/x-python"
        | "application/x-python-code"
        | "application/x-ndjson"
        | "application/jsonl" => Loader::Text,
        e if e.starts_with("text/") => Loader::Text,
        e if e.ends_with("+json") => Loader::Json,
        e if e.ends_with("+xml") => Loader::Xml,
        _ => return None,
    })
}

/// The extension of the file name, lower-cased, if it has one. Browsers on Windows may send
/// full paths, so both separators are honoured; a leading dot (`.bashrc`) is not an extension.
fn extension(filename: &str) -> Option<String> {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let (stem, ext) = base.rsplit_once('.')?;
    if stem.is_empty() || ext.is_empty() {
        return None;
    }
    Some(ext.to_ascii_lowercase())
}

fn is_generic_content_type(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(ct) => {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.is_empty() || essence.eq_ignore_ascii_case("application/octet-stream")
        }
    }
}

fn choose_loader(filename: &str, content_type: Option<&str>) -> Result<Loader, ExtractError> {
    let ext = extension(filename);
    if let Some(ext) = &ext {
        if let Some(loader) = loader_for_extension(ext) {
            return Ok(loader);
        }
        if REJECTED_EXTENSIONS.contains(&ext.as_str()) {
            return Err(ExtractError::Unsupported {
                file_type: format!(".{ext}"),
            });
        }
    }
    if let Some(loader) = content_type.and_then(loader_for_content_type) {
        return Ok(loader);
    }
    match ext {
        Some(ext) => Err(ExtractError::Unsupported {
            file_type: format!(".{ext}"),
        }),
        // Extension-less names are mostly text (`Makefile`, `LICENSE`, `Dockerfile`); the
        // binary check in the text loader catches the rest.
        None if is_generic_content_type(content_type) => Ok(Loader::Text),
        None => Err(ExtractError::Unsupported {
            file_type: content_type.unwrap_or_default().trim().to_owned(),
        }),
    }
}

/// Whether [`extract`] has a loader for this file, judged by its name and content type only.
/// Use it to answer 400 before storing an upload; `extract` may still fail on the content.
pub fn is_supported(filename: &str, content_type: Option<&str>) -> bool {
    choose_loader(filename, content_type).is_ok()
}

/// Whether extracting this file runs a parser that belongs in a child process (see
/// [`isolate`]). Plain text and Markdown do not: their loader decodes the bytes once
/// (`encoding_rs`, `chardetng`: linear time, no recursion, no inflation) into a text at most
/// three times the upload's size, the same text the gateway then holds and chunks in process
/// whichever way it was extracted. Unsupported files fail before reading a byte.
pub fn needs_isolation(filename: &str, content_type: Option<&str>) -> bool {
    !matches!(
        choose_loader(filename, content_type),
        Ok(Loader::Text | Loader::Markdown) | Err(_)
    )
}

/// Extracts the text of a file.
///
/// The loader is chosen by extension, then content type (see the module docs). Line endings
/// are normalised to `\n` and NUL characters removed. Errors carry user-facing messages.
///
/// Blocking and CPU-bound: run it on a blocking thread. Never panics on bad input (PDF parser
/// panics are caught and reported as [`ExtractError::Corrupt`]).
pub fn extract(
    bytes: &[u8],
    filename: &str,
    content_type: Option<&str>,
) -> Result<Document, ExtractError> {
    extract_with(bytes, filename, content_type, &Limits::default())
}

/// [`extract`] with explicit decompression limits (see [`Limits`]): a PDF stream or DOCX
/// member inflating beyond them fails with [`ExtractError::TooLarge`].
pub fn extract_with(
    bytes: &[u8],
    filename: &str,
    content_type: Option<&str>,
    limits: &Limits,
) -> Result<Document, ExtractError> {
    let loader = choose_loader(filename, content_type)?;
    if bytes.is_empty() {
        return Err(ExtractError::Empty { kind: None });
    }
    let file_type = match extension(filename) {
        Some(ext) => format!(".{ext}"),
        None => "the".to_owned(),
    };
    let pages = match loader {
        Loader::Pdf => pdf::extract(bytes, limits)?,
        Loader::Docx => single(docx::extract(bytes, limits)?),
        Loader::Html => single(html::extract(&text::decode(bytes, &file_type)?)),
        Loader::Markdown | Loader::Text => single(text::decode(bytes, &file_type)?),
        Loader::Csv => single(tabular::extract(
            &text::decode(bytes, &file_type)?,
            None,
            limits.max_total_bytes,
        )?),
        Loader::Tsv => single(tabular::extract(
            &text::decode(bytes, &file_type)?,
            Some(b'\t'),
            limits.max_total_bytes,
        )?),
        Loader::Json => single(json::extract(
            &text::decode(bytes, &file_type)?,
            limits.max_total_bytes,
        )?),
        Loader::Xml => single(xml::extract(&text::decode(bytes, &file_type)?)?),
    };
    let pages: Vec<Page> = pages
        .into_iter()
        .map(|p| Page {
            text: normalize(&p.text),
            page: p.page,
        })
        .collect();
    let kind = loader.kind();
    if pages.iter().all(|p| p.text.trim().is_empty()) {
        return Err(match loader {
            Loader::Pdf => ExtractError::NoTextLayer,
            _ => ExtractError::Empty { kind: Some(kind) },
        });
    }
    Ok(Document { pages, kind })
}

fn single(text: String) -> Vec<Page> {
    vec![Page { text, page: None }]
}

/// `\r\n` and lone `\r` become `\n`; NULs (never meaningful in text, and rejected by some
/// stores) are dropped.
fn normalize(text: &str) -> String {
    if !text.contains(['\r', '\0']) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\0' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_by_extension_then_content_type() {
        assert_eq!(choose_loader("a.PDF", None).unwrap(), Loader::Pdf);
        assert_eq!(choose_loader("C:\\x\\y.docx", None).unwrap(), Loader::Docx);
        assert_eq!(
            choose_loader("page.htm", Some("text/plain")).unwrap(),
            Loader::Html
        );
        assert_eq!(choose_loader("main.rs", None).unwrap(), Loader::Text);
        assert_eq!(choose_loader("README.md", None).unwrap(), Loader::Markdown);
        assert_eq!(
            choose_loader("notes.weird", Some("text/plain; charset=utf-8")).unwrap(),
            Loader::Text
        );
        assert_eq!(
            choose_loader("download", Some("application/pdf")).unwrap(),
            Loader::Pdf
        );
        assert_eq!(choose_loader("Makefile", None).unwrap(), Loader::Text);
        assert_eq!(choose_loader(".bashrc", None).unwrap(), Loader::Text);
    }

    #[test]
    fn unsupported_types_name_the_extension() {
        for (name, ct, want) in [
            ("setup.exe", None, "unsupported file type .exe"),
            (
                "photo.JPG",
                Some("image/jpeg"),
                "unsupported file type .jpg",
            ),
            // A lying text content type does not turn an image into text.
            (
                "photo.png",
                Some("text/plain"),
                "unsupported file type .png",
            ),
            ("data.xlsx", None, "unsupported file type .xlsx"),
            (
                "blob.qqq",
                Some("application/octet-stream"),
                "unsupported file type .qqq",
            ),
            ("blob", Some("image/png"), "unsupported file type image/png"),
        ] {
            let err = extract(b"abc", name, ct).unwrap_err();
            assert!(matches!(err, ExtractError::Unsupported { .. }), "{name}");
            assert_eq!(err.to_string(), want);
            assert!(!is_supported(name, ct), "{name}");
        }
        assert!(is_supported("a.txt", None));
        assert!(is_supported("a", Some("text/x-whatever")));
    }

    #[test]
    fn empty_file_rejected() {
        let err = extract(b"", "a.txt", None).unwrap_err();
        assert!(matches!(err, ExtractError::Empty { kind: None }));
        assert_eq!(err.to_string(), "file is empty");
        let err = extract(b" \r\n\t ", "a.txt", None).unwrap_err();
        assert!(matches!(err, ExtractError::Empty { kind: Some("text") }));
        let err = extract(b"<html><script>x()</script></html>", "a.html", None).unwrap_err();
        assert_eq!(err.to_string(), "no text found in the HTML file");
    }

    #[test]
    fn crlf_normalised() {
        let doc = extract(b"a\r\nb\rc\r\n\r\nd", "a.txt", None).unwrap();
        assert_eq!(doc.full_text(), "a\nb\nc\n\nd");
        // NULs cannot come from the text loader (they mean binary) but can from PDF fonts.
        assert_eq!(normalize("x\0y\r"), "xy\n");
        assert_eq!(doc.kind, "text");
        assert_eq!(doc.pages[0].page, None);
    }

    #[test]
    fn markdown_kept_as_is() {
        let md = "# Title\n\n* item\n\n```rust\nfn main() {}\n```\n";
        let doc = extract(md.as_bytes(), "x.md", None).unwrap();
        assert_eq!(doc.kind, "markdown");
        assert_eq!(doc.full_text(), md);
    }

    #[test]
    fn full_text_joins_pages() {
        let doc = Document {
            pages: vec![
                Page {
                    text: "one".into(),
                    page: Some(1),
                },
                Page {
                    text: "two".into(),
                    page: Some(2),
                },
            ],
            kind: "pdf",
        };
        assert_eq!(doc.full_text(), "one\ntwo");
    }
}
