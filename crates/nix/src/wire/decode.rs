//! Sans-I/O decoding of wire messages: every message is parsed once, here, from byte
//! slices, and the sync ([`read_message`]) and async (`tokio_io::read_message`) drivers
//! only move bytes.
//!
//! A [`Decode`]r is fed the bytes that follow what it consumed before and answers with a
//! [`Step`]: either the message is complete, or it consumed the fields it could finish and
//! needs at least `need` more bytes before it can finish the next one. Fields are taken
//! whole (a string is consumed once its length, body and padding are all there), so a
//! partial field is never parsed twice and a message of N fields costs O(N) however the
//! bytes are split. `need` never reaches past the current field, so a driver that reads
//! at most `need` bytes never reads past the message and never waits for bytes the peer
//! has not sent yet (the peer may be waiting for our reply).
//!
//! Decoders are single-use: after `Done` their state is spent.

use std::io::{self, Read};

use super::{check_len, check_padding, padding_len, WireError, MAX_LIST_LEN};

/// What a decoder made of the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<T> {
    /// The message is complete; its last `consumed` bytes were at the start of the input.
    Done { value: T, consumed: usize },
    /// The input ends inside the message. The first `consumed` bytes are taken; the next
    /// call's input (the bytes after those) must hold at least `need` bytes, which all
    /// belong to the field named `what`.
    Incomplete {
        consumed: usize,
        need: usize,
        what: &'static str,
    },
}

/// A resumable decoder of one wire message, with no I/O.
///
/// It is fed the bytes that follow what it consumed before and answers with a [`Step`].
/// Fields are taken whole and stored in the decoder, so no byte is parsed twice and a
/// message costs linear time however its bytes are split. `need` never reaches past the
/// current field: a driver that reads at most `need` bytes (as [`read_message`] does)
/// never reads past the message nor waits for bytes the peer has not sent. Decoders are
/// single-use.
pub trait Decode {
    type Output;

    /// Decodes from the start of `input`, which continues right after the bytes that
    /// earlier calls consumed.
    fn decode(&mut self, input: &[u8]) -> Result<Step<Self::Output>, WireError>;
}

/// Why parsing stopped before the message was complete.
pub(crate) enum Stop {
    /// `need` bytes from the cursor's position are required to finish the field `what`.
    Incomplete {
        need: usize,
        what: &'static str,
    },
    Fail(WireError),
}

impl From<WireError> for Stop {
    fn from(e: WireError) -> Self {
        Stop::Fail(e)
    }
}

