//! `offload agent`: a long-lived process that keeps serve sessions to the builders open,
//! so that a build handed off by `offload hook` costs no ssh handshake and no process
//! start on the far side. The hook still chooses the machine and holds its slot in the
//! shared ledger ([`crate::slots`]); the agent carries the build out (inputs, the build,
//! outputs back) on a warm session, streaming the log back to the hook.
//!
//! It listens on a Unix socket at [`crate::env::agent_socket`] or a path given to it, mode 0600
//! (only its own user, who is root when the nix-daemon runs the hooks), or 0660 with a
//! group whose members may hand it builds. A stale
//! socket (no process behind it) is replaced. The exchange is one JSON object per line:
//! the hook sends `{"endpoint": …, "order": …}`; the agent answers with `{"log": LINE}`
//! lines and ends with `{"done": null}` or `{"done": {"message": …, "status": …}}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use offload_nix::hook::LogLevel;

use crate::env::HOST_CHOICE_LIFETIME;
use crate::env::SLOT_WAIT_LIMIT;

use crate::metrics::Metrics;
use crate::order::{carry_out, saying_while, BuildOrder, Moved, OrderFailure};
use crate::session::{Pool, StoreId};
use crate::slots::remote::RemoteSlots;
use crate::slots::SlotLedger;
use crate::ssh::Endpoint;

/// The agent could not listen, or a client could not be served.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another offload agent already listens on {path}")]
    Running { path: PathBuf },
    #[error("talking to the agent at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} sent something offload cannot read: {message}")]
    Garbled { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    /// From the hook: carry out this build.
    Build {
        endpoint: Box<Endpoint>,
        order: Box<BuildOrder>,
    },
    /// From a user (`offload build --through-daemon`): these derivations go only to
    /// the machines chosen.
    Prefer {
        drvs: Vec<String>,
        choice: HostChoice,
    },
    /// From the hook: the machines chosen for this derivation, if any.
    Ask { drv: String },
    /// From the hook, before it accepts: have a session with this machine ready, or say
    /// why there cannot be one.
    Warm { endpoint: Box<Endpoint> },
}

/// A user's choice of hosts for some derivations, as `--on` and `--exclude` take them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostChoice {
    pub on: Vec<String>,
    pub exclude: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    Log(String),
    /// What the agent is doing or waiting for, for Nix to show at Nix's verbosity
    /// `level` (see [`offload_nix::hook::LogLevel`]).
    Note {
        level: u8,
        msg: String,
    },
    Done(Option<OrderFailure>),
    Choice(Option<HostChoice>),
}

/// Users' choices of hosts, per derivation.
#[derive(Default)]
struct Choices(Mutex<HashMap<String, (HostChoice, std::time::Instant)>>);

impl Choices {
    fn set(&self, drvs: Vec<String>, choice: &HostChoice) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, at)| at.elapsed() < HOST_CHOICE_LIFETIME);
        let now = std::time::Instant::now();
        for drv in drvs {
            map.insert(drv, (choice.clone(), now));
        }
    }

    fn get(&self, drv: &str) -> Option<HostChoice> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(drv)
            .filter(|(_, at)| at.elapsed() < HOST_CHOICE_LIFETIME)
            .map(|(c, _)| c.clone())
    }
}

/// Warm sessions per machine, shared by every build the agent carries out.
#[derive(Default)]
struct Sessions {
    /// Per machine, its pool and what was last seen of its store.
    pools: Mutex<HashMap<String, SeenPool>>,
    /// Per machine (and slot count), its slots locked on the machine itself; the
    /// broker there lives as long as the agent.
    remote_slots: Mutex<HashMap<(String, u32), Arc<RemoteSlots>>>,
}

/// How long the agent trusts what it last saw of a builder's store reached over ssh
/// before asking again whether it is the same store (a store on this machine is looked
/// at every time: that costs nothing).
const STORE_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// A machine's pool, the identity of its store when last seen, and when that was.
struct SeenPool {
    pool: Arc<Pool>,
    store: Option<StoreId>,
    checked: Option<std::time::Instant>,
}

