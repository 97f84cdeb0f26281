//! Decoders of the serve protocol's replies (docs/nix-protocols.md §6), and the async
//! readers that run them.

use super::{
    sends_build_times, sends_nar_hash, strip_ansi, BuildResult, BuildStatus, PathInfo,
    MAX_REPLY_STRING,
};
use crate::wire::{run, Decode, Stages, Step, StringList, StringsDecoder, U64Decoder, WireError};

/// The server's first handshake word (should be [`super::SERVE_MAGIC_2`]), or, read a
/// second time, the server's version.
pub fn handshake_decoder() -> U64Decoder {
    U64Decoder::new("server protocol version")
}

/// A path list reply (QueryValidPaths, QueryClosure).
pub fn path_list_decoder() -> StringsDecoder {
    StringsDecoder::new("store path list", MAX_REPLY_STRING)
}

/// The one-word acknowledgement of ImportPaths and AddToStoreNar (1).
pub fn ack_decoder() -> U64Decoder {
    U64Decoder::new("import acknowledgement")
}

/// A QueryPathInfos reply: the infos of the valid paths, up to an empty-string path.
#[derive(Debug)]
pub struct PathInfosDecoder {
    server_version: u64,
    infos: Vec<PathInfo>,
    record: PathInfoRecord,
}

/// One path info being received.
#[derive(Debug, Default)]
struct PathInfoRecord {
    stage: usize,
    info: PathInfo,
    deriver: String,
    ca: String,
    references: StringList,
    sigs: StringList,
    download_size: u64,
}

impl PathInfosDecoder {
    pub fn new(server_version: u64) -> Self {
        PathInfosDecoder {
            server_version,
            infos: Vec::new(),
            record: PathInfoRecord::default(),
        }
    }
}

impl Decode for PathInfosDecoder {
    type Output = Vec<PathInfo>;

    fn decode(&mut self, input: &[u8]) -> Result<Step<Vec<PathInfo>>, WireError> {
        const MAX: usize = MAX_REPLY_STRING;
        run(input, |cur| loop {
            let r = &mut self.record;
            let mut s = Stages::new(&mut r.stage);
            s.field(cur, &mut r.info.path, |c| c.string("path info: path", MAX))?;
            if r.info.path.is_empty() {
                return Ok(std::mem::take(&mut self.infos));
            }
            s.field(cur, &mut r.deriver, |c| c.string("path info: deriver", MAX))?;
            s.strings(cur, &mut r.references, "path info: references", MAX)?;
            s.field(cur, &mut r.download_size, |c| {
                c.u64("path info: download size")
            })?;
            s.field(cur, &mut r.info.nar_size, |c| c.u64("path info: NAR size"))?;
            // Servers older than 2.4 send no hash, content address or signatures.
            if sends_nar_hash(self.server_version) {
                s.field(cur, &mut r.info.nar_hash, |c| {
                    c.string("path info: NAR hash", MAX)
                })?;
                s.field(cur, &mut r.ca, |c| {
                    c.string("path info: content address", MAX)
                })?;
                s.strings(cur, &mut r.sigs, "path info: signatures", MAX)?;
            }
            let r = std::mem::take(&mut self.record);
            self.infos.push(PathInfo {
                deriver: (!r.deriver.is_empty()).then_some(r.deriver),
                references: r.references.items,
                ca: (!r.ca.is_empty()).then_some(r.ca),
                sigs: r.sigs.items,
                ..r.info
            });
        })
    }
}

/// A BuildDerivation reply. `builtOutputs` is read whatever the version: a 2.8 server
/// always sends it (docs/nix-protocols.md §6.8).
#[derive(Debug)]
pub struct BuildResultDecoder {
    server_version: u64,
    stage: usize,
    result: BuildResult,
    outputs: usize,
}

fn blank_result() -> BuildResult {
    BuildResult {
        status: BuildStatus::Built,
        error_msg: String::new(),
        times_built: 0,
        is_non_deterministic: false,
        start_time: 0,
        stop_time: 0,
        built_outputs: Vec::new(),
    }
}

impl BuildResultDecoder {
    pub fn new(server_version: u64) -> Self {
        BuildResultDecoder {
            server_version,
            stage: 0,
            result: blank_result(),
            outputs: 0,
        }
    }
}

impl Decode for BuildResultDecoder {
    type Output = BuildResult;

