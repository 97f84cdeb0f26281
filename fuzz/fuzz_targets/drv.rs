//! A `.drv` file (ATerm) from the store directory: parsing never panics, and what
//! parses prints back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_nix::derivation::Derivation;

fuzz_target!(|data: &[u8]| {
    if let Ok(drv) = Derivation::parse(data) {
        let printed = drv.to_aterm();
        let again = Derivation::parse(&printed).expect("a printed derivation parses");
        assert_eq!(again, drv);
    }
});
