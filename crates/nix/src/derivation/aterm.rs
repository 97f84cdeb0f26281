//! The ATerm text of `.drv` files: a strict parser and a byte-identical printer.
//!
//! ```text
//! Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])
//! ```
//! Strings escape `"` `\` newline, CR and tab; every other byte is literal, so values
//! are byte strings (a `.drv` may hold Latin-1 text).

use std::collections::{BTreeMap, BTreeSet};

use super::{Derivation, DerivationError, Output};
use crate::store_path::StorePath;

/// Largest `.drv` accepted (nixpkgs' biggest are a few MB).
pub const MAX_DRV_SIZE: usize = 64 << 20;

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, expected: &'static str) -> DerivationError {
        let found = self
            .input
            .get(self.pos..(self.pos + 20).min(self.input.len()))
            .unwrap_or(&[]);
        DerivationError::Syntax {
            offset: self.pos,
            expected,
            found: String::from_utf8_lossy(found).into_owned(),
        }
    }

    fn literal(&mut self, lit: &'static str) -> Result<(), DerivationError> {
        if self.input[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.err(lit))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn string(&mut self) -> Result<Vec<u8>, DerivationError> {
        self.literal("\"")?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("a closing quote")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    let c = self
                        .input
                        .get(self.pos + 1)
                        .copied()
                        .ok_or_else(|| self.err("an escaped character"))?;
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    self.pos += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// A string Nix writes unescaped (names, paths, the system, hashes): a backslash in
    /// it could not be printed back the same, so it is refused.
    fn utf8(&mut self, what: &'static str) -> Result<String, DerivationError> {
        let start = self.pos;
        let raw = self.string()?;
        if self.input[start..self.pos].contains(&b'\\') {
            return Err(DerivationError::Syntax {
                offset: start,
                expected: "no escape sequence (Nix writes this field unescaped)",
                found: String::from_utf8_lossy(&raw).into_owned(),
            });
        }
        String::from_utf8(raw).map_err(|_| DerivationError::NotUtf8 {
            offset: start,
            what,
        })
    }

    fn path(&mut self) -> Result<StorePath, DerivationError> {
        let start = self.pos;
        let s = self.utf8("store path")?;
        StorePath::from_absolute_path(&s).map_err(|e| DerivationError::BadPath {
            offset: start,
            source: e,
        })
    }

    /// `[item,item,…]`
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DerivationError>,
    ) -> Result<Vec<T>, DerivationError> {
        self.literal("[")?;
        let mut out = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(out);
        }
        loop {
            out.push(item(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(out);
                }
                _ => return Err(self.err("`,` or `]`")),
            }
        }
    }
}

