//! `offload agent` as the hook's tests run it: on the socket `agent.sock` of a work
//! directory (where the tests' hook scripts point `OFFLOAD_AGENT_SOCKET`), with its
//! slots under it and its stderr in `agent.log` there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `offload` (the binary under test) as `offload agent` for the work directory
/// `dir`, with `env` added, and returns it with its log once it listens (within 30 s).
pub fn start_hook_agent(offload: &Path, dir: &Path, env: &[(&str, &str)]) -> (Child, PathBuf) {
    let log = dir.join("agent.log");
    let agent = Command::new(offload)
        .arg("agent")
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .env("OFFLOAD_SLOTS_DIR", dir.join("slots"))
        .env(crate::NIX_CONFIG.0, crate::NIX_CONFIG.1)
        .envs(env.iter().copied())
        .stderr(std::fs::File::create(&log).expect("the agent's log file"))
        .stdout(Stdio::null())
        .spawn()
        .expect("offload agent starts");
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent did not listen: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (agent, log)
}
