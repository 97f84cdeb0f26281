//! Nix's build-hook protocol (docs/nix-protocols.md §9): what Nix writes to a hook's
//! stdin (its settings, then `try` requests, then an accepted build's inputs and wanted
//! outputs), and the lines a hook answers with on stderr.
//!
//! Decoders here are sans-I/O like every wire message (see [`crate::wire::Decode`]);
//! the encoders exist so tests can speak as Nix does.

use crate::wire::{
    put_bytes, put_strings, put_u64, run, Decode, Stages, Step, StringList, WireError,
};
use crate::wire::{MAX_LIST_LEN, MAX_STRING_LEN};

/// A derivation Nix offers the hook (`try`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TryRequest {
    /// Nix would build it locally now: it has a free local build slot.
    pub am_willing: bool,
    pub system: String,
    pub drv_path: String,
    pub required_features: Vec<String>,
}

/// What Nix sends after reading an accept: the input closure and the outputs it wants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildInputs {
    /// Every input store path (outputs of input derivations and sources), closed.
    pub inputs: Vec<String>,
    /// Names of the outputs not yet valid locally.
    pub wanted_outputs: Vec<String>,
}

/// One message from Nix between builds: a `try`, or anything else, which ends the hook
/// as Nix's own hook ends (`build-remote.cc` returns on a word other than `try`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookRequest {
    Try(TryRequest),
    Other(String),
}

/// The hook's answer to a `try`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookReply {
    /// The hook builds it on the machine with this store URI.
    Accept { store_uri: String },
    /// Nix builds it locally (or asks again later if it cannot).
    Decline,
    /// Nix asks this hook about nothing more in this run.
    DeclinePermanently,
    /// Ask again later: the machines that could build it are busy.
    Postpone,
}

impl HookReply {
    /// The lines Nix reads: `# accept` and the machine line, or one `# …` line.
    pub fn encode(&self) -> String {
        match self {
            HookReply::Accept { store_uri } => format!("# accept\n{store_uri}\n"),
            HookReply::Decline => "# decline\n".into(),
            HookReply::DeclinePermanently => "# decline-permanently\n".into(),
            HookReply::Postpone => "# postpone\n".into(),
        }
    }
}

/// Nix's verbosity levels (`src/libutil/logging.hh`), as `@nix` messages carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
}

/// A message line Nix shows from its hook: `@nix {"action":"msg",…}`.
pub fn log_line(level: LogLevel, msg: &str) -> String {
    format!(
        "@nix {{\"action\":\"msg\",\"level\":{},\"msg\":{}}}\n",
        level as u8,
        json_string(msg)
    )
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Decodes the settings Nix sends first: `(u64 1, name, value)*` ended by `u64 0`.
#[derive(Debug, Default)]
pub struct SettingsDecoder {
    pairs: Vec<(String, String)>,
}

impl Decode for SettingsDecoder {
    type Output = Vec<(String, String)>;

    fn decode(&mut self, input: &[u8]) -> Result<Step<Self::Output>, WireError> {
        run(input, |cur| loop {
            // A pair is stored whole, so a split between its fields is re-read once.
            let pair = cur.all_or_nothing(|c| {
                if c.u64("hook settings: more")? == 0 {
                    return Ok(None);
                }
                let name = c.string("hook setting name", MAX_STRING_LEN)?;
                let value = c.string("hook setting value", MAX_STRING_LEN)?;
                Ok(Some((name, value)))
            })?;
            match pair {
                None => return Ok(std::mem::take(&mut self.pairs)),
                Some(_) if self.pairs.len() >= MAX_LIST_LEN => {
                    return Err(WireError::TooLong {
                        what: "hook settings",
                        len: self.pairs.len() as u64 + 1,
                        max: MAX_LIST_LEN,
                    }
                    .into())
                }
                Some(pair) => self.pairs.push(pair),
            }
        })
    }
}

/// Decodes one request: the word, and for `try` its fields.
#[derive(Debug, Default)]
pub struct RequestDecoder {
    stage: usize,
    word: String,
    request: TryRequest,
    features: StringList,
}

impl Decode for RequestDecoder {
    type Output = HookRequest;

    fn decode(&mut self, input: &[u8]) -> Result<Step<HookRequest>, WireError> {
        const MAX: usize = MAX_STRING_LEN;
        run(input, |cur| {
            let mut s = Stages::new(&mut self.stage);
            s.field(cur, &mut self.word, |c| c.string("hook request word", MAX))?;
            if self.word != "try" {
                return Ok(HookRequest::Other(std::mem::take(&mut self.word)));
            }
            let r = &mut self.request;
            s.field(cur, &mut r.am_willing, |c| c.bool("try: am willing"))?;
            s.field(cur, &mut r.system, |c| c.string("try: system", MAX))?;
            s.field(cur, &mut r.drv_path, |c| c.string("try: derivation", MAX))?;
            s.strings(cur, &mut self.features, "try: required features", MAX)?;
            let mut request = std::mem::take(&mut self.request);
            request.required_features = std::mem::take(&mut self.features.items);
            Ok(HookRequest::Try(request))
        })
    }
}

/// Decodes what follows an accept: the inputs, then the wanted outputs.
#[derive(Debug, Default)]
pub struct BuildInputsDecoder {
    stage: usize,
    inputs: StringList,
    outputs: StringList,
}

impl Decode for BuildInputsDecoder {
    type Output = BuildInputs;

    fn decode(&mut self, input: &[u8]) -> Result<Step<BuildInputs>, WireError> {
        const MAX: usize = MAX_STRING_LEN;
        run(input, |cur| {
            let mut s = Stages::new(&mut self.stage);
            s.strings(cur, &mut self.inputs, "hook: input paths", MAX)?;
            s.strings(cur, &mut self.outputs, "hook: wanted outputs", MAX)?;
            Ok(BuildInputs {
                inputs: std::mem::take(&mut self.inputs.items),
                wanted_outputs: std::mem::take(&mut self.outputs.items),
            })
        })
    }
}

/// The settings frame as Nix writes it.
pub fn encode_settings<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        put_u64(&mut out, 1);
        put_bytes(&mut out, name.as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    put_u64(&mut out, 0);
    out
}

impl TryRequest {
    /// The `try` frame as Nix writes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, b"try");
        put_u64(&mut out, u64::from(self.am_willing));
        put_bytes(&mut out, self.system.as_bytes());
        put_bytes(&mut out, self.drv_path.as_bytes());
        put_strings(&mut out, &self.required_features);
        out
    }
}

impl BuildInputs {
    /// The frame Nix writes after an accept.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_strings(&mut out, &self.inputs);
        put_strings(&mut out, &self.wanted_outputs);
        out
    }
}

#[cfg(test)]
mod tests;
