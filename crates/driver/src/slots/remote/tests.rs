use super::broker::{parse_reply, Reply, SPARE_LINGER};
use super::*;
use crate::slots::SlotLedger;
use std::process::Stdio;

const NOW: Duration = Duration::ZERO;

/// A broker run as a local process on a chroot store under `root`.
fn slots_at(root: &std::path::Path, slots: u32) -> RemoteSlots {
    let endpoint = Endpoint::local("m1", Some(root.display().to_string()));
    RemoteSlots::new([(endpoint, slots)])
}

async fn take_now(slots: &RemoteSlots) -> Result<Option<RemoteSlot>, DriverError> {
    slots.take(0, NOW).await
}

#[test]
fn locks_live_under_the_store_root() {
    let at = |store: Option<&str>| lock_dir(&Endpoint::local("m", store.map(String::from)));
    assert_eq!(at(None), "/nix/var/nix/offload-slots");
    assert_eq!(at(Some("/tmp/m1")), "/tmp/m1/nix/var/nix/offload-slots");
    assert_eq!(at(Some("/tmp/m1/")), "/tmp/m1/nix/var/nix/offload-slots");
    assert_eq!(
        at(Some("local?root=/x&foo=1")),
        "/x/nix/var/nix/offload-slots"
    );
    assert_eq!(at(Some("daemon")), "/nix/var/nix/offload-slots");
    // Parameters read as Nix reads them: %-escapes decoded.
    assert_eq!(
        at(Some("local?root=%2Fsrv%2Fs")),
        "/srv/s/nix/var/nix/offload-slots"
    );
    let e = Endpoint::parse("ssh://b1?remote-store=/srv/s").unwrap();
    assert_eq!(lock_dir(&e), "/srv/s/nix/var/nix/offload-slots");
}

#[test]
fn replies_are_checked() {
    assert_eq!(parse_reply("slot 1", 2), Ok(Reply::Slot(1)));
    assert!(parse_reply("slot 2", 2).is_err());
    assert!(parse_reply("slot -1", 2).is_err());
    assert_eq!(parse_reply("others 2", 2), Ok(Reply::Others(2)));
    assert!(parse_reply("others 3", 2).is_err());
    assert!(parse_reply("busy now", 2).is_err());
    assert!(parse_reply("", 2).is_err());
    assert!(parse_reply("\u{1b}[31mWelcome!", 2).is_err());
}

#[tokio::test]
async fn takes_until_busy_and_a_release_frees() {
    let root = tempfile::tempdir().unwrap();
    let slots = slots_at(root.path(), 2);
    let a = take_now(&slots).await.unwrap().expect("slot 0");
    let b = take_now(&slots).await.unwrap().expect("slot 1");
    assert_eq!((a.slot(), b.slot()), (0, 1));
    let err = take_now(&slots).await.unwrap_err();
    assert!(
        matches!(err, DriverError::SlotsBusy { slots: 2, .. }),
        "{err}"
    );
    // This run holds both: nobody else does.
    assert_eq!(slots.held_elsewhere(0), Some(0));
    drop(a);
    let c = take_now(&slots).await.unwrap().expect("slot 0 freed");
    assert_eq!(c.slot(), 0);
    let dir = root.path().join(SLOTS_SUBDIR);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1777, "{}", dir.display());
}

