//! Machines files and the `builders` setting, read exactly as Nix 2.8 reads them
//! (`src/libstore/machines.cc`):
//!
//! - the text splits into machines on newlines and `;`; each piece is trimmed, anything
//!   from `#` on is a comment, empty pieces are skipped;
//! - a piece `@FILE` includes that file, parsed the same way (a missing file is
//!   skipped, as Nix does);
//! - a machine is up to 8 whitespace-separated fields, `-` (or nothing) meaning the
//!   default: URI, systems (comma-separated; default the local system), ssh key, max
//!   jobs (default 1), speed factor (default 1), supported features, mandatory
//!   features, base64 public host key;
//! - a URI with neither `://` nor `/` (and not `auto`, `daemon`, `local`) means ssh.
//!
//! Errors name the place (`/etc/nix/machines:3`, `--builders:1`), the field and the fix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::store_uri::{decode_host_key, StoreUri};

/// Deepest `@file` nesting followed.
const MAX_INCLUDE_DEPTH: usize = 16;

/// A machines specification that cannot be used.
#[derive(Debug, Error)]
pub enum MachinesError {
    #[error("{place}: field {field} ({name}) is {value:?}: {fix}")]
    BadField {
        place: String,
        field: usize,
        name: &'static str,
        value: String,
        fix: &'static str,
    },
    #[error("{place}: field 1 (store URI) is {uri:?}: {reason}")]
    BadUri {
        place: String,
        uri: String,
        reason: String,
    },
    #[error("{place}: a machine has {count} fields, at most 8 are allowed")]
    TooManyFields { place: String, count: usize },
    #[error("{place}: cannot read included file {file}")]
    Read {
        place: String,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{place}: @{file} includes itself, or nests deeper than 16 files (through {chain})")]
    IncludeCycle {
        place: String,
        file: PathBuf,
        chain: String,
    },
}

/// One build machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// The store URI, `ssh://` added where Nix adds it.
    pub uri: String,
    pub systems: Vec<String>,
    pub ssh_key: Option<String>,
    pub max_jobs: u32,
    /// How fast it builds, relative to others: a positive number; newer Nix takes a
    /// fraction (`0.5`), Nix 2.8 a whole number.
    pub speed_factor: f64,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    /// Field 8 as written (base64 of a public key line).
    pub public_host_key: Option<String>,
    /// Where it was defined, `file:line`.
    pub place: String,
}

impl Machine {
    /// Nix's rule: the system is one of the machine's (or `builtin`), every required
    /// feature is supported or mandatory, and every mandatory feature is required.
    pub fn matches(&self, system: &str, required: &[String]) -> bool {
        (system == "builtin" || self.systems.iter().any(|s| s == system))
            && required
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| required.contains(f))
    }

    /// The decoded public host key line (`ssh-ed25519 AAAA…`).
    pub fn host_key_line(&self) -> Option<String> {
        decode_host_key(self.public_host_key.as_ref()?)
    }

    /// The parsed store URI.
    pub fn store_uri(&self) -> Result<StoreUri, crate::store_uri::StoreUriError> {
        StoreUri::parse(&self.uri)
    }

    /// The machine in machines-file syntax (one line).
    pub fn to_spec(&self) -> String {
        let list = |items: &mut dyn Iterator<Item = &String>| {
            let v: Vec<&str> = items.map(String::as_str).collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        format!(
            "{} {} {} {} {} {} {} {}",
            self.uri,
            list(&mut self.systems.iter()),
            self.ssh_key.as_deref().unwrap_or("-"),
            self.max_jobs,
            self.speed_factor,
            list(&mut self.supported_features.iter()),
            list(&mut self.mandatory_features.iter()),
            self.public_host_key.as_deref().unwrap_or("-"),
        )
    }
}

