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
            check_authority(&scheme, &authority).map_err(|reason| err(&reason))?;
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

    /// `remote-program` as written, else Nix's default for the scheme: `nix-daemon` for
    /// `ssh-ng` (run as `nix-daemon --stdio`), `nix-store` otherwise.
    pub fn remote_program(&self) -> &str {
        self.param("remote-program")
            .filter(|s| !s.is_empty())
            .unwrap_or(if self.scheme == "ssh-ng" {
                "nix-daemon"
            } else {
                "nix-store"
            })
    }

    /// The program to run with `--serve --write`. For `ssh` that is `remote-program`;
    /// for `ssh-ng`, whose `remote-program` names the daemon, it is the `nix-store` next
    /// to that daemon (`DIR/nix-daemon` → `DIR/nix-store`), because every Nix install
    /// ships both. `None` when an `ssh-ng` program is not called `nix-daemon`: that
    /// machine is spoken to in the daemon's protocol (`PROGRAM --stdio`) only.
    pub fn serve_program(&self) -> Option<String> {
        let program = self.remote_program();
        if self.scheme != "ssh-ng" {
            return Some(program.to_string());
        }
        let dir = program.strip_suffix("nix-daemon")?;
        // Only a whole file name counts: `my-nix-daemon` is some other program.
        (dir.is_empty() || dir.ends_with(['/', ' '])).then(|| format!("{dir}nix-store"))
    }

    /// `[user@]host` as ssh takes it: an IPv6 address loses its brackets, as Nix does
    /// (`root@[::1]` → `root@::1`).
    pub fn ssh_destination(&self) -> Option<String> {
        let host = self.host()?;
        Some(host.replace(['[', ']'], ""))
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

    /// `compress`, a Nix boolean (`true`, `yes`, `1`).
    pub fn compress(&self) -> bool {
        self.param("compress").and_then(nix_bool) == Some(true)
    }

    /// The decoded `base64-ssh-public-host-key` (`ssh-ed25519 AAAA…`).
    pub fn host_key_line(&self) -> Option<String> {
        self.base64_host_key().and_then(decode_host_key)
    }

    /// Checks, from the text alone, that offload can drive this store over the serve
    /// protocol, and sorts its parameters. Errors say what to write instead.
    pub fn check_serve(&self) -> Result<ServeCheck, StoreUriError> {
        let err = |reason: String| StoreUriError {
            uri: self.to_string(),
            reason,
        };
        let kind = match self.scheme.as_str() {
            "ssh" | "ssh-ng" => ServeKind::Ssh,
            // Their parameters go to `nix-store --store URI`, which checks them itself.
            "local" | "daemon" | "auto" | "path" => {
                return Ok(ServeCheck {
                    kind: ServeKind::ThisMachine,
                    ignored: Vec::new(),
                    unknown: Vec::new(),
                })
            }
            "file" | "http" | "https" | "s3" => {
                return Err(err(format!(
                    "a {}:// binary cache cannot run builds or `nix-store --serve`; \
                     copy to or from it with `nix copy --to {self}` instead",
                    self.scheme
                )))
            }
            other => {
                return Err(err(format!(
                    "{other}:// stores have no serve protocol; offload reaches machines \
                     through `ssh://`, `ssh-ng://`, `local`, `daemon`, `auto` or a chroot \
                     store directory (use `nix copy` for other stores)"
                )))
            }
        };
        let mut check = ServeCheck {
            kind,
            ignored: Vec::new(),
            unknown: Vec::new(),
        };
        for (key, value) in &self.params {
            let bad =
                |expected: &str| err(format!("parameter {key} is {value:?}: expected {expected}"));
            match key.as_str() {
                // An ssh-ng program not called `nix-daemon` is spoken to in the daemon's
                // own protocol ([`StoreUri::serve_program`] is `None`).
                "ssh-key" | "remote-store" | "remote-program" => {}
                "compress" | "trusted" | "want-mass-query" => {
                    if nix_bool(value).is_none() {
                        return Err(bad("`true` or `false`"));
                    }
                    if key != "compress" {
                        check.ignored.push(key.clone());
                    }
                }
                "base64-ssh-public-host-key" => {
                    if !value.is_empty() && decode_host_key(value).is_none() {
                        return Err(bad("the base64 of the host's public key line \
                             (`base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`)"));
                    }
                }
                "max-connections"
                | "max-connection-age"
                | "path-info-cache-size"
                | "priority"
                | "log-fd" => {
                    if value.parse::<i64>().is_err() {
                        return Err(bad("a whole number"));
                    }
                    check.ignored.push(key.clone());
                }
                "system-features" => check.ignored.push(key.clone()),
                _ => check.unknown.push(key.clone()),
            }
        }
        Ok(check)
    }
}

