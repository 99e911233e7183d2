//! Crash-safe files for graph indexes, shared by every [`GraphKind`].
//!
//! A save writes two files: the graph itself (whatever the library dumps) as
//! `<name>.<random>.graph` beside `path`, and at `path` a small header: the kind, the
//! parameters, the ids, and the graph file's name, length and checksum. The header is
//! written last, to a temporary name and renamed, which is the commit point, so a crash at
//! any moment leaves the previous save or this one loadable; graph files of earlier saves
//! are deleted afterwards. A load verifies the header's checksum and the graph file's
//! length and checksum before any library parses it, so a torn or corrupt file is an
//! `io::Error`, never a panic or a graph with out-of-range links.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::{GraphKind, HnswParams};

/// What a saved graph declares about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub kind: GraphKind,
    pub dim: usize,
    pub params: HnswParams,
    /// Every id in the graph, strictly ascending.
    pub ids: Vec<u64>,
}

/// The saved header. All integers little-endian; the last 8 bytes are a checksum of the rest.
struct Header {
    meta: Meta,
    graph_name: String,
    graph_len: u64,
    graph_hash: u64,
}

fn magic(kind: GraphKind) -> &'static [u8; 8] {
    match kind {
        GraphKind::Hora => b"RGWHNSW1",
        GraphKind::Usearch => b"RGWUSRC1",
    }
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let m = &self.meta;
        let mut b = Vec::with_capacity(80 + m.ids.len() * 8 + self.graph_name.len());
        b.extend_from_slice(magic(m.kind));
        for x in [
            m.dim,
            m.params.m,
            m.params.ef_construction,
            m.params.ef_search,
        ] {
            b.extend_from_slice(&(x as u64).to_le_bytes());
        }
        b.extend_from_slice(&(m.ids.len() as u64).to_le_bytes());
        for id in &m.ids {
            b.extend_from_slice(&id.to_le_bytes());
        }
        b.extend_from_slice(&(self.graph_name.len() as u64).to_le_bytes());
        b.extend_from_slice(self.graph_name.as_bytes());
        b.extend_from_slice(&self.graph_len.to_le_bytes());
        b.extend_from_slice(&self.graph_hash.to_le_bytes());
        let mut sum = Checksum::new();
        sum.update(&b);
        b.extend_from_slice(&sum.finish().to_le_bytes());
        b
    }

    fn decode(bytes: &[u8], kind: GraphKind) -> io::Result<Header> {
        let bad = || invalid_data(format!("not a {kind} index header, or a corrupt one"));
        if bytes.len() < 16 || &bytes[..8] != magic(kind) {
            return Err(bad());
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        let mut sum = Checksum::new();
        sum.update(body);
        if sum.finish().to_le_bytes() != tail {
            return Err(bad());
        }
        let mut r = Reader(&body[8..]);
        let dim = r.u64()? as usize;
        let params = HnswParams {
            m: r.u64()? as usize,
            ef_construction: r.u64()? as usize,
            ef_search: r.u64()? as usize,
        };
        let count = r.u64()? as usize;
        if count > r.0.len() / 8 {
            return Err(bad());
        }
        let ids: Vec<u64> = (0..count).map(|_| r.u64()).collect::<io::Result<_>>()?;
        let name_len = r.u64()? as usize;
        let graph_name = String::from_utf8(r.take(name_len)?.to_vec()).map_err(|_| bad())?;
        let graph_len = r.u64()?;
        let graph_hash = r.u64()?;
        // The name is joined to the header's directory: it must stay a plain file name.
        let plain = !graph_name.is_empty()
            && !graph_name.starts_with('.')
            && !graph_name.contains(['/', '\\']);
        if !plain || !r.0.is_empty() || !ids.windows(2).all(|w| w[0] < w[1]) {
            return Err(bad());
        }
        Ok(Header {
            meta: Meta {
                kind,
                dim,
                params,
                ids,
            },
            graph_name,
            graph_len,
            graph_hash,
        })
    }
}

/// Saves a graph under `path`: `dump` writes the library's file to the path it is given
/// (and makes it durable); the header is committed after it.
pub(crate) fn save(
    path: &Path,
    meta: &Meta,
    dump: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let (dir, name) = split_path(path)?;
    let graph_name = format!("{name}.{:016x}.graph", rand::random::<u64>());
    let graph_tmp = dir.join(format!(".{graph_name}.tmp"));
    let graph_path = dir.join(&graph_name);
    let header_tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        dump(&graph_tmp)?;
        File::open(&graph_tmp)?.sync_all()?;
        let (graph_len, graph_hash) = file_checksum(&graph_tmp)?;
        fs::rename(&graph_tmp, &graph_path)?;
        let header = Header {
            meta: meta.clone(),
            graph_name: graph_name.clone(),
            graph_len,
            graph_hash,
        };
        let mut f = File::create(&header_tmp)?;
        f.write_all(&header.encode())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&header_tmp, path)?;
        // Makes the renames durable; some file systems refuse to sync a directory, and
        // losing a derived index in a crash only costs a rebuild.
        let _ = File::open(&dir).and_then(|d| d.sync_all());
        Ok(())
    })();
    match written {
        Ok(()) => {
            sweep_old_graphs(&dir, &name, &graph_name);
            Ok(())
        }
        Err(e) => {
            for p in [&graph_tmp, &graph_path, &header_tmp] {
                let _ = fs::remove_file(p);
            }
            Err(e)
        }
    }
}

