//! A private PostgreSQL server for tests of the shared state: Debian's `postgresql`
//! (installed by `scripts/setup.sh`), its cluster in a temporary directory, run as the
//! `postgres` user (tests run as root), listening only on a Unix socket in a directory
//! of its own, with a database and role `offload`. Dropping it stops the server
//! (`pg_ctl stop -m immediate`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require_root, run, unavailable};

/// The database and role the server holds for offload.
pub const DATABASE: &str = "offload";

/// A running server.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    running: bool,
}

/// A private server, or None (with `skipped: …`, or a panic under
/// [`crate::REQUIRE_E2E`]) when this machine cannot start one.
pub fn require_postgres() -> Option<PgServer> {
    if !require_root() {
        return None;
    }
    match PgServer::start() {
        Ok(server) => Some(server),
        Err(e) => {
            unavailable(&format!("a private PostgreSQL server cannot start: {e}"));
            None
        }
    }
}

impl PgServer {
    /// Creates a cluster and starts it, with the `offload` role and database.
    pub fn start() -> Result<PgServer, String> {
        let bin = server_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("offload-pg")
            .tempdir()
            .map_err(|e| format!("a temporary directory: {e}"))?;
        // The server listens on its socket only, in a directory of its own: the port
        // names the socket file, and need not be free on the network.
        let port = 5439;
        let server = PgServer {
            dir,
            bin,
            port,
            running: false,
        };
        // The postgres user reaches its directories through this one.
        run(Command::new("chmod").arg("0755").arg(server.dir.path()))?;
        for sub in ["data", "sock"] {
            std::fs::create_dir(server.dir.path().join(sub))
                .map_err(|e| format!("creating {sub}: {e}"))?;
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(server.dir.path().join(sub)))?;
        }
        server.as_postgres(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        let mut server = server;
        server.start_again()?;
        server.sql_in("postgres", &format!("CREATE ROLE {DATABASE} LOGIN"))?;
        server.sql_in(
            "postgres",
            &format!("CREATE DATABASE {DATABASE} OWNER {DATABASE}"),
        )?;
        Ok(server)
    }

    /// Starts the (stopped) server again on the same socket and port.
    pub fn start_again(&mut self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses='' -k {} -p {} -c fsync=off -c max_connections=200",
            self.socket_dir().display(),
            self.port
        );
        let log = self.dir.path().join("sock/server.log");
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log.display().to_string(),
                "-w",
                "start",
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): every
    /// client's connection ends.
    pub fn stop_immediate(&mut self) -> Result<(), String> {
        if !std::mem::replace(&mut self.running, false) {
            return Ok(());
        }
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
        .map(|_| ())
    }

    /// The URI a client uses: libpq's, the socket directory in `host=`.
    pub fn uri(&self) -> String {
        format!(
            "postgresql:///{DATABASE}?host={}&port={}&user={DATABASE}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// The directory of the server's socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Runs `sql` in the `offload` database as the superuser; what psql printed
    /// (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.sql_in(DATABASE, sql)
    }

    fn sql_in(&self, database: &str, sql: &str) -> Result<String, String> {
        self.as_postgres(
            "psql",
            &[
                "-h",
                &self.socket_dir().display().to_string(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-A",
                "-t",
                "-c",
                sql,
            ],
        )
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .current_dir(self.dir.path()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}

/// The newest installed server's programs (`/usr/lib/postgresql/VERSION/bin`).
fn server_bin() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| format!("{}: {e} (Debian's postgresql package)", root.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| format!("no initdb under {}", root.display()))
}
