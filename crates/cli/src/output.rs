//! stdout carries data only (output paths, one per line); everything else goes to
//! stderr. A closed pipe (`offload build … | head -1`) is not an error.

use std::io::Write as _;

/// Writes `text` to stdout, ignoring a broken pipe.
pub fn stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Whether stderr is a terminal that can redraw (not `TERM=dumb`): where the live view
/// and colour may go.
pub fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}