    fn decode(&mut self, input: &[u8]) -> Result<Step<BuildResult>, WireError> {
        const MAX: usize = MAX_REPLY_STRING;
        let r = &mut self.result;
        let mut s = Stages::new(&mut self.stage);
        run(input, |cur| {
            s.field(cur, &mut r.status, |c| {
                Ok(BuildStatus::from_code(c.u64("build status")?))
            })?;
            s.field(cur, &mut r.error_msg, |c| {
                Ok(strip_ansi(&c.string("build error message", MAX)?))
            })?;
            if sends_build_times(self.server_version) {
                s.field(cur, &mut r.times_built, |c| c.u64("build times built"))?;
                s.field(cur, &mut r.is_non_deterministic, |c| {
                    c.bool("build non-determinism flag")
                })?;
                s.field(cur, &mut r.start_time, |c| c.u64("build start time"))?;
                s.field(cur, &mut r.stop_time, |c| c.u64("build stop time"))?;
            }
            s.field(cur, &mut self.outputs, |c| c.count("built outputs count"))?;
            let outputs = &mut r.built_outputs;
            s.repeat(cur, self.outputs, |c| {
                let pair = c.all_or_nothing(|c| {
                    let id = c.string("built output id", MAX)?;
                    Ok((id, c.string("built output realisation", MAX)?))
                })?;
                outputs.push(pair);
                Ok(())
            })?;
            Ok(std::mem::replace(r, blank_result()))
        })
    }
}

/// A BuildPaths reply: `Ok(())` on success, else the worker's exit status and message.
#[derive(Debug, Default)]
pub struct BuildPathsResultDecoder {
    stage: usize,
    status: u64,
}

impl BuildPathsResultDecoder {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Decode for BuildPathsResultDecoder {
    type Output = Result<(), (u64, String)>;

    fn decode(&mut self, input: &[u8]) -> Result<Step<Self::Output>, WireError> {
        let status = &mut self.status;
        let mut s = Stages::new(&mut self.stage);
        run(input, |cur| {
            s.field(cur, status, |c| c.u64("build paths status"))?;
            if *status == 0 {
                return Ok(Ok(()));
            }
            // The message is the last field: once it is complete nothing needs storing.
            let msg = cur.string("build paths error message", MAX_REPLY_STRING)?;
            Ok(Err((*status, strip_ansi(&msg))))
        })
    }
}

#[cfg(feature = "async")]
pub use self::tokio_io::*;

#[cfg(feature = "async")]
mod tokio_io {
    use tokio::io::AsyncRead;

    use super::*;
    use crate::wire::tokio_io::read_message;

    /// Reads the server's handshake reply: returns the first word (should be
    /// [`SERVE_MAGIC_2`](super::super::SERVE_MAGIC_2)) and, if it matched, the server's
    /// version. Not cancel-safe.
    pub async fn read_handshake<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, WireError> {
        read_message(r, handshake_decoder()).await
    }

    /// Reads a path list reply (QueryValidPaths, QueryClosure). Not cancel-safe.
    pub async fn read_path_list<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<String>, WireError> {
        read_message(r, path_list_decoder()).await
    }

    /// Reads a QueryPathInfos reply. Not cancel-safe.
    pub async fn read_path_infos<R: AsyncRead + Unpin>(
        r: &mut R,
        server_version: u64,
    ) -> Result<Vec<PathInfo>, WireError> {
        read_message(r, PathInfosDecoder::new(server_version)).await
    }

    /// Reads the one-word acknowledgement of ImportPaths and AddToStoreNar (1).
    /// Not cancel-safe.
    pub async fn read_ack<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, WireError> {
        read_message(r, ack_decoder()).await
    }

    /// Reads a BuildDerivation reply. Not cancel-safe.
    pub async fn read_build_result<R: AsyncRead + Unpin>(
        r: &mut R,
        server_version: u64,
    ) -> Result<BuildResult, WireError> {
        read_message(r, BuildResultDecoder::new(server_version)).await
    }

    /// Reads a BuildPaths reply: `Ok(())` on success, else the worker's exit status and
    /// message. Not cancel-safe.
    pub async fn read_build_paths_result<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Result<(), (u64, String)>, WireError> {
        read_message(r, BuildPathsResultDecoder::new()).await
    }
}
