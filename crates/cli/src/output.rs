//! stdout carries data only (output paths, one per line); everything else goes to
//! stderr. A closed pipe (`offload build … | head -1`) is not an error. The terminal
//! variables (`TERM`, `NO_COLOR`) are read here; the others in `offload_driver::env`.

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

/// Whether stderr may be coloured: a terminal that can redraw, and `NO_COLOR` unset or
/// empty, so that a redirected log stays plain text.
pub fn stderr_in_colour() -> bool {
    stderr_is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
