//! Each host's `/root`: this machine's, with a layer of the host's own on top (an
//! overlay in the host's mount namespace, its upper layer `home/upper` in the host's
//! directory). Whatever the host writes under `/root` stays in its layer, and this
//! machine's `/root` (which may have no `.ssh` at all) stays untouched.
//!
//! The layer holds an empty `.bashrc` and `.profile`: a host is not this machine's
//! login. sshd's bash reads `~/.bashrc` for every command, and this machine's may set up
//! tools for its user (pyenv's rehash takes a lock under `/root` that a session cut
//! short leaves behind, and every later session then waits a minute for it). A fleet
//! with [`Peers`](crate::Peers) adds `.ssh` there.

use std::fs;
use std::path::Path;

/// Makes `home`'s `upper/` (with the empty shell start-up files) and `work/`.
pub(crate) fn write_home(home: &Path) -> Result<(), String> {
    let upper = home.join("upper");
    for dir in [&upper, &home.join("work")] {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for name in [".bashrc", ".profile"] {
        let path = upper.join(name);
        fs::write(&path, "# an offload test host: no shell set-up\n")
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The mount command that lays `home` (its `upper/` and `work/`) over `/root`.
pub(crate) fn mount_home(home: &Path) -> String {
    format!(
        "mount -t overlay offload-test-home -o lowerdir=/root,upperdir='{up}',workdir='{work}' /root",
        up = home.join("upper").display(),
        work = home.join("work").display(),
    )
}
