//! How errors look: an `error:` line, a `Caused by:` line per source, then a hint after
//! a blank line when offload knows the next step. Plain text, readable without colour.

use offload_driver::job::JobError;
use offload_driver::process::ProcessError;
use offload_driver::DriverError;

/// Prints `err` on stderr.
pub fn error(err: &anyhow::Error) {
    eprint!("{}", format(err));
}

/// The text [`error`] prints.
pub fn format(err: &anyhow::Error) -> String {
    let mut out = format!("error: {err}\n");
    let mut hint = None;
    for cause in err.chain().skip(1) {
        out.push_str(&format!("  Caused by: {}\n", indent(&cause.to_string())));
    }
    for cause in err.chain() {
        if let Some(j) = cause.downcast_ref::<JobError>() {
            hint = hint.or_else(|| j.hint());
        }
        if let Some(d) = cause.downcast_ref::<DriverError>() {
            hint = hint.or_else(|| d.hint());
        }
        if let Some(p) = cause.downcast_ref::<ProcessError>() {
            hint = hint.or_else(|| p.hint());
        }
    }
    if let Some(hint) = hint {
        out.push_str(&format!("\nhint: {hint}\n"));
    }
    out
}

fn indent(s: &str) -> String {
    s.replace('\n', "\n    ")
}
