//! Store URIs as Nix writes them: `ssh://[user@]host?key=value&…`, `ssh-ng://…`,
//! `local`, `daemon`, `auto`, `file://…`, `http(s)://…`, or an absolute path (a chroot
//! store on this machine). Only the parts offload uses are interpreted; the rest is kept
//! so the URI can be handed back to Nix unchanged.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

/// A store URI that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("store URI {uri:?}: {reason}")]
pub struct StoreUriError {
    pub uri: String,
    pub reason: String,
}

/// A parsed store URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUri {
    /// `ssh`, `ssh-ng`, `local`, `daemon`, `auto`, `file`, `http`, `https`, or `path`
    /// for a bare absolute path.
    pub scheme: String,
    /// For `ssh`/`ssh-ng`: `[user@]host` as given (ssh resolves it, config aliases
    /// included); for `file`/`path`: the path; for the others, the rest after `://`.
    pub authority: String,
    /// Query parameters, percent-decoded, in order of their names.
    pub params: BTreeMap<String, String>,
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@,".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl StoreUri {
    /// Parses `uri`.
    pub fn parse(uri: &str) -> Result<StoreUri, StoreUriError> {
        let err = |reason: &str| StoreUriError {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (base, query) = match uri.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (uri, None),
        };
        let mut params = BTreeMap::new();
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)
                .ok_or_else(|| err(&format!("parameter {k:?} has a bad %-escape")))?;
            params.insert(k.to_string(), v);
        }
        let (scheme, authority) = if let Some((scheme, rest)) = base.split_once("://") {
            if scheme.is_empty()
                || !scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            {
                return Err(err("the scheme is not valid"));
            }
            (scheme.to_string(), rest.to_string())
        } else if base.starts_with('/') {
            ("path".to_string(), base.to_string())
        } else if matches!(base, "local" | "daemon" | "auto" | "") {
            (
                if base.is_empty() { "auto" } else { base }.to_string(),
                String::new(),
            )
        } else {
            return Err(err(
                "expected scheme://…, `local`, `daemon`, `auto` or an absolute path",
            ));
        };
        if matches!(scheme.as_str(), "ssh" | "ssh-ng") {
            if authority.is_empty() {
                return Err(err("no host after ssh://"));
            }
            if authority.contains('/') || authority.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(err("the host part may not contain `/` or spaces"));
            }
        }
        Ok(StoreUri {
            scheme,
            authority,
            params,
        })
    }

    /// Whether the store is reached over ssh.
    pub fn is_ssh(&self) -> bool {
        matches!(self.scheme.as_str(), "ssh" | "ssh-ng")
    }

    /// `[user@]host` for ssh stores.
    pub fn host(&self) -> Option<&str> {
        self.is_ssh().then_some(self.authority.as_str())
    }

    /// The host without `user@`.
    pub fn hostname(&self) -> Option<&str> {
        self.host().map(|h| h.rsplit('@').next().unwrap_or(h))
    }

    /// Host `localhost`: Nix runs the command as a local process, no ssh.
    pub fn is_localhost(&self) -> bool {
        self.hostname() == Some("localhost")
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// `remote-store`: the store the remote Nix opens (`--store`).
    pub fn remote_store(&self) -> Option<&str> {
        self.param("remote-store").filter(|s| !s.is_empty())
    }

    /// `remote-program`, `nix-store` by default.
    pub fn remote_program(&self) -> &str {
        self.param("remote-program")
            .filter(|s| !s.is_empty())
            .unwrap_or("nix-store")
    }

    /// `ssh-key`: the identity file.
    pub fn ssh_key(&self) -> Option<&str> {
        self.param("ssh-key").filter(|s| !s.is_empty())
    }

    /// `base64-ssh-public-host-key`.
    pub fn base64_host_key(&self) -> Option<&str> {
        self.param("base64-ssh-public-host-key")
            .filter(|s| !s.is_empty())
    }

    /// `compress=true`.
    pub fn compress(&self) -> bool {
        self.param("compress") == Some("true")
    }
}

impl fmt::Display for StoreUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme.as_str() {
            "path" => write!(f, "{}", self.authority)?,
            "local" | "daemon" | "auto" if self.authority.is_empty() => {
                write!(f, "{}", self.scheme)?
            }
            _ => write!(f, "{}://{}", self.scheme, self.authority)?,
        }
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(
                f,
                "{}{k}={}",
                if i == 0 { '?' } else { '&' },
                percent_encode(v)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_nix_accepts() {
        let u = StoreUri::parse("ssh://root@builder1?remote-store=/tmp/fleet/m1&compress=true")
            .unwrap();
        assert!(u.is_ssh());
        assert_eq!(u.host(), Some("root@builder1"));
        assert_eq!(u.hostname(), Some("builder1"));
        assert_eq!(u.remote_store(), Some("/tmp/fleet/m1"));
        assert_eq!(u.remote_program(), "nix-store");
        assert!(u.compress());
        assert!(StoreUri::parse("ssh://localhost?remote-store=/x")
            .unwrap()
            .is_localhost());
        assert_eq!(StoreUri::parse("/tmp/store").unwrap().scheme, "path");
        assert_eq!(StoreUri::parse("local").unwrap().scheme, "local");
        assert_eq!(
            StoreUri::parse("file:///tmp/cache").unwrap().authority,
            "/tmp/cache"
        );
        let k = StoreUri::parse("ssh://h?remote-program=%2Fopt%2Fnix%20store").unwrap();
        assert_eq!(k.remote_program(), "/opt/nix store");
    }

    #[test]
    fn errors_name_the_uri() {
        for bad in ["ssh://", "builder1", "ssh://a/b", "ssh://h?x=%zz", "://x"] {
            let e = StoreUri::parse(bad).unwrap_err();
            assert_eq!(e.uri, bad);
        }
    }

    #[test]
    fn displays_back() {
        for s in [
            "ssh://root@h?remote-store=/tmp/m1",
            "local",
            "/tmp/s",
            "ssh://h",
        ] {
            assert_eq!(StoreUri::parse(s).unwrap().to_string(), s);
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = StoreUri::parse(&s);
        }
    }
}
