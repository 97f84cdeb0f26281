//! An export stream (`nix-store --export`, ExportPaths): reading never panics, and the
//! NARs written out add up to the sizes reported.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_nix::export::read_export;

fuzz_target!(|data: &[u8]| {
    let mut nars = Vec::new();
    if let Ok(paths) = read_export(&mut &data[..], &mut nars) {
        let total: u64 = paths.iter().map(|p| p.nar.size).sum();
        assert_eq!(total as usize, nars.len());
    }
});
