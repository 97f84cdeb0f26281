//! The machines of Nix's `builders` setting that offload can use. Nix's own hook skips
//! a machine it cannot connect to and goes on with the others; so does offload's, and
//! a machine whose line it cannot use (a `remote-program` it cannot drive, a store it
//! cannot reach) is skipped with a warning instead of costing the whole setting.

use offload_nix::machines::parse_builders;

use crate::ssh::Endpoint;

/// How deep `@file` includes may nest (as the machines parser allows).
const MAX_DEPTH: usize = 8;

/// `spec` (Nix's syntax: machines separated by `;` or newlines, `@file` includes) with
/// only the machines offload can use, one per line, and why each other one is skipped.
pub(crate) fn usable(spec: &str, system: &str) -> (String, Vec<String>) {
    let mut kept = Vec::new();
    let mut skipped = Vec::new();
    collect(spec, system, 0, &mut kept, &mut skipped);
    (kept.join("\n"), skipped)
}

fn collect(
    spec: &str,
    system: &str,
    depth: usize,
    kept: &mut Vec<String>,
    skipped: &mut Vec<String>,
) {
    for piece in spec.split(['\n', ';']) {
        let text = piece.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        if let Some(file) = text.strip_prefix('@') {
            let file = file.trim();
            if depth >= MAX_DEPTH {
                skipped.push(format!("@{file}: included more than {MAX_DEPTH} deep"));
                continue;
            }
            match std::fs::read_to_string(file) {
                Ok(contents) => collect(&contents, system, depth + 1, kept, skipped),
                // A missing machines file has no machines, as for Nix.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => skipped.push(format!("cannot read the machines file {file}: {e}")),
            }
            continue;
        }
        let checked = parse_builders(text, "builders", system)
            .map_err(|e| error_chain(&e))
            .and_then(|machines| {
                machines
                    .iter()
                    .try_for_each(|m| Endpoint::parse(&m.uri).map(drop))
                    .map_err(|e| error_chain(&e))
            });
        match checked {
            Ok(()) => kept.push(text.to_string()),
            Err(why) => skipped.push(format!("machine `{text}` is skipped: {why}")),
        }
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_offload_cannot_drive_is_skipped_and_the_others_kept() {
        let spec = "https://cache.example x86_64-linux - 1 1; \
                    ssh://b2 x86_64-linux - 2 1 # a comment\n/tmp/store - - 1 1 bar";
        let (kept, skipped) = usable(spec, "x86_64-linux");
        assert_eq!(kept, "ssh://b2 x86_64-linux - 2 1\n/tmp/store - - 1 1 bar");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("https://cache.example"), "{skipped:?}");
    }
}
