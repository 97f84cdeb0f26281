//! `offload hook`: hands Nix's build-hook protocol to the driver, or prints the settings
//! that install it.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use offload_driver::config;
use offload_driver::hook::{self, HookOptions};
use offload_driver::metrics::http::Exposed;
use offload_driver::metrics::Serving;
use offload_driver::shutdown::Shutdown;
use offload_driver::slots::SlotLedger;

use crate::args::{AgentArgs, HookArgs};
use crate::Failure;

/// The script's file name under `--script-dir`.
const SCRIPT_NAME: &str = "offload-build-hook";
/// Where the printed settings put the script when no directory is given.
const DEFAULT_SCRIPT_DIR: &str = "/etc/nix";

/// Runs the hook (its exit status for Nix), or prints its configuration (0).
pub async fn run(args: HookArgs) -> Result<u8, Failure> {
    if args.print_config {
        print_config(args.script_dir.as_deref())?;
        return Ok(0);
    }
    let options = HookOptions {
        builders: args.builders.filter(|b| !b.trim().is_empty()),
        history: Some(
            args.history
                .unwrap_or_else(offload_driver::env::state_db_path),
        ),
        ledger: SlotLedger::from_env(),
    };
    let mut replies = std::io::stderr();
    let exit = hook::run(options, tokio::io::stdin(), &mut replies).await;
    Ok(exit.code())
}

/// Runs the agent until Ctrl-C or SIGTERM.
pub async fn agent(args: AgentArgs) -> Result<(), Failure> {
    let socket = args
        .socket
        .unwrap_or_else(offload_driver::env::agent_socket);
    // Watched from here on, before the socket is announced: a SIGTERM right after the
    // announcement still removes the socket.
    let shutdown = Shutdown::on_signals()
        .context("cannot watch for SIGINT and SIGTERM")
        .map_err(Failure::usage)?;
    let metrics = match args.metrics {
        Some(addr) => Some(addr),
        None => config::load().map_err(Failure::usage)?.config.metrics,
    };
    // Bound before the socket: an address that cannot be had stops the agent at once.
    let exposed = Exposed::bind(metrics, Serving::Agent)
        .await
        .map_err(Failure::usage)?;
    if let Some(addr) = exposed.addr() {
        eprintln!("offload agent: metrics at http://{addr}/metrics");
    }
    let listening = |at: &Path| eprintln!("offload agent: listening on {}", at.display());
    let (group, counted) = (args.group.as_deref(), exposed.metrics());
    let stop = shutdown.token().cancelled_owned();
    let agent = offload_driver::agent::serve(&socket, group, counted, listening, stop);
    exposed.around(agent).await.map_err(Failure::usage)
}

/// The script `build-hook` names: Nix runs a program with the verbosity as its one
/// argument, so the subcommand goes in a script.
fn script(offload: &Path) -> String {
    format!(
        "#!/bin/sh\n# Nix's build hook, by offload.\nexec {} hook \"$@\"\n",
        offload_driver::shell_quote(&offload.display().to_string())
    )
}

fn print_config(script_dir: Option<&Path>) -> Result<(), Failure> {
    let offload = std::env::current_exe()
        .context("cannot tell where the offload binary is")
        .map_err(Failure::usage)?;
    let body = script(&offload);
    let dir = script_dir.unwrap_or(Path::new(DEFAULT_SCRIPT_DIR));
    let path: PathBuf = dir.join(SCRIPT_NAME);
    let mut out = String::new();
    if let Some(dir) = script_dir {
        write_script(dir, &path, &body)?;
        out.push_str(&format!("# wrote {}:\n", path.display()));
    } else {
        out.push_str(&format!(
            "# save as {} (mode 0755), or run again with --script-dir DIR to write it:\n",
            path.display()
        ));
    }
    for line in body.lines() {
        out.push_str(&format!("#   {line}\n"));
    }
    out.push_str(&format!(
        "\n# nix.conf: ~/.config/nix/nix.conf for a single-user install, /etc/nix/nix.conf for a\n\
         # daemon install (then restart nix-daemon); machines as for Nix's own hook\n\
         build-hook = {path}\n\
         builders = @/etc/nix/machines\n\
         builders-use-substitutes = true\n\
         \n\
         # NixOS (configuration.nix), with `offload` the package:\n\
         #   environment.etc.\"nix/{SCRIPT_NAME}\" = {{ mode = \"0755\"; text = ''\n\
         #     #!/bin/sh\n\
         #     exec ${{offload}}/bin/offload hook \"$@\"\n\
         #   ''; }};\n\
         #   nix.settings.build-hook = \"/etc/nix/{SCRIPT_NAME}\";\n\
         #   nix.distributedBuilds = true;   # nix.buildMachines become `builders`\n\
         #   # The agent: warm sessions for every build the hook hands off.\n\
         #   users.groups.offload = {{ }};   # members may use --through-daemon --on\n\
         #   systemd.services.offload-agent = {{\n\
         #     wantedBy = [ \"multi-user.target\" ]; after = [ \"nix-daemon.service\" ];\n\
         #     environment.OFFLOAD_AGENT_SOCKET = \"/var/lib/offload/agent.sock\";\n\
         #     serviceConfig.ExecStart = \"${{offload}}/bin/offload agent --group offload\";\n\
         #     serviceConfig.StateDirectory = \"offload\";\n\
         #   }};\n\
         #   systemd.services.nix-daemon.environment.OFFLOAD_AGENT_SOCKET = \"/var/lib/offload/agent.sock\";\n\
         #\n\
         # Elsewhere, the agent by hand or with contrib/offload-agent.service:\n\
         #   offload agent --group offload\n",
        path = path.display()
    ));
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot print the configuration")
        .map_err(Failure::work)
}

fn write_script(dir: &Path, path: &Path, body: &str) -> Result<(), Failure> {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(path, body)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
    };
    write()
        .with_context(|| {
            format!(
                "cannot write the hook script {}: choose a directory you may write with --script-dir",
                path.display()
            )
        })
        .map_err(Failure::usage)
}
