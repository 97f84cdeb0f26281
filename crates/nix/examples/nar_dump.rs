//! `nar_dump PATH`: writes the NAR of PATH to stdout, like `nix-store --dump PATH`.
//! Used by scripts/bench-nar-dump.sh to compare the two.

use std::io::{BufWriter, Write};

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: nar_dump PATH");
        return std::process::ExitCode::from(2);
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let result = offload_nix::nar::dump_path(std::path::Path::new(&path), &mut out)
        .map_err(|e| e.to_string())
        .and_then(|_| out.flush().map_err(|e| e.to_string()));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
