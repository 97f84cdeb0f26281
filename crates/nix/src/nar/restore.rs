//! Unpacking a NAR into a file tree, as `nix-store --restore` does.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{NarDecoder, NarError, NarEvent};

/// Bytes read from the stream at a time.
const CHUNK: usize = 1 << 20;

/// Unpacks the NAR read from `r` at `dest`, which must not exist. Returns the NAR's
/// size. On error the partial tree is left in place for the caller to remove.
pub fn restore(r: &mut impl Read, dest: &Path) -> Result<u64, NarError> {
    let mut decoder = NarDecoder::new();
    let mut buf = vec![0u8; CHUNK];
    // The path of the node the next event is about, and the open file if any.
    let mut current: PathBuf = dest.to_path_buf();
    let mut file: Option<(fs::File, bool)> = None;
    let io = |path: &Path, op: &'static str| {
        let path = path.display().to_string();
        move |source| NarError::Io { path, op, source }
    };
    while !decoder.is_done() {
        let n = r.read(&mut buf).map_err(io(dest, "reading the NAR"))?;
        if n == 0 {
            return Err(NarError::Eof {
                offset: decoder.offset(),
            });
        }
        let mut pos = 0;
        while pos < n && !decoder.is_done() {
            let (used, event) = decoder.feed(&buf[pos..n])?;
            pos += used;
            let Some(event) = event else { continue };
            match event {
                NarEvent::Regular { executable, .. } => {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&current)
                        .map_err(io(&current, "creating"))?;
                    file = Some((f, executable));
                }
                NarEvent::Contents(bytes) => {
                    if let Some((f, _)) = &mut file {
                        f.write_all(bytes).map_err(io(&current, "writing"))?;
                    }
                }
                NarEvent::RegularEnd => {
                    if let Some((f, executable)) = file.take() {
                        if executable {
                            let mode = f
                                .metadata()
                                .map_err(io(&current, "reading its mode"))?
                                .permissions()
                                .mode();
                            f.set_permissions(fs::Permissions::from_mode(mode | 0o111))
                                .map_err(io(&current, "making it executable"))?;
                        }
                    }
                }
                NarEvent::Symlink { target } => {
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &current)
                        .map_err(io(&current, "creating the symlink"))?;
                }
                NarEvent::DirectoryStart => {
                    fs::create_dir(&current).map_err(io(&current, "creating the directory"))?;
                }
                NarEvent::Entry { name } => {
                    current.push(std::ffi::OsStr::from_bytes(&name));
                }
                NarEvent::EntryEnd => {
                    current.pop();
                }
                NarEvent::DirectoryEnd => {}
            }
        }
    }
    Ok(decoder.offset())
}