/// Parses a `builders` value (or a machines file's text). `origin` names it in errors
/// (a file path, `--builders`, `builders setting`); `local_system` is the default for
/// field 2.
pub fn parse_builders(
    spec: &str,
    origin: &str,
    local_system: &str,
) -> Result<Vec<Machine>, MachinesError> {
    let mut machines = Vec::new();
    parse_into(spec, origin, local_system, &mut Vec::new(), &mut machines)?;
    Ok(machines)
}

/// Parses a machines file; a missing file has no machines, as for Nix.
pub fn parse_machines_file(path: &Path, local_system: &str) -> Result<Vec<Machine>, MachinesError> {
    parse_builders(
        &format!("@{}", path.display()),
        &path.display().to_string(),
        local_system,
    )
}

fn parse_into(
    spec: &str,
    origin: &str,
    local_system: &str,
    includes: &mut Vec<PathBuf>,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    for (line_no, line) in spec.split('\n').enumerate() {
        let pieces: Vec<&str> = line.split(';').collect();
        for (piece_no, piece) in pieces.iter().enumerate() {
            let place = if pieces.len() > 1 {
                format!(
                    "{origin}:{} (machine {} of the line)",
                    line_no + 1,
                    piece_no + 1
                )
            } else {
                format!("{origin}:{}", line_no + 1)
            };
            let text = piece.split('#').next().unwrap_or("").trim();
            if text.is_empty() {
                continue;
            }
            if let Some(file) = text.strip_prefix('@') {
                let file = PathBuf::from(file.trim());
                if includes.contains(&file) || includes.len() >= MAX_INCLUDE_DEPTH {
                    let chain: Vec<String> =
                        includes.iter().map(|p| p.display().to_string()).collect();
                    return Err(MachinesError::IncludeCycle {
                        place,
                        file,
                        chain: chain.join(" → "),
                    });
                }
                let contents = match std::fs::read_to_string(&file) {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => {
                        return Err(MachinesError::Read {
                            place,
                            file,
                            source,
                        })
                    }
                };
                includes.push(file.clone());
                parse_into(
                    &contents,
                    &file.display().to_string(),
                    local_system,
                    includes,
                    out,
                )?;
                includes.pop();
                continue;
            }
            out.push(parse_machine(text, place, local_system)?);
        }
    }
    Ok(())
}