/// A read position in one `decode` call's input; it advances by whole fields only.
pub(crate) struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The next `n` bytes, all of one field named `what`.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Stop> {
        let rest = &self.input[self.pos..];
        match rest.get(..n) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(Stop::Incomplete { need: n, what }),
        }
    }

    fn peek_u64(&self, what: &'static str) -> Result<u64, Stop> {
        let rest = &self.input[self.pos..];
        match rest.first_chunk::<8>() {
            Some(word) => Ok(u64::from_le_bytes(*word)),
            None => Err(Stop::Incomplete { need: 8, what }),
        }
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, Stop> {
        let value = self.peek_u64(what)?;
        self.pos += 8;
        Ok(value)
    }

    /// A bool; any non-zero value is true, as Nix reads it.
    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, Stop> {
        Ok(self.u64(what)? != 0)
    }

    /// A list length, at most [`MAX_LIST_LEN`].
    pub(crate) fn count(&mut self, what: &'static str) -> Result<usize, Stop> {
        let len = check_len(what, self.peek_u64(what)?, MAX_LIST_LEN)?;
        self.pos += 8;
        Ok(len)
    }

    /// A byte string of at most `max` bytes. Its length is checked before anything is
    /// allocated or waited for, so a hostile length fails at once.
    pub(crate) fn bytes(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, Stop> {
        let len = check_len(what, self.peek_u64(what)?, max)?;
        let pad = padding_len(len as u64);
        let field = self.take(8 + len + pad, what)?;
        check_padding(what, &field[8 + len..])?;
        Ok(field[8..8 + len].to_vec())
    }

    /// Runs `parse` as one field: if it stops for lack of bytes, nothing it read counts
    /// as consumed, so fields read together (a key and its value) are stored together.
    pub(crate) fn all_or_nothing<T>(
        &mut self,
        parse: impl FnOnce(&mut Self) -> Result<T, Stop>,
    ) -> Result<T, Stop> {
        let start = self.pos;
        parse(self).map_err(|stop| match stop {
            Stop::Incomplete { need, what } => {
                let read = self.pos - start;
                self.pos = start;
                Stop::Incomplete {
                    need: read + need,
                    what,
                }
            }
            fail => fail,
        })
    }

    pub(crate) fn string(&mut self, what: &'static str, max: usize) -> Result<String, Stop> {
        String::from_utf8(self.bytes(what, max)?)
            .map_err(|_| Stop::Fail(WireError::NotUtf8 { what }))
    }
}

/// Runs a parse over `input` and turns where it stopped into a [`Step`]. The parse must
/// store every field it completes in its decoder, since the cursor position is reported
/// as consumed.
pub(crate) fn run<T>(
    input: &[u8],
    parse: impl FnOnce(&mut Cursor<'_>) -> Result<T, Stop>,
) -> Result<Step<T>, WireError> {
    let mut cur = Cursor { input, pos: 0 };
    match parse(&mut cur) {
        Ok(value) => Ok(Step::Done {
            value,
            consumed: cur.pos,
        }),
        Err(Stop::Incomplete { need, what }) => Ok(Step::Incomplete {
            consumed: cur.pos,
            need,
            what,
        }),
        Err(Stop::Fail(e)) => Err(e),
    }
}

/// Lets a message's parse be written top to bottom yet resume where it stopped: each
/// field runs once, and a later call skips the fields an earlier call completed.
pub(crate) struct Stages<'s> {
    /// Fields completed by this and earlier calls (kept in the decoder).
    done: &'s mut usize,
    /// Index of the next field in this call's walk through the message.
    next: usize,
}

impl<'s> Stages<'s> {
    pub(crate) fn new(done: &'s mut usize) -> Self {
        Stages { done, next: 0 }
    }

    /// Parses a field into `slot` unless an earlier call completed it.
    pub(crate) fn field<T>(
        &mut self,
        cur: &mut Cursor<'_>,
        slot: &mut T,
        parse: impl FnOnce(&mut Cursor<'_>) -> Result<T, Stop>,
    ) -> Result<(), Stop> {
        if self.next == *self.done {
            *slot = parse(cur)?;
            *self.done += 1;
        }
        self.next += 1;
        Ok(())
    }

    /// Runs `item` for the items of a `count`-long run that earlier calls did not
    /// complete. Skipping the completed ones is O(1), which keeps long lists linear.
    pub(crate) fn repeat(
        &mut self,
        cur: &mut Cursor<'_>,
        count: usize,
        mut item: impl FnMut(&mut Cursor<'_>) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let completed = self.done.saturating_sub(self.next).min(count);
        for _ in completed..count {
            item(cur)?;
            *self.done += 1;
        }
        self.next += count;
        Ok(())
    }

    /// A string list: a count field, then that many strings pushed onto `items`.
    pub(crate) fn strings(
        &mut self,
        cur: &mut Cursor<'_>,
        list: &mut StringList,
        what: &'static str,
        max: usize,
    ) -> Result<(), Stop> {
        self.field(cur, &mut list.count, |c| c.count(what))?;
        // Grow as entries arrive rather than trusting the count with an allocation.
        if list.items.is_empty() {
            list.items.reserve(list.count.min(1024));
        }
        let items = &mut list.items;
        self.repeat(cur, list.count, |c| {
            items.push(c.string(what, max)?);
            Ok(())
        })
    }
}

/// A string list being received: its announced length and the entries so far.
#[derive(Debug, Default)]
pub(crate) struct StringList {
    count: usize,
    pub(crate) items: Vec<String>,
}

/// Decodes a u64.
#[derive(Debug, Clone)]
pub struct U64Decoder {
    what: &'static str,
}

impl U64Decoder {
    pub fn new(what: &'static str) -> Self {
        U64Decoder { what }
    }
}

impl Decode for U64Decoder {
    type Output = u64;

    fn decode(&mut self, input: &[u8]) -> Result<Step<u64>, WireError> {
        run(input, |c| c.u64(self.what))
    }
}

/// Decodes a bool (any non-zero value is true).
#[derive(Debug, Clone)]
pub struct BoolDecoder {
    what: &'static str,
}

impl BoolDecoder {
    pub fn new(what: &'static str) -> Self {
        BoolDecoder { what }
    }
}

impl Decode for BoolDecoder {
    type Output = bool;

    fn decode(&mut self, input: &[u8]) -> Result<Step<bool>, WireError> {
        run(input, |c| c.bool(self.what))
    }
}

/// Decodes a byte string of at most `max` bytes, checking its padding.
#[derive(Debug, Clone)]
pub struct BytesDecoder {
    what: &'static str,
    max: usize,
}

impl BytesDecoder {
    pub fn new(what: &'static str, max: usize) -> Self {
        BytesDecoder { what, max }
    }
}

impl Decode for BytesDecoder {
    type Output = Vec<u8>;

    fn decode(&mut self, input: &[u8]) -> Result<Step<Vec<u8>>, WireError> {
        run(input, |c| c.bytes(self.what, self.max))
    }
}

/// Decodes a UTF-8 string of at most `max` bytes.
#[derive(Debug, Clone)]
pub struct StringDecoder {
    what: &'static str,
    max: usize,
}

impl StringDecoder {
    pub fn new(what: &'static str, max: usize) -> Self {
        StringDecoder { what, max }
    }
}

impl Decode for StringDecoder {
    type Output = String;

    fn decode(&mut self, input: &[u8]) -> Result<Step<String>, WireError> {
        run(input, |c| c.string(self.what, self.max))
    }
}

/// Decodes a list of at most [`MAX_LIST_LEN`] UTF-8 strings of at most `max` bytes each.
#[derive(Debug)]
pub struct StringsDecoder {
    what: &'static str,
    max: usize,
    stage: usize,
    list: StringList,
}

impl StringsDecoder {
    pub fn new(what: &'static str, max: usize) -> Self {
        StringsDecoder {
            what,
            max,
            stage: 0,
            list: StringList::default(),
        }
    }
}

impl Decode for StringsDecoder {
    type Output = Vec<String>;

    fn decode(&mut self, input: &[u8]) -> Result<Step<Vec<String>>, WireError> {
        run(input, |c| {
            Stages::new(&mut self.stage).strings(c, &mut self.list, self.what, self.max)?;
            Ok(std::mem::take(&mut self.list.items))
        })
    }
}

/// The I/O-free half of a driver: the bytes of the current field received so far, and
/// how many more the decoder needs. Shared by the sync and async drivers.
#[derive(Debug)]
pub struct MessageBuffer<D> {
    decoder: D,
    /// Unconsumed bytes, then room up to what the decoder needs.
    buf: Vec<u8>,
    filled: usize,
    /// The field being waited for, for end-of-stream and I/O errors.
    what: &'static str,
}

impl<D: Decode> MessageBuffer<D> {
    pub fn new(decoder: D) -> Self {
        MessageBuffer {
            decoder,
            buf: Vec::new(),
            filled: 0,
            what: "message",
        }
    }

    /// Runs the decoder over the bytes received. `Some` when the message is complete;
    /// `None` when more bytes must be read into [`MessageBuffer::space`].
    pub fn step(&mut self) -> Result<Option<D::Output>, WireError> {
        match self.decoder.decode(&self.buf[..self.filled])? {
            Step::Done { value, .. } => Ok(Some(value)),
            Step::Incomplete {
                consumed,
                need,
                what,
            } => {
                self.buf.copy_within(consumed..self.filled, 0);
                self.filled -= consumed;
                self.buf.resize(need.max(self.filled), 0);
                self.what = what;
                Ok(None)
            }
        }
    }

    /// Where the next read goes: exactly as many bytes as the decoder still needs, so a
    /// read never takes bytes past the message.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.filled..]
    }

    /// Records that a read put `n` bytes into [`MessageBuffer::space`]; 0 is end of stream.
    pub fn received(&mut self, n: usize) -> Result<(), WireError> {
        if n == 0 {
            return Err(WireError::Eof { what: self.what });
        }
        self.filled += n;
        Ok(())
    }

    /// A read error, named after the field being read.
    pub fn read_error(&self, source: io::Error) -> WireError {
        WireError::from_io(self.what, source)
    }
}

/// Reads one message from `r` with `decoder`, reading no byte past its end.
pub fn read_message<D: Decode>(r: &mut impl Read, decoder: D) -> Result<D::Output, WireError> {
    let mut message = MessageBuffer::new(decoder);
    loop {
        if let Some(value) = message.step()? {
            return Ok(value);
        }
        match r.read(message.space()) {
            Ok(n) => message.received(n)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(message.read_error(e)),
        }
    }
}