impl Sessions {
    /// The machine's pool: a new one (and a new slot broker) when its store is not the
    /// one its sessions were opened on.
    async fn pool(&self, endpoint: &Endpoint) -> Arc<Pool> {
        // The endpoint's full description is the key: the same host reached another way
        // is another machine.
        let key = serde_json::to_string(endpoint).unwrap_or_else(|_| endpoint.name.clone());
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            let entry = pools.entry(key.clone()).or_insert_with(|| SeenPool {
                pool: Arc::new(Pool::new(endpoint.clone())),
                store: None,
                checked: None,
            });
            let due = endpoint.is_local_process()
                || entry.checked.is_none_or(|at| at.elapsed() >= STORE_RECHECK);
            if !due {
                return entry.pool.clone();
            }
            entry.pool.clone()
        };
        // Asked without the lock held: over ssh it takes a round trip.
        let now = pool.store_identity().await;
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = pools.get_mut(&key) else {
            return pool;
        };
        if !Arc::ptr_eq(&entry.pool, &pool) {
            // Another build replaced it meanwhile.
            return entry.pool.clone();
        }
        // Until the store is known (it may not exist before the first session), it is
        // looked at on every build.
        if now.is_some() {
            entry.checked = Some(std::time::Instant::now());
        }
        match (entry.store, now) {
            (Some(seen), now) if Some(seen) != now => {
                tracing::info!(
                    "{}: its store was deleted or made again; opening new sessions",
                    endpoint.name
                );
                entry.pool = Arc::new(Pool::new(endpoint.clone()));
                entry.store = now;
                let mut slots = self.remote_slots.lock().unwrap_or_else(|p| p.into_inner());
                slots.retain(|(k, _), _| *k != key);
            }
            (None, Some(_)) => entry.store = now,
            _ => {}
        }
        entry.pool.clone()
    }

    /// The machine's slot broker, over the ssh connection its sessions share.
    async fn remote_slots(&self, endpoint: &Endpoint, slots: u32) -> Arc<RemoteSlots> {
        let master = self.pool(endpoint).await.master();
        let key = serde_json::to_string(endpoint).unwrap_or_else(|_| endpoint.name.clone());
        let mut all = self.remote_slots.lock().unwrap_or_else(|p| p.into_inner());
        all.entry((key, slots))
            .or_insert_with(|| {
                Arc::new(RemoteSlots::new([(endpoint.clone(), slots)]).with_masters([master]))
            })
            .clone()
    }
}

/// Listens on `socket` until `stop` completes; each connection is one build, counted in
/// `metrics`. With `group`, members of that group may connect too. `listening` is
/// called once the socket is ready.
pub async fn serve(
    socket: &Path,
    group: Option<&str>,
    metrics: Arc<Metrics>,
    listening: impl FnOnce(&Path),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            return Err(AgentError::Running {
                path: socket.to_path_buf(),
            });
        }
        // Stale: its agent is gone.
        let _ = std::fs::remove_file(socket);
    }
    let listener = UnixListener::bind(socket).map_err(|source| AgentError::Listen {
        path: socket.to_path_buf(),
        source,
    })?;
    let listen_err = |source| AgentError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    let mode = match group {
        Some(name) => {
            let gid = group_id(name).map_err(listen_err)?;
            rustix::fs::chown(socket, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| listen_err(e.into()))?;
            0o660
        }
        None => 0o600,
    };
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
            .map_err(listen_err)?;
    }
    listening(socket);
    let sessions = Arc::new(Sessions::default());
    let choices = Arc::new(Choices::default());
    let ledger = Arc::new(SlotLedger::from_env());
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let sessions = sessions.clone();
        let choices = choices.clone();
        let (ledger, metrics) = (ledger.clone(), metrics.clone());
        tokio::spawn(async move {
            match serve_one(stream, &sessions, &choices, &ledger, &metrics).await {
                // The hook went away (Nix killed it): nobody to tell.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    tracing::debug!("a hook left before its answer: {e}");
                }
                Err(e) => tracing::warn!("{e}"),
                Ok(()) => {}
            }
        });
    }
    let _ = std::fs::remove_file(socket);
    let pools: Vec<Arc<Pool>> = sessions
        .pools
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|seen| seen.pool.clone())
        .collect();
    for pool in pools {
        pool.close().await;
    }
    Ok(())
}