fn parse_machine(text: &str, place: String, local_system: &str) -> Result<Machine, MachinesError> {
    let fields: Vec<&str> = text.split([' ', '\t']).filter(|f| !f.is_empty()).collect();
    if fields.len() > 8 {
        return Err(MachinesError::TooManyFields {
            place,
            count: fields.len(),
        });
    }
    let field = |i: usize| {
        fields
            .get(i)
            .copied()
            .filter(|f| *f != "-" && !f.is_empty())
    };
    let list = |i: usize, name: &'static str| -> Result<Vec<String>, MachinesError> {
        let Some(f) = field(i) else {
            return Ok(Vec::new());
        };
        let items: Vec<String> = f
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        // Found by fuzzing: `x86_64-linux,-` would name a system called `-`.
        if items.iter().any(|s| s == "-") {
            return Err(MachinesError::BadField {
                place: place.clone(),
                field: i + 1,
                name,
                value: f.to_string(),
                fix: "`-` stands alone for the default; in a list, name each item",
            });
        }
        Ok(items)
    };
    let number = |i: usize, name: &'static str, default: u32| -> Result<u32, MachinesError> {
        match field(i) {
            None => Ok(default),
            Some(v) => v.parse::<u32>().map_err(|_| MachinesError::BadField {
                place: place.clone(),
                field: i + 1,
                name,
                value: v.to_string(),
                fix: "expected a whole number (or `-` for the default)",
            }),
        }
    };
    let raw_uri = field(0).unwrap_or("");
    let uri = if raw_uri.contains("://")
        || raw_uri.contains('/')
        || ["auto", "daemon", "local"]
            .iter()
            .any(|k| raw_uri == *k || raw_uri.starts_with(&format!("{k}?")))
        || raw_uri.starts_with('?')
    {
        raw_uri.to_string()
    } else {
        format!("ssh://{raw_uri}")
    };
    // Everything about the URI that the text can tell is checked here, so that a bad
    // line is reported with its place before any machine is contacted.
    StoreUri::parse(&uri)
        .and_then(|u| u.check_serve())
        .map_err(|e| MachinesError::BadUri {
            place: place.clone(),
            uri: uri.clone(),
            reason: e.reason,
        })?;
    let max_jobs = number(3, "max jobs", 1)?;
    let speed_factor = match field(4) {
        None => 1.0,
        Some(v) => match v.parse::<f64>() {
            // Nix 2.8 turns 0 into 1; newer Nix refuses a negative factor.
            Ok(0.0) => 1.0,
            Ok(f) if f.is_finite() && f > 0.0 => f,
            _ => {
                return Err(MachinesError::BadField {
                    place: place.clone(),
                    field: 5,
                    name: "speed factor",
                    value: v.to_string(),
                    fix: "expected a positive number such as 2 or 0.5 (or `-` for the default)",
                })
            }
        },
    };
    let public_host_key = field(7).map(str::to_string);
    if let Some(key) = &public_host_key {
        if decode_host_key(key).is_none() {
            return Err(MachinesError::BadField {
                place,
                field: 8,
                name: "public host key",
                value: key.clone(),
                fix: "expected the base64 of the host's public key line (`base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`)",
            });
        }
    }
    let systems = match list(1, "systems")? {
        s if s.is_empty() => vec![local_system.to_string()],
        s => s,
    };
    Ok(Machine {
        uri,
        systems,
        ssh_key: field(2).map(str::to_string),
        max_jobs,
        speed_factor,
        supported_features: list(5, "supported features")?.into_iter().collect(),
        mandatory_features: list(6, "mandatory features")?.into_iter().collect(),
        public_host_key,
        place,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: &str = "x86_64-linux";

    #[test]
    fn fields_and_defaults() {
        let m = parse_builders("builder1", "--builders", SYS).unwrap();
        assert_eq!(m[0].uri, "ssh://builder1");
        assert_eq!(m[0].systems, [SYS]);
        assert_eq!((m[0].max_jobs, m[0].speed_factor), (1, 1.0));
        let m = parse_builders(
            "ssh://root@b2 aarch64-linux,x86_64-linux /k 8 0 kvm,big-parallel benchmark c3NoLWVkMjU1MTkgQUFBQQ==",
            "--builders",
            SYS,
        )
        .unwrap();
        assert_eq!(m[0].systems, ["aarch64-linux", "x86_64-linux"]);
        assert_eq!(m[0].ssh_key.as_deref(), Some("/k"));
        assert_eq!((m[0].max_jobs, m[0].speed_factor), (8, 1.0));
        assert!(m[0].supported_features.contains("kvm"));
        assert_eq!(m[0].host_key_line().as_deref(), Some("ssh-ed25519 AAAA"));
        let m = parse_builders("b - - 4 2 - -", "x", SYS).unwrap();
        assert_eq!(
            (m[0].max_jobs, m[0].speed_factor, m[0].ssh_key.clone()),
            (4, 2.0, None)
        );
    }

    #[test]
    fn separators_comments_and_local_stores() {
        let m = parse_builders(
            "a ; b # c\n\n  # only a comment\nlocal;/tmp/store x86_64-linux",
            "x",
            SYS,
        )
        .unwrap();
        let uris: Vec<&str> = m.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(uris, ["ssh://a", "ssh://b", "local", "/tmp/store"]);
    }

    #[test]
    fn errors_name_the_place_and_field() {
        let e = parse_builders("b1 x86_64-linux,- - 2", "/etc/nix/machines", SYS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/nix/machines:1: field 2 (systems)") && e.contains("stands alone"),
            "{e}"
        );
        let e =
            parse_builders("good\nbad x86_64-linux - many", "/etc/nix/machines", SYS).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("/etc/nix/machines:2")
                && text.contains("field 4 (max jobs)")
                && text.contains("whole number"),
            "{text}"
        );
        let e = parse_builders("a;b - - 1 fast", "--builders", SYS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--builders:1 (machine 2 of the line)") && e.contains("speed factor"),
            "{e}"
        );
        // Newer Nix takes fractions; a negative factor is refused, 0 reads as 1.
        let m = parse_builders("a - - 1 0.5;b - - 1 0", "x", SYS).unwrap();
        assert_eq!((m[0].speed_factor, m[1].speed_factor), (0.5, 1.0));
        let e = parse_builders("a - - 1 -2", "x", SYS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field 5 (speed factor)") && e.contains("0.5"),
            "{e}"
        );
        let e = parse_builders("a - - 1 1 - - not*base64", "x", SYS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("field 8"), "{e}");
        let e = parse_builders("a 1 2 3 4 5 6 7 8", "x", SYS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("9 fields"), "{e}");
    }

    #[test]
    fn every_uri_is_checked_when_read_and_named_by_its_place() {
        let m = parse_builders("ssh-ng://root@b1 x86_64-linux - 4", "machines", SYS).unwrap();
        assert_eq!(m[0].uri, "ssh-ng://root@b1");
        // A daemon by another name is spoken to in the daemon's protocol.
        let m = parse_builders("ssh-ng://b1?remote-program=/opt/daemon", "machines", SYS).unwrap();
        assert_eq!(m[0].uri, "ssh-ng://b1?remote-program=/opt/daemon");
        for (line, says) in [
            ("ssh://[bad", "without closing"),
            ("ssh://", "no host"),
            ("b1:2222", "port"),
            ("ssh://b1?compress=maybe", "expected `true` or `false`"),
            ("ssh-ng://b1?base64-ssh-public-host-key=!!", "base64"),
            ("https://cache.nixos.org", "nix copy"),
            ("s3://bucket?region=eu-west-1", "nix copy"),
        ] {
            let e = parse_builders(
                &format!("good\n{line} x86_64-linux"),
                "/etc/nix/machines",
                SYS,
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("/etc/nix/machines:2: field 1 (store URI) is ") && e.contains(says),
                "{line}: {e}"
            );
        }
        let e = parse_builders("ok; ssh://[::1]:22", "--builders", SYS)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--builders:1 (machine 2 of the line): field 1"),
            "{e}"
        );
        // Field 8 must be the base64 of a key line, not of any text.
        let e = parse_builders("a - - 1 1 - - aGVsbG8=", "x", SYS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x:1: field 8 (public host key)"), "{e}");
    }

    #[test]
    fn matching_follows_nix() {
        let m = &parse_builders("b x86_64-linux - 1 1 kvm big-parallel", "x", SYS).unwrap()[0];
        assert!(m.matches("x86_64-linux", &["big-parallel".into()]));
        assert!(m.matches("x86_64-linux", &["big-parallel".into(), "kvm".into()]));
        assert!(!m.matches("x86_64-linux", &[]));
        assert!(!m.matches("aarch64-linux", &["big-parallel".into()]));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,120}") {
            let _ = parse_builders(&s, "fuzz", SYS);
        }

        #[test]
        fn specs_roundtrip(hosts in proptest::collection::vec(("[a-z][a-z0-9]{0,8}", 1u32..64, 1u32..8, proptest::collection::btree_set("[a-z]{1,6}", 0..3)), 1..5)) {
            let machines: Vec<Machine> = hosts.iter().map(|(h, j, s, f)| Machine {
                uri: format!("ssh://{h}"), systems: vec![SYS.into()], ssh_key: None, max_jobs: *j, speed_factor: f64::from(*s),
                supported_features: f.clone(), mandatory_features: BTreeSet::new(), public_host_key: None, place: String::new(),
            }).collect();
            let spec: Vec<String> = machines.iter().map(Machine::to_spec).collect();
            let parsed = parse_builders(&spec.join("\n"), "x", SYS).unwrap();
            for (a, b) in parsed.iter().zip(&machines) {
                proptest::prop_assert_eq!(&a.to_spec(), &b.to_spec());
            }
        }
    }
}
