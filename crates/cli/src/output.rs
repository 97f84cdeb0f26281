//! stdout carries data only (output paths, one per line); everything else goes to
//! stderr. A closed pipe (`offload build … | head -1`) is not an error.

use std::io::Write as _;

/// Writes `text` to stdout, ignoring a broken pipe.
pub fn stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