/// How offload reaches a store that passed [`StoreUri::check_serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeKind {
    /// `ssh://` or `ssh-ng://`: through ssh (or a local process for host `localhost`).
    Ssh,
    /// `local`, `daemon`, `auto` or a chroot store: `nix-store --store …` here.
    ThisMachine,
}

/// What [`StoreUri::check_serve`] found besides errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeCheck {
    pub kind: ServeKind,
    /// Parameters Nix knows that do not change how offload reaches the store (the
    /// connection count: offload keeps one session per build slot).
    pub ignored: Vec<String>,
    /// Parameters Nix would not know either (it warns about them and goes on).
    pub unknown: Vec<String>,
}

/// A Nix boolean setting: `true`/`yes`/`1` or `false`/`no`/`0`.
fn nix_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Decodes a public host key given as base64 of its key line (`ssh-ed25519 AAAA…`), as
/// machines files and `base64-ssh-public-host-key` hold it. Padding may be missing and
/// newlines are skipped, as Nix's decoder allows.
pub fn decode_host_key(b64: &str) -> Option<String> {
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let compact: String = b64.trim().chars().filter(|c| *c != '\n').collect();
    let line = String::from_utf8(engine.decode(compact).ok()?).ok()?;
    let line = line.trim();
    (line.split_whitespace().count() >= 2).then(|| line.to_string())
}

