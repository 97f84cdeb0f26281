//! Writing the NAR of a file tree, streaming: memory stays bounded by one read buffer
//! whatever the size of the tree.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{NarError, NAR_MAGIC};
use crate::wire::padding_len;

/// Bytes read from a file at a time.
const CHUNK: usize = 1 << 20;

struct Out<'w, W: Write> {
    w: &'w mut W,
    written: u64,
}

impl<W: Write> Out<'_, W> {
    fn raw(&mut self, bytes: &[u8], path: &Path) -> Result<(), NarError> {
        self.w.write_all(bytes).map_err(|source| NarError::Io {
            path: path.display().to_string(),
            op: "writing its NAR",
            source,
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn token(&mut self, bytes: &[u8], path: &Path) -> Result<(), NarError> {
        // Header, body and padding in one write: small tokens are most of a NAR's writes.
        let mut frame = [0u8; 8 + 32];
        let pad = padding_len(bytes.len() as u64);
        if bytes.len() + pad <= 32 {
            frame[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            frame[8..8 + bytes.len()].copy_from_slice(bytes);
            return self.raw(&frame[..8 + bytes.len() + pad], path);
        }
        self.raw(&(bytes.len() as u64).to_le_bytes(), path)?;
        self.raw(bytes, path)?;
        self.raw(&[0u8; 8][..pad], path)
    }
}

/// Writes the NAR of `path` (a file, directory or symlink) to `out`; returns its size.
pub fn dump_path(path: &Path, out: &mut impl Write) -> Result<u64, NarError> {
    let mut out = Out { w: out, written: 0 };
    let mut buf = vec![0u8; CHUNK];
    out.token(NAR_MAGIC, path)?;
    dump_node(path, &mut out, &mut buf)?;
    Ok(out.written)
}

/// The NAR of a single regular file with `contents`, built in memory (for small files).
pub fn regular_file_nar(contents: &[u8], executable: bool) -> Vec<u8> {
    let mut nar = Vec::with_capacity(contents.len() + 128);
    let mut out = Out {
        w: &mut nar,
        written: 0,
    };
    let here = Path::new("(in memory)");
    let mut tokens: Vec<&[u8]> = vec![NAR_MAGIC, b"(", b"type", b"regular"];
    if executable {
        tokens.extend([b"executable".as_slice(), b""]);
    }
    tokens.extend([b"contents".as_slice(), contents, b")"]);
    for token in tokens {
        // Writing to a Vec cannot fail.
        let _ = out.token(token, here);
    }
    nar
}

/// The size and SHA-256 of the NAR of `path` (its `narSize` and `narHash`).
pub fn dump_path_hashed(path: &Path) -> Result<(u64, [u8; 32]), NarError> {
    struct HashWriter(Sha256);
    impl Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Sha256::new());
    let size = dump_path(path, &mut w)?;
    Ok((size, w.0.finalize().into()))
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> NarError {
    let path = path.display().to_string();
    move |source| NarError::Io { path, op, source }
}

fn dump_node<W: Write>(path: &Path, out: &mut Out<'_, W>, buf: &mut [u8]) -> Result<(), NarError> {
    let meta = fs::symlink_metadata(path).map_err(io(path, "reading its metadata"))?;
    out.token(b"(", path)?;
    out.token(b"type", path)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(path).map_err(io(path, "reading the link"))?;
        out.token(b"symlink", path)?;
        out.token(b"target", path)?;
        out.token(target.as_os_str().as_encoded_bytes(), path)?;
    } else if kind.is_file() {
        out.token(b"regular", path)?;
        if meta.permissions().mode() & 0o100 != 0 {
            out.token(b"executable", path)?;
            out.token(b"", path)?;
        }
        out.token(b"contents", path)?;
        let size = meta.len();
        out.raw(&size.to_le_bytes(), path)?;
        let mut file = fs::File::open(path).map_err(io(path, "opening"))?;
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = file.read(&mut buf[..want]).map_err(io(path, "reading"))?;
            if n == 0 {
                return Err(NarError::Io {
                    path: path.display().to_string(),
                    op: "reading (the file shrank while being archived)",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            out.raw(&buf[..n], path)?;
            left -= n as u64;
        }
        out.raw(&[0u8; 8][..padding_len(size)], path)?;
    } else if kind.is_dir() {
        out.token(b"directory", path)?;
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(io(path, "listing"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(path, "listing"))?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let child = path.join(&name);
            out.token(b"entry", path)?;
            out.token(b"(", path)?;
            out.token(b"name", path)?;
            out.token(name.as_encoded_bytes(), path)?;
            out.token(b"node", path)?;
            dump_node(&child, out, buf)?;
            out.token(b")", path)?;
        }
    } else {
        return Err(NarError::UnsupportedFile {
            path: path.display().to_string(),
        });
    }
    out.token(b")", path)
}
