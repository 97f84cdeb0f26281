//! The wire readers over tokio's `AsyncRead`, for the serve-protocol client. They run the
//! same decoders as the sync readers (see [`super::Decode`]).

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{
    BoolDecoder, BytesDecoder, Decode, MessageBuffer, StringDecoder, StringsDecoder, U64Decoder,
    WireError,
};

/// Reads one message from `r` with `decoder`, reading no byte past its end.
/// Not cancel-safe: a cancelled read leaves the stream mid-message.
pub async fn read_message<R, D>(r: &mut R, decoder: D) -> Result<D::Output, WireError>
where
    R: AsyncRead + Unpin,
    D: Decode,
{
    let mut message = MessageBuffer::new(decoder);
    loop {
        if let Some(value) = message.step()? {
            return Ok(value);
        }
        match r.read(message.space()).await {
            Ok(n) => message.received(n)?,
            Err(e) => return Err(message.read_error(e)),
        }
    }
}

/// Reads a u64. Not cancel-safe: a partly read frame leaves the stream unusable.
pub async fn read_u64<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
) -> Result<u64, WireError> {
    read_message(r, U64Decoder::new(what)).await
}

/// Reads a bool (any non-zero value is true). Not cancel-safe.
pub async fn read_bool<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
) -> Result<bool, WireError> {
    read_message(r, BoolDecoder::new(what)).await
}

/// Reads a byte string of at most `max` bytes, checking its padding. Not cancel-safe.
pub async fn read_bytes<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
    max: usize,
) -> Result<Vec<u8>, WireError> {
    read_message(r, BytesDecoder::new(what, max)).await
}

/// Reads a UTF-8 string of at most `max` bytes. Not cancel-safe.
pub async fn read_string<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
    max: usize,
) -> Result<String, WireError> {
    read_message(r, StringDecoder::new(what, max)).await
}

/// Reads a list of UTF-8 strings. Not cancel-safe.
pub async fn read_strings<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
    max: usize,
) -> Result<Vec<String>, WireError> {
    read_message(r, StringsDecoder::new(what, max)).await
}