/// Checks `[user@]host` of an ssh store as Nix's URL grammar and ssh take it: a host
/// name, an IPv6 address (bare or in brackets), no port (ssh gets the text as it is).
fn check_authority(scheme: &str, authority: &str) -> Result<(), String> {
    let (user, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let port_fix = "Nix passes the host to ssh as written, and ssh takes no port there: \
                    put `Port N` in a `Host` entry of ~/.ssh/config and use that name, \
                    or set NIX_SSHOPTS='-p N'";
    if host.is_empty() {
        return Err(format!(
            "no host after {scheme}://: write {scheme}://[user@]host"
        ));
    }
    if host.starts_with('-') {
        return Err(format!(
            "host {host:?} starts with `-`, which ssh would read as an option"
        ));
    }
    if user.is_some_and(str::is_empty) {
        return Err("nothing before `@`: write user@host, or the host alone".into());
    }
    let plain = |b: u8, extra: &[u8]| {
        b.is_ascii_alphanumeric() || b"-._~%!$'()*+,=".contains(&b) || extra.contains(&b)
    };
    if let Some(u) = user {
        if let Some(c) = u.chars().find(|c| !c.is_ascii() || !plain(*c as u8, b":")) {
            return Err(format!(
                "the user name {u:?} has {c:?}, which a URL cannot hold there"
            ));
        }
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some((address, after)) = inner.split_once(']') else {
            return Err(format!(
                "host {host:?} opens `[` without closing it: write [IPv6-address], e.g. [::1]"
            ));
        };
        if !after.is_empty() {
            return Err(if after.starts_with(':') {
                format!("host {host:?} has a port; {port_fix}")
            } else {
                format!("host {host:?} has {after:?} after `]`")
            });
        }
        if !is_ipv6(address) {
            return Err(format!(
                "{address:?} inside `[…]` is not an IPv6 address, e.g. [::1]"
            ));
        }
        return Ok(());
    }
    if let Some(c) = host
        .chars()
        .find(|c| !c.is_ascii() || !plain(*c as u8, b":"))
    {
        return Err(format!(
            "host {host:?} has {c:?}, which a host name cannot hold; \
             write {scheme}://[user@]host (an IPv6 address as [::1])"
        ));
    }
    if host.contains(':') && !is_ipv6(host) {
        return Err(format!("host {host:?} has a port; {port_fix}"));
    }
    Ok(())
}

/// An IPv6 address, with an optional `%zone`.
fn is_ipv6(text: &str) -> bool {
    let address = text.split_once('%').map_or(text, |(a, _)| a);
    address.parse::<std::net::Ipv6Addr>().is_ok()
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
        for bad in [
            "ssh://",
            "builder1",
            "ssh://a/b",
            "ssh://h?x=%zz",
            "://x",
            "ssh://[bad",
        ] {
            let e = StoreUri::parse(bad).unwrap_err();
            assert_eq!(e.uri, bad);
        }
    }

    #[test]
    fn ssh_ng_reaches_the_nix_store_beside_the_daemon() {
        let u = StoreUri::parse("ssh-ng://root@b1?remote-store=/tmp/m1").unwrap();
        assert_eq!(u.remote_program(), "nix-daemon");
        assert_eq!(u.serve_program().as_deref(), Some("nix-store"));
        assert_eq!(u.check_serve().unwrap().kind, ServeKind::Ssh);
        let u = StoreUri::parse(
            "ssh-ng://b1?remote-program=/nix/var/nix/profiles/default/bin/nix-daemon",
        )
        .unwrap();
        assert_eq!(
            u.serve_program().as_deref(),
            Some("/nix/var/nix/profiles/default/bin/nix-store")
        );
        for other in ["/opt/my-nix-daemon", "/opt/daemon"] {
            let u = StoreUri::parse(&format!("ssh-ng://b1?remote-program={other}")).unwrap();
            // No `nix-store` known beside it: the daemon's protocol only.
            assert_eq!(u.serve_program(), None);
            assert_eq!(u.check_serve().unwrap().kind, ServeKind::Ssh);
        }
        // For ssh:// the program is the serve program itself.
        let u = StoreUri::parse("ssh://b1?remote-program=/opt/nix-daemon").unwrap();
        assert_eq!(u.serve_program().as_deref(), Some("/opt/nix-daemon"));
    }

    #[test]
    fn authorities_are_checked_as_nix_and_ssh_take_them() {
        for good in [
            "ssh://h",
            "ssh://root@h.example.org",
            "ssh://[::1]",
            "ssh://root@[fe80::1%25eth0]",
            "ssh://::1",
            "ssh-ng://user:x@h",
        ] {
            assert!(StoreUri::parse(good).is_ok(), "{good}");
        }
        assert_eq!(
            StoreUri::parse("ssh://root@[::1]")
                .unwrap()
                .ssh_destination()
                .as_deref(),
            Some("root@::1")
        );
        for (bad, says) in [
            ("ssh://", "no host"),
            ("ssh-ng://", "no host after ssh-ng://"),
            ("ssh://[bad", "without closing"),
            ("ssh://[::1", "without closing"),
            ("ssh://[nothost]", "not an IPv6 address"),
            ("ssh://[::1]:22", "port"),
            ("ssh://h:22", "port"),
            ("ssh://h:ssh", "port"),
            ("ssh://-oProxyCommand=x", "option"),
            ("ssh://@h", "before `@`"),
            ("ssh://h<x", "host name cannot hold"),
            ("ssh://a/b", "'/'"),
        ] {
            let e = StoreUri::parse(bad).unwrap_err();
            assert!(e.reason.contains(says), "{bad}: {}", e.reason);
            assert_eq!(e.uri, bad);
        }
    }

    #[test]
    fn parameters_that_matter_are_checked() {
        let check = |uri: &str| StoreUri::parse(uri).unwrap().check_serve();
        for (bad, says) in [
            (
                "ssh://h?compress=maybe",
                "compress is \"maybe\": expected `true` or `false`",
            ),
            ("ssh://h?base64-ssh-public-host-key=!!", "base64"),
            // Valid base64, but of one word, not a key line.
            ("ssh://h?base64-ssh-public-host-key=aGVsbG8=", "base64"),
            ("ssh://h?max-connections=many", "whole number"),
        ] {
            let e = check(bad).unwrap_err().reason;
            assert!(e.contains(says), "{bad}: {e}");
        }
        let c = check("ssh-ng://h?compress=yes&max-connections=4&frobnicate=1").unwrap();
        assert_eq!(c.ignored, ["max-connections"]);
        assert_eq!(c.unknown, ["frobnicate"]);
        assert!(StoreUri::parse("ssh://h?compress=1").unwrap().compress());
        let key = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUhyZQo";
        assert_eq!(
            decode_host_key(key).as_deref(),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHre"),
            "padding may be left out, as Nix allows"
        );
    }

    #[test]
    fn stores_without_a_serve_protocol_point_to_nix_copy() {
        for bad in [
            "file:///tmp/cache",
            "https://cache.nixos.org",
            "s3://bucket",
            "http://h",
        ] {
            let e = StoreUri::parse(bad).unwrap().check_serve().unwrap_err();
            assert!(e.reason.contains("nix copy"), "{bad}: {}", e.reason);
        }
        let e = StoreUri::parse("gopher://h")
            .unwrap()
            .check_serve()
            .unwrap_err();
        assert!(e.reason.contains("no serve protocol"), "{}", e.reason);
        for ok in ["local", "daemon", "auto", "/tmp/s", "local?root=/tmp/r"] {
            let c = StoreUri::parse(ok).unwrap().check_serve().unwrap();
            assert_eq!(c.kind, ServeKind::ThisMachine, "{ok}");
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
