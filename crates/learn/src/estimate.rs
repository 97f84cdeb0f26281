//! What a derivation's estimate rests on, and the name it is known by across versions.

/// Estimate for a derivation nothing is known about.
pub const DEFAULT_SECONDS: f64 = offload_sched::DEFAULT_ESTIMATE_SECONDS;

/// Where an estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateSource {
    /// Earlier builds of the same name.
    Exact,
    /// Earlier builds of the same package at another version.
    OtherVersion,
    /// Nothing known: [`DEFAULT_SECONDS`].
    Default,
}

/// A derivation name without its version: everything before the first `-` that is
/// followed by a digit, as Nix's `parseDrvName` splits `hello-2.12.1`.
pub fn package_name(name: &str) -> &str {
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return &name[..i];
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_drop_versions() {
        assert_eq!(package_name("hello-2.12.1"), "hello");
        assert_eq!(package_name("python3.11-numpy-1.26"), "python3.11-numpy");
        assert_eq!(package_name("source"), "source");
        assert_eq!(package_name("gcc-wrapper-13"), "gcc-wrapper");
    }
}
