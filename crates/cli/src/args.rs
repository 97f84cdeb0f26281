//! Command-line flags (clap derive). Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use offload_driver::env;

/// Runs Nix builds across a fleet of machines, planned as one graph.
///
/// offload drives stock Nix on every machine over OpenSSH (`nix-store --serve --write`,
/// the protocol behind `ssh://` stores) and reads machines in Nix's own syntax.
#[derive(Debug, Parser)]
#[command(
    name = "offload",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy store paths and their closures between stores.
    ///
    /// Only paths missing on the other side move; each NAR streams from one store to the
    /// other through offload, several at once, and the receiving Nix checks its hash
    /// before registering it.
    ///
    /// Examples:
    ///   offload copy --to ssh://builder1 /nix/store/…-hello
    ///   offload copy --from 'ssh://localhost?remote-store=/tmp/fleet/m1' /nix/store/…-hello
    ///   offload copy --from ssh://builder1 --to ssh://builder2 /nix/store/…-hello
    #[command(verbatim_doc_comment)]
    Copy(crate::copy::CopyArgs),

    /// Build derivations over the fleet and the local machine, planned as one graph.
    ///
    /// Takes what nix-build takes: a Nix file (with -A), an expression (-E) or .drv
    /// paths. Nix evaluates it; offload reads the derivation graph, builds exactly what
    /// Nix would build (valid outputs are skipped, substitutable ones are fetched by Nix),
    /// and places every build on the machine where it finishes first — the local
    /// machine included.
    ///
    /// Examples:
    ///   offload build default.nix -A hello
    ///   offload build -E '(import ./. {}).hello' --on builder1,builder2
    ///   offload build /nix/store/…-hello.drv --builders 'ssh://b1 x86_64-linux - 8 2' -j4
    #[command(verbatim_doc_comment)]
    Build(Box<BuildArgs>),

    /// Simulate a build graph on a fleet: offload against models of Nix and Hydra.
    ///
    /// offload's own scheduler runs against models of Nix 2.8's build hook and of
    /// Hydra's queue runner, on a discrete-event model of the fleet.
    ///
    /// The graph comes from a JSON file, a real .drv closure (durations from the
    /// history), or a generator; machines from Nix's syntax plus an optional JSON file
    /// with link figures, failures, the builders' direct links and a delivery target:
    ///   {"bandwidth": 1e8, "latency": 0.005,
    ///    "links": {"HOST": {"bandwidth": 1e7, "latency": 0.05}},
    ///    "speeds": {"HOST": {"aarch64-linux": 0.2}},
    ///    "failures": [{"machine": "HOST", "at": 30.0}],
    ///    "peers": {"bandwidth": 1e9, "latency": 0.3,
    ///              "pairs": [{"from": "HOST", "to": "HOST2", "bandwidth": 5e7}],
    ///              "unreachable": [{"from": "HOST", "to": "HOST3"}]},
    ///    "target": {"name": "ssh://target", "bandwidth": 2.5e6, "latency": 0.02}}
    /// `peers`: every builder sends to every other and to the target directly, at
    /// these figures; `pairs` set others (both ways unless "one_way": true), and
    /// `unreachable` pairs relay through the client. `target`: the requested outputs
    /// and what they were built from go there instead of home (as `offload build
    /// --to`), over the peer links or relayed, and inputs reach builders with their
    /// closures ("closure": false: outputs alone); the run ends when the last arrived. The report then gives the bytes by
    /// route: over the client's links, builder to builder, to the target.
    ///
    /// Examples:
    ///   offload simulate --generate nixpkgs:2000:1 --builders @machines --local-slots 8
    ///   offload simulate --dag graph.json --builders 'b1 x86_64-linux - 4 2' --policy all
    ///   offload simulate --generate nixpkgs-mixed:100000 --generate-fleet mixed:1000 --local-slots 8
    #[command(verbatim_doc_comment)]
    Simulate(SimulateArgs),

    /// Check what stands between each machine and a build, and say what to change.
    ///
    /// Per machine: whether a serve session opens (ssh, host key, login scripts that
    /// print, Nix on the PATH) and its round trip; the Nix version; whether its store
    /// takes imports from you; whether the local store takes its outputs; whether each
    /// system it declares really builds (a tiny derivation), and how fast. Exits 1 when a
    /// machine is broken (it cannot build); warnings leave the exit code 0.
    ///
    /// Examples:
    ///   offload doctor
    ///   offload doctor builder1 --builders @/etc/nix/machines
    #[command(verbatim_doc_comment)]
    Doctor(DoctorArgs),

    /// Print offload's effective settings and where each came from.
    ///
    /// offload's own file (`$OFFLOAD_CONFIG`, else `~/.config/offload/config.toml`) holds
    /// what only offload knows: machine groups for `--on @NAME`, defaults for `build`,
    /// the state directory. Machines themselves stay in Nix's settings.
    Config,

    /// Nix's build hook with offload's machine choice and transport.
    ///
    /// Set as Nix's `build-hook` (through a one-line script: `--print-config` writes it),
    /// plain nix-build, nix build, nixos-rebuild and the nix-daemon hand each derivation
    /// to offload, which builds it where it finishes first: on a builder from Nix's
    /// `builders` (a slot held in Nix's own ledger, /nix/var/nix/current-load), or here
    /// (it declines, and Nix builds it locally).
    ///
    /// Examples:
    ///   offload hook --print-config --script-dir /etc/nix
    ///   nix-build -A app --option build-hook /etc/nix/offload-build-hook --builders @machines
    #[command(verbatim_doc_comment)]
    Hook(HookArgs),

    /// Keep sessions to the builders open for `offload hook`, until stopped.
    ///
    /// Builds that Nix hands to `offload hook` then run on a warm session: no ssh
    /// handshake and no process start on the builder per build. Run it as the user that
    /// runs the hooks (root, for a nix-daemon): by hand, or with the systemd unit in
    /// `contrib/offload-agent.service`. The socket is private to that user.
    Agent(AgentArgs),

    /// List the machines a build would use: systems, features, slots, speed factor and
    /// current load (slots held by builds of any offload or Nix hook on this machine).
    ///
    /// Takes the same machine options as `build`.
    Machines(MachinesArgs),

    /// Show a recorded `offload build` run: a summary, an HTML report, or a trace.
    ///
    /// Every run is kept in the state database. The HTML report is one self-contained
    /// file: builds per machine slot with the critical path, utilisation, the longest
    /// builds. The trace opens in Perfetto (ui.perfetto.dev) or chrome://tracing.
    ///
    /// Examples:
    ///   offload report --html last.html
    ///   offload report 12 --trace run12.json
    ///   offload report --list
    #[command(verbatim_doc_comment)]
    Report(ReportArgs),

    /// Print a shell completion script for offload on stdout.
    ///
    /// Examples:
    ///   offload completions bash > ~/.local/share/bash-completion/completions/offload
    ///   offload completions zsh > ~/.zfunc/_offload
    ///   offload completions fish > ~/.config/fish/completions/offload.fish
    #[command(verbatim_doc_comment)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Write man pages: offload.1 and one per subcommand (offload-build.1, …).
    ///
    /// Example:
    ///   offload man --out ~/.local/share/man/man1
    #[command(verbatim_doc_comment)]
    Man {
        /// The directory to write them to (made if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run's number [default: the last run].
    #[arg(value_name = "RUN")]
    pub run: Option<i64>,

    /// Write the run as one self-contained HTML file.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,

    /// Write the run as Chrome trace events.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// List the recorded runs, newest first.
    #[arg(long, conflicts_with_all = ["run", "html", "trace"])]
    pub list: bool,

    /// The state database [default: as for `build --history`].
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MachinesArgs {
    #[command(flatten)]
    pub machines: MachineArgs,

    /// JSON Lines on stdout, one object per machine (`"type": "machine"`).
    #[arg(long)]
    pub json: bool,

    /// The state database with machines' failures and quarantines [default: as for
    /// `build --history`].
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where to listen [default: $OFFLOAD_AGENT_SOCKET, else agent.sock in offload's
    /// state directory, where `offload hook` looks].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Let members of this group hand builds to the agent too (socket mode 0660);
    /// without it only the agent's own user may.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT; port 0: any free one, said
    /// on stderr) [default: `metrics` in offload's config, else none].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Only these machines (as `--on` takes them; `local` for this one).
    #[arg(value_name = "HOST")]
    pub hosts: Vec<String>,

    #[command(flatten)]
    pub machines: MachineArgs,

    /// The key `offload build --sign-key` would sign with, for the outputs check.
    #[arg(long, value_name = "FILE", env = env::OFFLOAD_SIGN_KEY)]
    pub sign_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HookArgs {
    /// Nix's verbosity (0 error … 7 vomit), as Nix passes it to its hook.
    pub verbosity: Option<u8>,

    /// Print the nix.conf and NixOS settings that make Nix use this hook, and the
    /// script `build-hook` points at; nothing is read from stdin.
    #[arg(long)]
    pub print_config: bool,

    /// With --print-config: write the script as DIR/offload-build-hook.
    #[arg(long, value_name = "DIR", requires = "print_config")]
    pub script_dir: Option<PathBuf>,

    /// Machines in Nix's syntax (`@file` too) instead of the `builders` Nix hands the
    /// hook. Nix starts the hook with no flags, so this is read from the environment of
    /// the process that runs builds: yours on a single-user install, the daemon's on a
    /// multi-user one.
    #[arg(long, env = env::OFFLOAD_HOOK_BUILDERS, value_name = "SPEC")]
    pub builders: Option<String>,

    /// The build-duration history for estimates [default: $OFFLOAD_HISTORY, else
    /// ~/.local/state/offload/history.sqlite].
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
}

/// The schedulers `offload simulate` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyChoice {
    /// offload's own scheduler.
    Offload,
    /// A model of Nix 2.8's build hook with `--builders`.
    Nix,
    /// A model of Hydra's queue runner.
    Hydra,
    /// All three, side by side.
    All,
}

impl PolicyChoice {
    /// The policies to run, by the simulator's names.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            PolicyChoice::Offload => &["offload"],
            PolicyChoice::Nix => &["nix"],
            PolicyChoice::Hydra => &["hydra"],
            PolicyChoice::All => &["offload", "nix", "hydra"],
        }
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The graph as JSON: {"nodes":[{"id","deps","duration_s","system",
    /// "required_features","output_bytes"}]}.
    #[arg(long, value_name = "FILE", group = "graph")]
    pub dag: Option<PathBuf>,

    /// A generated graph: layered, nixpkgs, nixpkgs-mixed, wide or chain, N nodes,
    /// optional seed.
    #[arg(long, value_name = "SHAPE:N[:SEED]", group = "graph")]
    pub generate: Option<String>,

    /// A real derivation closure, durations from the build history.
    #[arg(long, value_name = "DRV", group = "graph")]
    pub from_drv: Option<String>,

    /// Machines in Nix's syntax, or @FILE.
    #[arg(long, value_name = "SPEC", default_value = "")]
    pub builders: String,

    /// Machines file (same as --builders @FILE).
    #[arg(long, value_name = "FILE", conflicts_with = "builders")]
    pub machines: Option<PathBuf>,

    /// Generated machines, added to the others: `mixed:N[:SEED]` (60 % x86_64-linux with
    /// 4-16 slots, speed 1-4, some big-parallel and kvm; 40 % aarch64-linux).
    #[arg(long, value_name = "SHAPE:N[:SEED]")]
    pub generate_fleet: Option<String>,

    /// Slots of the local machine (where offload or Nix runs).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub local_slots: u32,

    /// Link figures and machine failures (JSON, see above).
    #[arg(long, value_name = "FILE")]
    pub fleet: Option<PathBuf>,

    /// Which scheduler to run.
    #[arg(long, value_enum, default_value_t = PolicyChoice::All)]
    pub policy: PolicyChoice,

    /// offload plans without a history, as on its first run: every estimate the
    /// default, and the machines as the machines file declares them (its speed
    /// factors, the default link), while builds and copies take the true speeds and
    /// links of the fleet file. As `offload build` does, it fits the machines' speeds
    /// again during the run from the builds done so far.
    #[arg(long)]
    pub cold: bool,

    /// offload plans as on its second run: a first run is simulated (as with
    /// --cold), and offload plans with what its state would then hold, fitted as
    /// `offload build` fits it (each derivation's time, each machine's speed per
    /// system); links as they are. What a first run could not teach stays wrong.
    #[arg(long, conflicts_with = "cold")]
    pub second_run: bool,

    /// With --second-run: the fleet file of the machines as they were during the first
    /// run (the history), when they have changed since (a builder turned slow); the
    /// second run meets them as --fleet says.
    #[arg(long, value_name = "FILE", requires = "second_run")]
    pub history_fleet: Option<PathBuf>,

    /// JSON Lines on stdout, one object per policy.
    #[arg(long)]
    pub json: bool,

    /// Write a Chrome trace (chrome://tracing, Perfetto) of each policy's run to
    /// FILE (with the policy name added when several run).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// The history for --from-drv estimates.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,

    /// As if every copy between builders (and to the target) relayed through the
    /// client: the fleet file's `peers` left out.
    #[arg(long)]
    pub relay: bool,
}

/// Which machines a command uses: the same for `build`, `doctor` and `machines`.
#[derive(Debug, Clone, Args)]
pub struct MachineArgs {
    /// Machines in Nix's syntax (`builders` setting): `'ssh://b1 x86_64-linux - 4 2; b2'`
    /// or `@FILE`. Default: Nix's own `builders` setting. `ssh-ng://` machines run the
    /// `nix-store` beside their `remote-program` daemon (`DIR/nix-daemon` → `DIR/nix-store`).
    #[arg(long, value_name = "SPEC")]
    pub builders: Option<String>,

    /// Use only these machines (store URIs or host names, comma-separated).
    #[arg(long, value_name = "HOST,…", value_delimiter = ',')]
    pub on: Vec<String>,

    /// Do not use these machines.
    #[arg(long, value_name = "HOST,…", value_delimiter = ',')]
    pub exclude: Vec<String>,

    /// Build everything on the local machine.
    #[arg(long, conflicts_with_all = ["on", "builders"])]
    pub local_only: bool,

    /// Local build slots (Nix's max-jobs); 0 keeps builds off the local machine.
    #[arg(short = 'j', long = "max-jobs", value_name = "N")]
    pub max_jobs: Option<u32>,
}

impl MachineArgs {
    /// The choice as the driver's fleet construction takes it.
    pub fn choice(&self) -> offload_driver::fleet::MachineChoice {
        offload_driver::fleet::MachineChoice {
            builders: self.builders.clone(),
            on: self.on.clone(),
            exclude: self.exclude.clone(),
            local_only: self.local_only,
            max_jobs: self.max_jobs,
        }
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Nix files, .drv paths or flake installables (`.#pkg`, `path:/dir#attr`,
    /// `github:owner/repo#pkg`) to build (default: ./default.nix). Anything with a `#` or
    /// a flake scheme (`path:`, `github:`, `git+file:`, …) is a flake installable, as
    /// for `nix build`.
    #[arg(value_name = "FILE|DRV|INSTALLABLE")]
    pub targets: Vec<String>,

    /// Attribute to build from the file (repeatable).
    #[arg(short = 'A', long = "attr", value_name = "ATTR")]
    pub attrs: Vec<String>,

    /// Build the result of this Nix expression instead of a file.
    #[arg(
        short = 'E',
        long = "expr",
        value_name = "EXPR",
        conflicts_with = "targets"
    )]
    pub expr: Option<String>,

    /// Pass `--arg NAME EXPR` to the evaluation.
    #[arg(long, num_args = 2, value_names = ["NAME", "EXPR"])]
    pub arg: Vec<String>,

    /// Pass `--argstr NAME STRING` to the evaluation.
    #[arg(long, num_args = 2, value_names = ["NAME", "STRING"])]
    pub argstr: Vec<String>,

    /// Add a path to the Nix search path of the evaluation (`-I nixpkgs=/dir`, repeatable).
    #[arg(short = 'I', value_name = "PATH")]
    pub include: Vec<String>,

    /// Set a Nix setting for the evaluation; settings that concern builds (`sandbox`,
    /// `post-build-hook`, `max-build-log-size`, …) also go to every machine's build
    /// session (repeatable).
    #[arg(long, num_args = 2, value_names = ["NAME", "VALUE"])]
    pub option: Vec<String>,

    /// Build a flake installable with its input INPUT taken from flake reference REF.
    #[arg(long, num_args = 2, value_names = ["INPUT", "REF"])]
    pub override_input: Vec<String>,

    /// Show the evaluation's whole stack trace on an evaluation error.
    #[arg(long)]
    pub show_trace: bool,

    #[command(flatten)]
    pub machines: MachineArgs,

    /// Go on with everything that does not depend on a failed build.
    #[arg(short = 'k', long)]
    pub keep_going: bool,

    /// Name of the output links (like nix-build's `--out-link`).
    #[arg(short = 'o', long, value_name = "PATH", default_value = "result")]
    pub out_link: String,

    /// Create no output links.
    #[arg(long)]
    pub no_out_link: bool,

    /// offload's state (SQLite): build durations, and machines that keep failing.
    /// Default: $OFFLOAD_HISTORY or ~/.local/state/offload/history.sqlite.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,

    /// Seconds an ssh connection may go unanswered (connecting, or silent mid-transfer
    /// or mid-build) before its machine counts as down and its work moves.
    #[arg(long, value_name = "S", default_value_t = env::STALL_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_timeout: u64,

    /// Seconds before a machine that failed is tried again; doubled with each further
    /// failure, up to a minute.
    #[arg(long, value_name = "S", default_value_t = env::RETRY_BACKOFF.as_secs())]
    pub retry_backoff: u64,

    /// Consecutive failures (counted over runs) after which a machine is quarantined.
    #[arg(long, value_name = "N", default_value_t = env::QUARANTINE_AFTER, value_parser = clap::value_parser!(u32).range(1..))]
    pub quarantine_after: u32,

    /// Seconds a quarantine lasts: until then, runs skip the machine.
    #[arg(long, value_name = "S", default_value_t = env::QUARANTINE_FOR.as_secs())]
    pub quarantine: u64,

    /// Write where and when each build ran as Chrome trace-event JSON, the format of
    /// `offload simulate --trace`.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// Write a report of the run as one self-contained HTML file: builds per machine
    /// slot on a time line with the critical path, utilisation, the ten longest builds.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Serve Prometheus metrics of this run at http://ADDR/metrics while it lasts (IP:PORT;
    /// port 0: any free one) [default: `[build] metrics` in offload's config, else none].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Seconds of silence before a build is killed (0: no limit).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub max_silent_time: u64,

    /// Seconds before a build is killed (0: no limit).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub timeout: u64,

    /// Do not print build logs while building.
    #[arg(short = 'Q', long)]
    pub no_build_output: bool,

    /// Keep the build directory of a failed build (on the machine that ran it); the
    /// failure names the directory and the machine.
    #[arg(short = 'K', long)]
    pub keep_failed: bool,

    /// Build the requested derivations again, wherever the plan puts them, and fail
    /// with Nix's "may not be deterministic" when an output differs from the valid one.
    #[arg(long, conflicts_with = "repair")]
    pub check: bool,

    /// Repair corrupted or missing paths of the requested derivations' closures in the
    /// local store, rebuilding them with Nix on this machine.
    #[arg(long)]
    pub repair: bool,

    /// Let builders fetch inputs from their own substituters instead of receiving them
    /// from this machine (default: Nix's `builders-use-substitutes`).
    #[arg(long)]
    pub builders_use_substitutes: bool,

    /// Copy every built output to the local store, not only the requested ones.
    #[arg(long)]
    pub fetch_all_outputs: bool,

    /// Show what would be built and fetched, and the machines, then stop.
    #[arg(long)]
    pub dry_run: bool,

    /// Sign what other machines build with this Nix secret key (from `nix-store
    /// --generate-binary-cache-key`) before it enters the local store: a nix-daemon that
    /// does not trust you takes paths signed by a key in its `trusted-public-keys`.
    #[arg(long, value_name = "FILE", env = env::OFFLOAD_SIGN_KEY)]
    pub sign_key: Option<PathBuf>,

    /// Deliver the requested outputs' closures to STORE, straight from the machines holding
    /// them: `ssh://`, `ssh-ng://`, `file:///DIR` (with --sign-key), … No result links.
    #[arg(long, value_name = "STORE", conflicts_with_all = ["through_daemon", "repair", "check"])]
    pub to: Option<String>,

    /// Send every copy between machines through this one, as Nix does (for builders that
    /// must not talk to each other, and for comparison).
    #[arg(long)]
    pub relay: bool,

    /// Forward your ssh agent to the builders for their copies to each other and to --to.
    #[arg(long)]
    pub forward_agent: bool,

    /// Stop when a builder's outputs could not enter the local store, instead of
    /// building without that builder.
    #[arg(long)]
    pub no_local_fallback: bool,

    /// Let the nix-daemon build (as `nix-build` would), handing derivations to its
    /// `offload hook`; `--on`/`--exclude` reach that hook through `offload agent`, since
    /// the daemon passes an untrusted client's `builders` on to nobody.
    #[arg(long, conflicts_with_all = ["json", "check", "repair"])]
    pub through_daemon: bool,

    /// JSON Lines on stdout, one event per line (`planned`, `build_started`,
    /// `build_finished`, `build_failed`, `summary` with the output paths); nothing else
    /// goes to stdout. The README lists the fields.
    #[arg(long)]
    pub json: bool,
}