/// Deletes a save (header and graph files); false if there was none.
pub(crate) fn remove(path: &Path) -> io::Result<bool> {
    let (dir, name) = split_path(path)?;
    let existed = match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    sweep_old_graphs(&dir, &name, "");
    Ok(existed)
}

/// Reads the header saved at `path` for a graph of `kind` and verifies the graph file it
/// names; returns what it declares and where the verified graph file is.
pub(crate) fn open(path: &Path, kind: GraphKind) -> io::Result<(Meta, PathBuf)> {
    let (dir, _) = split_path(path)?;
    let header = Header::decode(&fs::read(path)?, kind)?;
    let graph_path = dir.join(&header.graph_name);
    let (len, hash) = file_checksum(&graph_path)?;
    if len != header.graph_len || hash != header.graph_hash {
        return Err(invalid_data(format!(
            "{}: length or checksum does not match its header",
            graph_path.display()
        )));
    }
    Ok((header.meta, graph_path))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if n > self.0.len() {
            return Err(invalid_data("truncated graph index header"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// A fast 64-bit checksum (FNV-style multiply per 8-byte word, then the length): every step
/// is a bijection of the state, so any single changed word always changes the result. It
/// detects corruption and truncation, not tampering.
pub(crate) struct Checksum {
    h: u64,
    pending: [u8; 8],
    npending: usize,
    len: u64,
}

impl Checksum {
    pub(crate) fn new() -> Checksum {
        Checksum {
            h: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            npending: 0,
            len: 0,
        }
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.npending > 0 {
            let n = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + n].copy_from_slice(&data[..n]);
            self.npending += n;
            data = &data[n..];
            if self.npending < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let words = data.chunks_exact(8);
        let rest = words.remainder();
        for w in words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    pub(crate) fn finish(mut self) -> u64 {
        if self.npending > 0 {
            self.pending[self.npending..].fill(0);
            self.word(u64::from_le_bytes(self.pending));
        }
        self.word(self.len);
        self.h
    }
}

/// (length, checksum) of a file, streamed.
fn file_checksum(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = Checksum::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
    }
    Ok((sum.len, sum.finish()))
}

/// Parent directory (`.` for a bare name) and file name, which save and load derive the
/// graph file's location from.
fn split_path(path: &Path) -> io::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a UTF-8 file name", path.display()),
            )
        })?
        .to_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// hora takes paths as `&str`.
pub(crate) fn path_str(path: &Path) -> io::Result<&str> {
    path.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a UTF-8 path", path.display()),
        )
    })
}

/// Deletes graph files (and temporaries of interrupted saves) of earlier saves to the same
/// path. Best effort: a leftover file wastes disk, nothing more.
fn sweep_old_graphs(dir: &Path, name: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if file == keep {
            continue;
        }
        let stem = file.strip_prefix('.').unwrap_or(file);
        let nonce = stem
            .strip_prefix(name)
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| {
                s.strip_suffix(".graph")
                    .or_else(|| s.strip_suffix(".graph.tmp"))
                    .or_else(|| s.strip_suffix(".tmp"))
            });
        if nonce.is_some_and(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit())) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

pub(crate) fn invalid_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_independent_of_chunking() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut whole = Checksum::new();
        whole.update(&data);
        let whole = whole.finish();
        let mut parts = Checksum::new();
        for chunk in data.chunks(3) {
            parts.update(chunk);
        }
        assert_eq!(parts.finish(), whole);
        let mut shorter = Checksum::new();
        shorter.update(&data[..999]);
        assert_ne!(shorter.finish(), whole);
    }

    #[test]
    fn a_header_of_another_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g");
        let meta = Meta {
            kind: GraphKind::Usearch,
            dim: 3,
            params: HnswParams::default(),
            ids: vec![1, 5, 9],
        };
        save(&path, &meta, |p| fs::write(p, b"graph bytes")).unwrap();
        let (back, graph) = open(&path, GraphKind::Usearch).unwrap();
        assert_eq!(back, meta);
        assert_eq!(fs::read(&graph).unwrap(), b"graph bytes");
        assert!(open(&path, GraphKind::Hora).is_err());
        // A second save replaces the first and sweeps its graph file.
        save(&path, &meta, |p| fs::write(p, b"newer")).unwrap();
        let (_, graph2) = open(&path, GraphKind::Usearch).unwrap();
        assert!(!graph.exists());
        assert_eq!(fs::read(&graph2).unwrap(), b"newer");
        // A failed dump leaves the previous save intact and no temporaries.
        assert!(save(&path, &meta, |_| Err(io::Error::other("disk full"))).is_err());
        assert_eq!(open(&path, GraphKind::Usearch).unwrap().1, graph2);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert!(remove(&path).unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(!remove(&path).unwrap());
    }
}