#[tokio::test]
async fn a_second_client_sees_and_respects_the_first() {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (slots_at(root.path(), 2), slots_at(root.path(), 2));
    let _held = take_now(&one).await.unwrap().expect("slot");
    assert_eq!(two.held_elsewhere(0), None, "not looked yet");
    let other = take_now(&two).await.unwrap().expect("the other slot");
    two.refresh_others().await;
    assert_eq!(two.held_elsewhere(0), Some(1));
    assert!(take_now(&two).await.is_err());
    assert_eq!(two.held_elsewhere(0), Some(1));
    // A take waits for the other client's slot, and gets it when freed.
    let waiting = tokio::spawn(async move {
        let got = one.take(0, Duration::from_secs(10)).await;
        (got.map(|s| s.map(|s| s.slot())), one)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished());
    drop(other);
    let (got, _one) = waiting.await.unwrap();
    assert_eq!(got.unwrap(), Some(1));
}

/// The negative control of `crates/cli/tests/remote_slots.rs`: two clients with their
/// own ledgers both get the builder's only slot; the builder-side lock refuses one.
#[tokio::test]
async fn client_ledgers_alone_overbook_a_shared_builder() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let uri = "ssh://shared-builder";
    let _one = SlotLedger::new(a.path()).try_take(uri, 1).unwrap().unwrap();
    assert!(SlotLedger::new(b.path())
        .try_take(uri, 1)
        .unwrap()
        .is_some());
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (slots_at(root.path(), 1), slots_at(root.path(), 1));
    let _held = take_now(&one).await.unwrap().expect("slot");
    assert!(take_now(&two).await.is_err());
}

