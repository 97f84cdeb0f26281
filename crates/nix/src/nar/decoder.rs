//! The sans-I/O NAR parser: a state machine fed with byte slices. When the outermost
//! node closes, [`NarDecoder::is_done`] turns true and the decoder consumes nothing more.

use super::{NarError, MAX_DEPTH, MAX_TOKEN_LEN, NAR_MAGIC};
use crate::wire::padding_len;

/// What the decoder found. Each event is produced by consuming at least one byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarEvent<'a> {
    /// A regular file starts; `size` bytes of [`NarEvent::Contents`] follow.
    Regular {
        executable: bool,
        size: u64,
    },
    /// A piece of the current file's contents, borrowed from the input.
    Contents(&'a [u8]),
    /// The current regular file is complete.
    RegularEnd,
    Symlink {
        target: Vec<u8>,
    },
    DirectoryStart,
    /// A directory entry; the next node belongs to it.
    Entry {
        name: Vec<u8>,
    },
    /// The current entry's node is complete.
    EntryEnd,
    DirectoryEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    NodeOpen,
    TypeKeyword,
    TypeValue,
    /// After "regular": "executable" or "contents".
    RegularField,
    /// After "executable": the empty string.
    ExecutableValue,
    ContentsKeyword,
    ContentsLength,
    Contents {
        remaining: u64,
        pad: usize,
    },
    ContentsPadding {
        pad: usize,
    },
    /// ")" closing a regular file.
    RegularClose,
    SymlinkKeyword,
    SymlinkTarget,
    /// ")" closing a symlink.
    SymlinkClose,
    /// "entry" or ")".
    DirectoryField,
    EntryOpen,
    EntryNameKeyword,
    EntryName,
    EntryNodeKeyword,
    /// ")" closing an entry, after its node.
    EntryClose,
    Done,
}

/// An incremental NAR parser. See [`NarEvent`].
#[derive(Debug, Clone)]
pub struct NarDecoder {
    state: State,
    /// A partly received small token: its length prefix, body and padding.
    buf: Vec<u8>,
    /// Total bytes of the token being received, once its length is known.
    token_total: usize,
    executable: bool,
    /// The last entry name of every open directory, outermost first.
    dirs: Vec<Option<Vec<u8>>>,
    offset: u64,
}

impl Default for NarDecoder {
    fn default() -> Self {
        Self::new()
    }
}