/// Parses the text of a `.drv` file.
pub fn parse(input: &[u8]) -> Result<Derivation, DerivationError> {
    if input.len() > MAX_DRV_SIZE {
        return Err(DerivationError::TooLarge { size: input.len() });
    }
    let mut p = Parser { input, pos: 0 };
    p.literal("Derive(")?;
    let mut outputs = BTreeMap::new();
    for (name, path, algo, hash) in p.list(|p| {
        p.literal("(")?;
        let name = p.utf8("output name")?;
        p.literal(",")?;
        let start = p.pos;
        let path = p.utf8("output path")?;
        let path = if path.is_empty() {
            None
        } else {
            Some(
                StorePath::from_absolute_path(&path).map_err(|e| DerivationError::BadPath {
                    offset: start,
                    source: e,
                })?,
            )
        };
        p.literal(",")?;
        let algo = p.utf8("output hash algorithm")?;
        p.literal(",")?;
        let hash = p.utf8("output hash")?;
        p.literal(")")?;
        Ok((name, path, algo, hash))
    })? {
        let output = Output {
            path,
            hash_algo: algo,
            hash,
        };
        if outputs.insert(name.clone(), output).is_some() {
            return Err(DerivationError::Duplicate {
                what: "output",
                name,
            });
        }
    }
    p.literal(",")?;
    let mut input_drvs = BTreeMap::new();
    for (path, outs) in p.list(|p| {
        p.literal("(")?;
        let path = p.path()?;
        p.literal(",")?;
        let outs = p.list(|p| p.utf8("input derivation output"))?;
        p.literal(")")?;
        Ok((path, outs))
    })? {
        let name = path.to_string();
        if input_drvs
            .insert(path, outs.into_iter().collect::<BTreeSet<_>>())
            .is_some()
        {
            return Err(DerivationError::Duplicate {
                what: "input derivation",
                name,
            });
        }
    }
    p.literal(",")?;
    let input_srcs: BTreeSet<StorePath> = p.list(Parser::path)?.into_iter().collect();
    p.literal(",")?;
    let system = p.utf8("system")?;
    p.literal(",")?;
    let builder = p.string()?;
    p.literal(",")?;
    let args = p.list(Parser::string)?;
    p.literal(",")?;
    let mut env = BTreeMap::new();
    for (k, v) in p.list(|p| {
        p.literal("(")?;
        let k = p.string()?;
        p.literal(",")?;
        let v = p.string()?;
        p.literal(")")?;
        Ok((k, v))
    })? {
        if env.insert(k.clone(), v).is_some() {
            return Err(DerivationError::Duplicate {
                what: "environment variable",
                name: String::from_utf8_lossy(&k).into_owned(),
            });
        }
    }
    p.literal(")")?;
    if p.pos != input.len() {
        return Err(p.err("the end of the derivation"));
    }
    Ok(Derivation {
        outputs,
        input_drvs,
        input_srcs,
        system,
        builder,
        args,
        env,
    })
}

fn put_escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

fn put_plain(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn put_list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut each: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(b']');
}

/// Prints `drv`. With `mask_outputs`, output paths are blanked in the outputs and in
/// the environment (what hash modulo hashes); `input_drvs` replaces the input
/// derivation list when given (keys already rendered, sorted by the caller).
pub(super) fn print(
    drv: &Derivation,
    mask_outputs: bool,
    input_drvs: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"Derive(");
    put_list(&mut out, &drv.outputs, |out, (name, o)| {
        out.push(b'(');
        put_plain(out, name);
        out.push(b',');
        let path = if mask_outputs {
            String::new()
        } else {
            o.path
                .as_ref()
                .map(StorePath::to_absolute)
                .unwrap_or_default()
        };
        put_plain(out, &path);
        out.push(b',');
        put_plain(out, &o.hash_algo);
        out.push(b',');
        put_plain(out, &o.hash);
        out.push(b')');
    });
    out.push(b',');
    let rendered: BTreeMap<String, BTreeSet<String>>;
    let inputs = match input_drvs {
        Some(m) => m,
        None => {
            rendered = drv
                .input_drvs
                .iter()
                .map(|(p, o)| (p.to_absolute(), o.clone()))
                .collect();
            &rendered
        }
    };
    put_list(&mut out, inputs, |out, (path, outs)| {
        out.push(b'(');
        put_plain(out, path);
        out.push(b',');
        put_list(out, outs, |out, o| put_plain(out, o));
        out.push(b')');
    });
    out.push(b',');
    put_list(&mut out, &drv.input_srcs, |out, p| {
        put_plain(out, &p.to_absolute())
    });
    out.push(b',');
    put_plain(&mut out, &drv.system);
    out.push(b',');
    put_escaped(&mut out, &drv.builder);
    out.push(b',');
    put_list(&mut out, &drv.args, |out, a| put_escaped(out, a));
    out.push(b',');
    put_list(&mut out, &drv.env, |out, (k, v)| {
        out.push(b'(');
        put_escaped(out, k);
        out.push(b',');
        let masked =
            mask_outputs && std::str::from_utf8(k).is_ok_and(|k| drv.outputs.contains_key(k));
        put_escaped(out, if masked { b"" } else { v });
        out.push(b')');
    });
    out.push(b')');
    out
}
