//! The real `wdvirt holder` process: started detached by
//! `restart::holder::spawn`, it keeps a listening socket open after the
//! client that deposited it has gone (and closed its own copy), hands it
//! back to a new client, refuses a second holder on its socket, and exits
//! on `quit` or SIGTERM.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wdvirt::restart::holder::{self, HolderClient, HolderError};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wdvirt"))
}

/// A holder this test started: SIGKILLed by its pid if a failed test
/// leaves it running (it is detached: nothing else would end it).
struct Spawned {
    pid: u32,
}

impl Spawned {
    fn start(socket: &Path) -> Spawned {
        Spawned {
            pid: holder::spawn(exe(), socket).unwrap(),
        }
    }

    fn alive(&self) -> bool {
        PathBuf::from(format!("/proc/{}", self.pid)).exists()
    }

    /// Waits up to 2 s for the process to be gone (reaped by `spawn`'s
    /// reaper thread, so no zombie lingers in /proc).
    fn gone_within_2s(&self) -> bool {
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.alive() {
            let pid = rustix::process::Pid::from_raw(self.pid as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

#[test]
fn a_listener_deposited_in_the_holder_outlives_its_depositor_and_accepts_again() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("h.sock");
    let holder = Spawned::start(&socket);

    let listen_path = dir.path().join("instance.sock");
    let listener = UnixListener::bind(&listen_path).unwrap();
    let mut depositor = HolderClient::connect(&socket).unwrap();
    depositor.put("inst/1/listen", listener.as_fd()).unwrap();
    // The depositor goes away with its copy: the holder's is the only one.
    drop(depositor);
    drop(listener);

    let mut successor = HolderClient::connect(&socket).unwrap();
    let info = successor.hello().unwrap();
    assert_eq!((info.pid, info.held), (holder.pid, 1));
    let mut taken = successor.take("inst/").unwrap();
    assert_eq!(taken.len(), 1);
    let (key, fd) = taken.pop().unwrap();
    assert_eq!(key, "inst/1/listen");
    let listener = UnixListener::from(fd);

    // Still the same listening socket: a connect to its path is accepted
    // through the fd taken back.
    let mut vmm = UnixStream::connect(&listen_path).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    vmm.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    successor.quit().unwrap();
    assert!(
        holder.gone_within_2s(),
        "holder {} still running",
        holder.pid
    );
    assert!(!socket.exists(), "the holder removes its socket on quit");
    assert!(matches!(
        HolderClient::connect(&socket),
        Err(HolderError::NotRunning { .. })
    ));
}

#[test]
fn a_second_holder_on_the_same_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("h.sock");
    let first = Spawned::start(&socket);
    assert!(matches!(
        holder::spawn(exe(), &socket),
        Err(HolderError::AlreadyRunning { .. })
    ));
    // Started by hand, it says so and exits 1.
    let out = std::process::Command::new(exe())
        .args(["holder", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first one is unharmed.
    let mut c = HolderClient::connect(&socket).unwrap();
    assert_eq!(c.hello().unwrap().pid, first.pid);
    c.quit().unwrap();
    assert!(first.gone_within_2s());
}

#[test]
fn sigterm_ends_the_holder_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("h.sock");
    let holder = Spawned::start(&socket);
    let pid = rustix::process::Pid::from_raw(holder.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(holder.gone_within_2s());
    assert!(!socket.exists());
}

/// A holder that keeps nothing and serves nobody ends by itself (its daemon
/// died with nothing to hand over); one that keeps an fd waits.
#[test]
fn a_holder_keeping_nothing_with_nobody_connected_exits_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let socket = dir.path().join(name);
        let child = std::process::Command::new(exe())
            .args(["holder", "--idle-exit", "0.3", "--socket"])
            .arg(&socket)
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(3);
        while HolderClient::connect(&socket).is_err() {
            assert!(Instant::now() < end, "the holder never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
        (socket, child)
    };
    let (_, mut idle) = run("idle.sock");
    let (socket, mut keeping) = run("keeping.sock");
    let (r, _w) = rustix::pipe::pipe().unwrap();
    HolderClient::connect(&socket)
        .unwrap()
        .put("kept", r.as_fd())
        .unwrap();
    let started = Instant::now();
    let status = idle.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        keeping.try_wait().unwrap(),
        None,
        "it keeps an fd: it waits"
    );
    HolderClient::connect(&socket).unwrap().quit().unwrap();
    assert!(keeping.wait().unwrap().success());
}