#[tokio::test]
async fn a_broker_whose_stdin_closes_frees_everything() {
    use std::io::{BufRead as _, Write as _};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(SLOTS_SUBDIR).display().to_string();
    // The broker itself, as a crashed client leaves it: slots held, stdin at EOF.
    let mut broker = std::process::Command::new("sh")
        .arg("-c")
        .arg(broker_command(&dir, 3))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = broker.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(broker.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready "), "{line}");
    stdin.write_all(b"take\ntake\ntake\ntake\n").unwrap();
    let replies: Vec<String> = (0..4)
        .map(|_| {
            let mut l = String::new();
            stdout.read_line(&mut l).unwrap();
            l.trim().to_string()
        })
        .collect();
    assert_eq!(replies, ["slot 0", "slot 1", "slot 2", "busy"]);
    let two = slots_at(root.path(), 3);
    assert!(take_now(&two).await.is_err());
    two.refresh_others().await;
    assert_eq!(two.held_elsewhere(0), Some(3));
    drop(stdin);
    assert!(broker.wait().unwrap().success());
    for _ in 0..3 {
        assert!(take_now(&two).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn a_cancelled_take_holds_nothing() {
    let root = tempfile::tempdir().unwrap();
    let slots = slots_at(root.path(), 1);
    drop(take_now(&slots).await.unwrap().unwrap());
    // Cancelled while the broker answers: the slot it took is freed again.
    let cancelled = tokio::select! {
        biased;
        _ = take_now(&slots) => false,
        () = std::future::ready(()) => true,
    };
    assert!(cancelled, "the take finished at once");
    // Its broker has no other slot: the next take gets slot 0 only once it is freed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = slots.take(0, Duration::from_secs(5)).await.unwrap();
    assert!(again.is_some());
}

#[tokio::test]
async fn a_killed_broker_is_started_again() {
    let root = tempfile::tempdir().unwrap();
    let slots = slots_at(root.path(), 1);
    drop(take_now(&slots).await.unwrap().unwrap());
    let dir = root.path().join(SLOTS_SUBDIR).display().to_string();
    let pid = broker_pid(&dir);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(take_now(&slots).await.unwrap().is_some());
}

/// The pid of the broker's shell for the lock directory `dir`: its arguments end with
/// the directory and the slot count.
fn broker_pid(dir: &str) -> u32 {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = args.split(|&b| b == 0).collect();
            args.len() >= 3 && args[args.len() - 3] == dir.as_bytes()
        })
        .expect("the broker's process")
}

#[tokio::test]
async fn a_freed_slot_stays_held_a_moment_for_the_next_build() {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (slots_at(root.path(), 1), slots_at(root.path(), 1));
    drop(take_now(&one).await.unwrap().expect("slot"));
    // Still locked on the machine, as a spare of this run: another client waits.
    assert!(
        take_now(&two).await.is_err(),
        "the spare was given up at once"
    );
    // The run's next take gets it without asking the broker.
    let again = take_now(&one).await.unwrap().expect("the spare");
    assert_eq!(again.slot(), 0);
    drop(again);
    // Unused for its linger, it goes back: the other client gets it.
    tokio::time::sleep(SPARE_LINGER + Duration::from_millis(300)).await;
    assert!(
        take_now(&two).await.unwrap().is_some(),
        "the spare was never freed"
    );
}

#[tokio::test]
async fn the_spares_of_a_killed_broker_are_not_handed_out() {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (slots_at(root.path(), 1), slots_at(root.path(), 1));
    drop(take_now(&one).await.unwrap().expect("slot"));
    let dir = root.path().join(SLOTS_SUBDIR).display().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &broker_pid(&dir).to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The lock went with the broker; the next take locks the slot again, for real.
    let held = take_now(&one)
        .await
        .unwrap()
        .expect("a slot from a new broker");
    assert!(
        take_now(&two).await.is_err(),
        "the take was given a spare no broker held"
    );
    drop(held);
}

#[tokio::test]
async fn hostile_directory_names_stay_text() {
    let base = tempfile::tempdir().unwrap();
    let pwned = base.path().join("pwned");
    let name = format!(
        "it's a \"store\" $(touch {0}) `touch {0}` ;touch {0}",
        pwned.display()
    );
    let root = base.path().join(name);
    let slots = slots_at(&root, 1);
    let held = take_now(&slots).await.unwrap().expect("slot");
    assert!(root.join(SLOTS_SUBDIR).join("slot-0").exists());
    assert!(!pwned.exists(), "a directory name ran as a command");
    drop(held);
}

/// A PATH of only these programs, for a local broker.
fn bare_path(programs: &[&str]) -> tempfile::TempDir {
    let bin = tempfile::tempdir().unwrap();
    for p in programs {
        let found = which(p);
        std::os::unix::fs::symlink(found, bin.path().join(p)).unwrap();
    }
    bin
}

fn which(program: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}

fn with_path(root: &std::path::Path, bin: &std::path::Path, slots: u32) -> RemoteSlots {
    let mut endpoint = Endpoint::local("m1", Some(root.display().to_string()));
    endpoint
        .env
        .push(("PATH".into(), bin.display().to_string()));
    RemoteSlots::new([(endpoint, slots)])
}

#[tokio::test]
async fn without_flock_builds_go_on_unlocked() {
    let root = tempfile::tempdir().unwrap();
    let bin = bare_path(&["sh", "mkdir"]);
    let slots = with_path(root.path(), bin.path(), 1);
    assert!(take_now(&slots).await.unwrap().is_none());
    // Said once, then not tried again.
    assert!(slots.brokers[0]
        .as_ref()
        .unwrap()
        .disabled
        .load(Ordering::Relaxed));
    assert!(take_now(&slots).await.unwrap().is_none());
}

#[tokio::test]
async fn without_bash_a_broker_holds_seven() {
    let root = tempfile::tempdir().unwrap();
    let bin = bare_path(&["sh", "mkdir", "flock"]);
    let slots = with_path(root.path(), bin.path(), 9);
    let mut held = Vec::new();
    for _ in 0..SH_SLOT_CAP {
        held.push(take_now(&slots).await.unwrap().expect("a slot"));
    }
    assert!(matches!(
        take_now(&slots).await,
        Err(DriverError::SlotsBusy { .. })
    ));
    held.pop();
    assert!(take_now(&slots).await.unwrap().is_some());
}

#[tokio::test]
async fn an_unusable_directory_is_no_reason_to_fail() {
    let base = tempfile::tempdir().unwrap();
    // A file where the store root's directories would go: nothing can be created.
    let root = base.path().join("file");
    std::fs::write(&root, "").unwrap();
    let slots = slots_at(&root, 1);
    assert!(take_now(&slots).await.unwrap().is_none());
    assert!(slots.brokers[0]
        .as_ref()
        .unwrap()
        .disabled
        .load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_broker_that_prints_garbage_is_no_reason_to_fail() {
    let root = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    // A login banner, where `ready` was due.
    let sh = bin.path().join("sh");
    std::fs::write(&sh, "#!/bin/sh\necho Welcome to b1\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&sh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let slots = with_path(root.path(), bin.path(), 1);
    assert!(take_now(&slots).await.unwrap().is_none());
    assert!(slots.brokers[0]
        .as_ref()
        .unwrap()
        .disabled
        .load(Ordering::Relaxed));
}