/// The id of group `name`, from /etc/group.
fn group_id(name: &str) -> std::io::Result<u32> {
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            Some((group, gid))
        })
        .find(|(group, _)| *group == name)
        .map(|(_, gid)| gid)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no group {name:?} in /etc/group (create it with `groupadd {name}`)"),
            )
        })
}

/// One build for one hook.
async fn serve_one(
    stream: UnixStream,
    sessions: &Sessions,
    choices: &Choices,
    ledger: &SlotLedger,
    metrics: &Arc<Metrics>,
) -> std::io::Result<()> {
    let peer = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await? == 0 {
        // A hook that only checked that the agent is up.
        return Ok(());
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let failure = OrderFailure {
                message: format!("the agent cannot read the request: {e}"),
                status: None,
            };
            return send(&mut write, &Message::Done(Some(failure))).await;
        }
    };
    let (endpoint, order) = match request {
        Request::Build { endpoint, order } => (endpoint, order),
        Request::Prefer { drvs, choice } => {
            tracing::info!(
                "user {} chose {choice:?} for {} derivations",
                peer.map_or("?".into(), |u| u.to_string()),
                drvs.len()
            );
            choices.set(drvs, &choice);
            return send(&mut write, &Message::Done(None)).await;
        }
        Request::Ask { drv } => {
            return send(&mut write, &Message::Choice(choices.get(&drv))).await;
        }
        Request::Warm { endpoint } => {
            let pool = sessions.pool(&endpoint).await;
            let failure = match pool.get().await {
                Ok(conn) => {
                    pool.put(conn);
                    None
                }
                Err(e) => Some(OrderFailure {
                    message: e.with_hint(),
                    status: None,
                }),
            };
            return send(&mut write, &Message::Done(failure)).await;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let work = async {
        let mut watch = metrics.build(&endpoint.name, order.slots);
        let pool = sessions.pool(&endpoint).await;
        // Held until the build ends, so clients on other machines do not overbook it.
        let note_tx = tx.clone();
        let note = move |level: LogLevel, msg: &str| {
            let msg = msg.to_string();
            let _ = note_tx.send(Message::Note {
                level: level as u8,
                msg,
            });
        };
        let what = format!(
            "waiting for a build slot on '{}': other clients hold all {} of its slots",
            endpoint.name, order.slots
        );
        let slots = sessions.remote_slots(&endpoint, order.slots).await;
        let taking = slots.take(0, SLOT_WAIT_LIMIT);
        let on_builder = saying_while(taking, &what, &mut |m| note(LogLevel::Info, m)).await;
        let _lease = (on_builder.as_ref().ok().and_then(Option::as_ref))
            .zip(crate::state::leases::Leases::open())
            .map(|(slot, leases)| leases.take(&endpoint.name, slot.slot(), order.name(), 0.0));
        let session = match on_builder {
            Ok(held) => pool.get_with_cores(None).await.map(|remote| (held, remote)),
            Err(e) => Err(e),
        };
        let mut moved = Moved::default();
        let outcome = match session {
            Ok((_held, mut remote)) => {
                watch.started();
                let log_tx = tx.clone();
                let mut log = move |l: &str| {
                    let _ = log_tx.send(Message::Log(l.to_string()));
                };
                let mut talk = |m: &str| note(LogLevel::Talkative, m);
                let result =
                    carry_out(&order, &mut remote, ledger, &mut log, &mut talk, &mut moved).await;
                // A session that failed mid-frame is never reused.
                pool.put(remote);
                result.map_err(|e| OrderFailure::from(&e))
            }
            Err(e) => Err(OrderFailure {
                message: match e.hint() {
                    Some(hint) => format!("{e}\nhint: {hint}"),
                    None => e.to_string(),
                },
                status: None,
            }),
        };
        watch.ended(outcome.is_ok(), moved.sent, moved.fetched);
        let _ = tx.send(Message::Done(outcome.err()));
    };
    let forward = async {
        while let Some(message) = rx.recv().await {
            let done = matches!(message, Message::Done(_));
            send(&mut write, &message).await?;
            if done {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let ((), sent) = tokio::join!(work, forward);
    sent
}

async fn send(
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    message: &Message,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    to.write_all(&line).await?;
    to.flush().await
}

/// The hook's side: one connection to the agent.
pub struct AgentClient {
    path: PathBuf,
    stream: UnixStream,
}

impl AgentClient {
    /// Connects, or says why not (no agent running is the common case).
    pub async fn connect(socket: &Path) -> Result<AgentClient, AgentError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| AgentError::Io {
                path: socket.to_path_buf(),
                source,
            })?;
        Ok(AgentClient {
            path: socket.to_path_buf(),
            stream,
        })
    }

    /// Has the agent carry out `order` on `endpoint`; log lines go to `log` as they
    /// come. The outer error is the agent's own failure, the inner one the build's.
    pub async fn build(
        self,
        endpoint: &Endpoint,
        order: &BuildOrder,
        log: &mut (dyn FnMut(&str) + Send),
        note: &mut (dyn FnMut(LogLevel, &str) + Send),
    ) -> Result<Result<(), OrderFailure>, AgentError> {
        let request = Request::Build {
            endpoint: Box::new(endpoint.clone()),
            order: Box::new(order.clone()),
        };
        let path = self.path.clone();
        let mut lines = self.send_request(&request).await?;
        loop {
            match next_message(&path, &mut lines).await? {
                Message::Log(text) => log(&text),
                Message::Note { level, msg } => note(level_of(level), &msg),
                Message::Done(None) => return Ok(Ok(())),
                Message::Done(Some(failure)) => return Ok(Err(failure)),
                Message::Choice(_) => {
                    return Err(AgentError::Garbled {
                        path,
                        message: "it answered a build with a choice of hosts".into(),
                    })
                }
            }
        }
    }

    /// Records that `drvs` go only to the machines `choice` names.
    pub async fn prefer(self, drvs: Vec<String>, choice: HostChoice) -> Result<(), AgentError> {
        let path = self.path.clone();
        let mut lines = self.send_request(&Request::Prefer { drvs, choice }).await?;
        match next_message(&path, &mut lines).await? {
            Message::Done(None) => Ok(()),
            _ => Err(AgentError::Garbled {
                path,
                message: "it did not take the choice of hosts".into(),
            }),
        }
    }

    /// Has the agent ready a session with `endpoint`; the error says why it cannot.
    pub async fn warm(self, endpoint: &Endpoint) -> Result<Result<(), OrderFailure>, AgentError> {
        let path = self.path.clone();
        let request = Request::Warm {
            endpoint: Box::new(endpoint.clone()),
        };
        let mut lines = self.send_request(&request).await?;
        match next_message(&path, &mut lines).await? {
            Message::Done(None) => Ok(Ok(())),
            Message::Done(Some(failure)) => Ok(Err(failure)),
            _ => Err(AgentError::Garbled {
                path,
                message: "it answered a warm-up with something else".into(),
            }),
        }
    }

    /// The machines a user chose for `drv`, if any.
    pub async fn ask(self, drv: &str) -> Result<Option<HostChoice>, AgentError> {
        let path = self.path.clone();
        let request = Request::Ask {
            drv: drv.to_string(),
        };
        let mut lines = self.send_request(&request).await?;
        match next_message(&path, &mut lines).await? {
            Message::Choice(choice) => Ok(choice),
            _ => Err(AgentError::Garbled {
                path,
                message: "it answered a question about hosts with something else".into(),
            }),
        }
    }

    /// Sends one request; the replies come as lines.
    async fn send_request(
        self,
        request: &Request,
    ) -> Result<tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>, AgentError> {
        let path = self.path.clone();
        let io = |source| AgentError::Io {
            path: path.clone(),
            source,
        };
        let (read, mut write) = self.stream.into_split();
        let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        write.write_all(&line).await.map_err(io)?;
        Ok(BufReader::new(read).lines())
    }
}

/// Nix's verbosity level from its number (anything past talkative is talkative).
fn level_of(level: u8) -> LogLevel {
    match level {
        0 => LogLevel::Error,
        1 => LogLevel::Warn,
        2 => LogLevel::Notice,
        3 => LogLevel::Info,
        _ => LogLevel::Talkative,
    }
}

/// The next reply line, read as a message.
async fn next_message(
    path: &Path,
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> Result<Message, AgentError> {
    let line = lines
        .next_line()
        .await
        .map_err(|source| AgentError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| AgentError::Garbled {
            path: path.to_path_buf(),
            message: "it closed the connection without an answer".into(),
        })?;
    serde_json::from_str(&line).map_err(|e| AgentError::Garbled {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
