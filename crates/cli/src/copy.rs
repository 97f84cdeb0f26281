//! `offload copy`: copies closures between stores (the local one or any other).

use std::path::{Component, Path, PathBuf};

use clap::Args;

pub use offload_driver::human_bytes;
use offload_driver::{copy_closure, CopyOptions, Endpoint};
use offload_nix::store_path::store_dir;

use crate::Failure;

/// `offload copy`'s arguments.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Store to copy to: `ssh://[user@]host[?remote-store=DIR]`, `local`, or a chroot
    /// store directory. Default: the local store.
    #[arg(long, value_name = "URI", required_unless_present = "from")]
    pub to: Option<String>,

    /// Store to copy from. Default: the local store. Between two ssh stores the source
    /// sends straight to the destination (its own ssh config and keys), else through here.
    #[arg(long, value_name = "URI")]
    pub from: Option<String>,

    /// Between two machines, stream everything through this one.
    #[arg(long)]
    pub relay: bool,

    /// Forward your ssh agent to the source for its copy.
    #[arg(long)]
    pub forward_agent: bool,

    /// What "the local store" means: `local` (this machine's store) or a chroot store
    /// directory.
    #[arg(long, value_name = "URI", default_value = "local")]
    pub store: String,

    /// Transfers in flight at once.
    #[arg(short, long, value_name = "N", default_value_t = 4)]
    pub jobs: usize,

    /// Store paths whose closures to copy.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

pub async fn run(args: CopyArgs, quiet: bool) -> Result<(), Failure> {
    let endpoint =
        |uri: Option<&String>| Endpoint::parse(uri.unwrap_or(&args.store)).map_err(Failure::usage);
    let from = endpoint(args.from.as_ref())?;
    let to = endpoint(args.to.as_ref())?;
    let paths = args
        .paths
        .iter()
        .map(|p| store_path_of(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    let options = CopyOptions {
        jobs: args.jobs.max(1),
        relay: args.relay,
        forward_agent: args.forward_agent,
    };
    let stats = copy_closure(&from, &to, &paths, &options)
        .await
        .map_err(Failure::work)?;
    if quiet {
        return Ok(());
    }
    if let Some(reason) = &stats.relayed_because {
        eprintln!(
            "note: {} cannot reach {} directly ({reason}); the paths went through this machine",
            from.name, to.name
        );
    }
    let secs = stats.elapsed.as_secs_f64();
    eprintln!(
        "copied {} paths ({}) from {} to {} in {:.2} s; {} of {} already there",
        stats.copied,
        human_bytes(stats.bytes),
        from.name,
        to.name,
        secs,
        stats.already_present,
        stats.closure,
    );
    if stats.direct_bytes > 0 {
        eprintln!(
            "{} of it went straight from {} to {}",
            human_bytes(stats.direct_bytes),
            from.name,
            to.name
        );
    }
    Ok(())
}

/// The store path named by `arg`: a store path, a file inside one, or a symlink (such as
/// `./result`) to one. Chroot stores keep `/nix/store/…` as the logical path, so links
/// are read, not resolved on disk.
fn store_path_of(arg: &Path) -> anyhow::Result<String> {
    let mut path = arg.to_path_buf();
    for _ in 0..40 {
        if let Some(store_path) = store_prefix(&path) {
            return Ok(store_path);
        }
        let target = match std::fs::read_link(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::bail!("{}: no such file or directory", arg.display())
            }
            Err(_) => anyhow::bail!(
                "{} is neither a store path (under {}) nor a symlink to one",
                arg.display(),
                store_dir()
            ),
        };
        path = match path.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    anyhow::bail!("{}: too many levels of symbolic links", arg.display())
}

fn store_prefix(path: &Path) -> Option<String> {
    let rest = path.strip_prefix(store_dir().as_str()).ok()?;
    match rest.components().next() {
        Some(Component::Normal(name)) => {
            Some(format!("{}/{}", store_dir(), name.to_string_lossy()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_prefix_takes_the_top_path() {
        let p = Path::new("/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi/bin/x");
        assert_eq!(
            store_prefix(p).as_deref(),
            Some("/nix/store/agv9y5spdscfhh7lbxa5bf94hgx9bbx3-hi")
        );
        assert_eq!(store_prefix(Path::new("/tmp/x")), None);
        assert_eq!(store_prefix(Path::new("/nix/store")), None);
    }
}