fn lossy(bytes: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    if s.len() > 64 {
        let mut end = 64;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl NarDecoder {
    pub fn new() -> Self {
        NarDecoder {
            state: State::Magic,
            buf: Vec::with_capacity(64),
            token_total: 0,
            executable: false,
            dirs: Vec::new(),
            offset: 0,
        }
    }

    /// Whether the whole NAR has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Consumes a prefix of `input`; returns how many bytes it took and the event they
    /// completed, if any. It takes at least one byte unless `input` is empty or the NAR
    /// is done.
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<NarEvent<'a>>), NarError> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::Done => break,
                State::Contents { remaining, pad } => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - pos);
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        if pad == 0 {
                            State::RegularClose
                        } else {
                            State::ContentsPadding { pad }
                        }
                    } else {
                        State::Contents {
                            remaining: left,
                            pad,
                        }
                    };
                    self.offset += n as u64;
                    return Ok((pos + n, Some(NarEvent::Contents(&input[pos..pos + n]))));
                }
                State::ContentsPadding { pad } => {
                    let n = (pad - self.buf.len()).min(input.len() - pos);
                    self.buf.extend_from_slice(&input[pos..pos + n]);
                    pos += n;
                    self.offset += n as u64;
                    if self.buf.len() == pad {
                        if self.buf.iter().any(|&b| b != 0) {
                            return Err(NarError::BadPadding {
                                offset: self.offset,
                            });
                        }
                        self.buf.clear();
                        self.state = State::RegularClose;
                    }
                }
                State::ContentsLength => {
                    let n = (8 - self.buf.len()).min(input.len() - pos);
                    self.buf.extend_from_slice(&input[pos..pos + n]);
                    pos += n;
                    self.offset += n as u64;
                    if self.buf.len() == 8 {
                        let mut word = [0u8; 8];
                        word.copy_from_slice(&self.buf);
                        self.buf.clear();
                        let size = u64::from_le_bytes(word);
                        let pad = padding_len(size);
                        self.state = if size == 0 {
                            State::RegularClose
                        } else {
                            State::Contents {
                                remaining: size,
                                pad,
                            }
                        };
                        let executable = self.executable;
                        return Ok((pos, Some(NarEvent::Regular { executable, size })));
                    }
                }
                _ => {
                    let (n, token) = self.take_token(&input[pos..])?;
                    pos += n;
                    if let Some(token) = token {
                        if let Some(event) = self.on_token(token)? {
                            return Ok((pos, Some(event)));
                        }
                    }
                }
            }
        }
        Ok((pos, None))
    }

    /// Accumulates one small wire string; returns its body when complete.
    fn take_token(&mut self, input: &[u8]) -> Result<(usize, Option<Vec<u8>>), NarError> {
        let mut used = 0;
        if self.buf.len() < 8 {
            let n = (8 - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..n]);
            used += n;
            self.offset += n as u64;
            if self.buf.len() < 8 {
                return Ok((used, None));
            }
            let mut word = [0u8; 8];
            word.copy_from_slice(&self.buf);
            let len = u64::from_le_bytes(word);
            if len > MAX_TOKEN_LEN as u64 {
                return Err(NarError::TooLong {
                    offset: self.offset,
                    what: self.token_name(),
                    len,
                    max: MAX_TOKEN_LEN,
                });
            }
            self.token_total = 8 + len as usize + padding_len(len);
        }
        let n = (self.token_total - self.buf.len()).min(input.len() - used);
        self.buf.extend_from_slice(&input[used..used + n]);
        used += n;
        self.offset += n as u64;
        if self.buf.len() < self.token_total {
            return Ok((used, None));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.buf[..8]);
        let len = u64::from_le_bytes(word) as usize;
        if self.buf[8 + len..].iter().any(|&b| b != 0) {
            return Err(NarError::BadPadding {
                offset: self.offset,
            });
        }
        let body = self.buf[8..8 + len].to_vec();
        self.buf.clear();
        Ok((used, Some(body)))
    }

    fn token_name(&self) -> &'static str {
        match self.state {
            State::SymlinkTarget => "symlink target",
            State::EntryName => "entry name",
            _ => "token",
        }
    }

    fn expect(&self, token: &[u8], expected: &'static str) -> Result<(), NarError> {
        if token == expected.as_bytes() {
            Ok(())
        } else {
            Err(self.unexpected(expected, token))
        }
    }

    fn unexpected(&self, expected: &'static str, found: &[u8]) -> NarError {
        NarError::Unexpected {
            offset: self.offset,
            expected,
            found: lossy(found),
        }
    }

    /// The node just closed: either the NAR is complete or its entry must close.
    fn after_node(&self) -> State {
        if self.dirs.is_empty() {
            State::Done
        } else {
            State::EntryClose
        }
    }

    fn on_token(&mut self, token: Vec<u8>) -> Result<Option<NarEvent<'static>>, NarError> {
        let event = match self.state {
            State::Magic => {
                if token != NAR_MAGIC {
                    return Err(self.unexpected("the NAR magic \"nix-archive-1\"", &token));
                }
                self.state = State::NodeOpen;
                None
            }
            State::NodeOpen => {
                self.expect(&token, "(")?;
                self.state = State::TypeKeyword;
                None
            }
            State::TypeKeyword => {
                self.expect(&token, "type")?;
                self.state = State::TypeValue;
                None
            }
            State::TypeValue => self.on_type(&token)?,
            State::RegularField => match token.as_slice() {
                b"executable" => {
                    self.state = State::ExecutableValue;
                    None
                }
                b"contents" => {
                    self.state = State::ContentsLength;
                    None
                }
                other => return Err(self.unexpected("\"executable\" or \"contents\"", other)),
            },
            State::ExecutableValue => {
                self.expect(&token, "")?;
                self.executable = true;
                self.state = State::ContentsKeyword;
                None
            }
            State::ContentsKeyword => {
                self.expect(&token, "contents")?;
                self.state = State::ContentsLength;
                None
            }
            State::RegularClose => {
                self.expect(&token, ")")?;
                self.state = self.after_node();
                Some(NarEvent::RegularEnd)
            }
            State::SymlinkKeyword => {
                self.expect(&token, "target")?;
                self.state = State::SymlinkTarget;
                None
            }
            State::SymlinkTarget => {
                self.state = State::SymlinkClose;
                Some(NarEvent::Symlink { target: token })
            }
            State::SymlinkClose => {
                self.expect(&token, ")")?;
                self.state = self.after_node();
                None
            }
            State::DirectoryField => match token.as_slice() {
                b"entry" => {
                    self.state = State::EntryOpen;
                    None
                }
                b")" => {
                    self.dirs.pop();
                    self.state = self.after_node();
                    Some(NarEvent::DirectoryEnd)
                }
                other => return Err(self.unexpected("\"entry\" or \")\"", other)),
            },
            State::EntryOpen => {
                self.expect(&token, "(")?;
                self.state = State::EntryNameKeyword;
                None
            }
            State::EntryNameKeyword => {
                self.expect(&token, "name")?;
                self.state = State::EntryName;
                None
            }
            State::EntryName => Some(self.on_entry_name(token)?),
            State::EntryNodeKeyword => {
                self.expect(&token, "node")?;
                self.state = State::NodeOpen;
                None
            }
            State::EntryClose => {
                self.expect(&token, ")")?;
                self.state = State::DirectoryField;
                Some(NarEvent::EntryEnd)
            }
            State::ContentsLength
            | State::Contents { .. }
            | State::ContentsPadding { .. }
            | State::Done => None,
        };
        Ok(event)
    }

    /// The node's type: `regular`, `symlink` or `directory`.
    fn on_type(&mut self, token: &[u8]) -> Result<Option<NarEvent<'static>>, NarError> {
        match token {
            b"regular" => {
                self.executable = false;
                self.state = State::RegularField;
                Ok(None)
            }
            b"symlink" => {
                self.state = State::SymlinkKeyword;
                Ok(None)
            }
            b"directory" => {
                if self.dirs.len() >= MAX_DEPTH {
                    return Err(NarError::TooDeep {
                        offset: self.offset,
                    });
                }
                self.dirs.push(None);
                self.state = State::DirectoryField;
                Ok(Some(NarEvent::DirectoryStart))
            }
            other => Err(self.unexpected("regular, symlink or directory", other)),
        }
    }

    /// A directory entry's name: not empty, `.`, `..`, nor with `/` or NUL, and after
    /// the previous entry's.
    fn on_entry_name(&mut self, token: Vec<u8>) -> Result<NarEvent<'static>, NarError> {
        let bad = token.is_empty()
            || token == b"."
            || token == b".."
            || token.contains(&b'/')
            || token.contains(&0);
        if bad {
            return Err(NarError::BadName {
                offset: self.offset,
                name: lossy(&token),
            });
        }
        let offset = self.offset;
        if let Some(Some(previous)) = self.dirs.last() {
            if token <= *previous {
                return Err(NarError::Unsorted {
                    offset,
                    name: lossy(&token),
                    previous: lossy(previous),
                });
            }
        }
        if let Some(last) = self.dirs.last_mut() {
            *last = Some(token.clone());
        }
        self.state = State::EntryNodeKeyword;
        Ok(NarEvent::Entry { name: token })
    }
}
