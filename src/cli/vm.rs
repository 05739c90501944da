//! `wdvirt vm`: a VM process, as QEMU is one. Guest RAM (memfd) and the
//! accelerator function on an instance's vfio-user socket, the guest
//! driver's verified load on N queues (`vmm::load`), a status line now and
//! then, and a control socket that `wdvirt migrate` drives. With
//! `--incoming` it starts waiting for a migration instead (QEMU's
//! `-incoming`), then runs the VM it received: the load goes on from the
//! migrated rings and RAM.
//!
//! The control socket speaks JSON lines: one request (`{"op":"status"}` or
//! `{"op":"migrate","to":"tcp:HOST:PORT",...}`), then for a migration one
//! `progress` line per phase and round and a last `done` or `error` line.

use std::io::{BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::transport::server::{SocketAccess, SocketFile};
use crate::vmm::link::Endpoint;
use crate::vmm::load::{Load, LoadOptions, LoadStats, LoadSummary};
use crate::vmm::migrate::{self, MigrateError, MigrateOptions, Progress, Vm};
use crate::vmm::{GuestRam, LoopbackVmm};

/// Where guest RAM starts (above 4 GiB, as a VM's high memory).
pub const RAM_BASE: u64 = 0x1_0000_0000;

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  # a VM on instance vm1 (wdvirt start vm1 prints its socket), 4 queues kept full
  wdvirt vm --connect /run/wdvirt/vm1.sock --control /tmp/vm1.ctl
  # on the destination host: wait for it, on an instance of the same type
  wdvirt vm --incoming tcp:0.0.0.0:4444 --connect /run/wdvirt/vm1-dst.sock --control /tmp/vm1.ctl
  # then move it
  wdvirt migrate --vm /tmp/vm1.ctl --to tcp:desthost:4444

SIGTERM or SIGINT stops the load, waits for the jobs in flight and prints a
summary; the exit status is 1 if any job failed, repeated or never completed.")]
pub struct VmArgs {
    /// The instance's vfio-user socket (`wdvirt start NAME` prints it);
    /// with --incoming, the destination instance's.
    #[arg(long, value_name = "SOCK")]
    pub connect: PathBuf,
    /// Wait for a migration at this address instead of booting, then run
    /// the VM received.
    #[arg(long, value_name = "tcp:HOST:PORT|unix:PATH")]
    pub incoming: Option<Endpoint>,
    /// Queues the guest keeps full of copy / CRC32C / SHA-256 / deflate
    /// jobs (from queue 0).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,
    /// Each ring's depth.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub depth: u32,
    /// Guest RAM, MiB (room for the rings and 24 KiB per job slot).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=crate::vmm::migrate::MAX_RAM >> 20))]
    pub ram_mib: u64,
    /// The control socket `wdvirt migrate --vm` talks to.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Seconds between status lines (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub status_every: f64,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Migrate {
        to: String,
        #[serde(default)]
        max_rounds: Option<u32>,
        #[serde(default)]
        converged_pages: Option<u64>,
    },
}

/// A line the control socket answers with.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Reply {
    Status {
        #[serde(flatten)]
        stats: LoadStats,
    },
    Progress {
        phase: String,
        round: u32,
        round_pages: u64,
        ram_bytes: u64,
        stream_bytes: u64,
    },
    Done {
        to: String,
        downtime_ms: f64,
        pre_copy_rounds: u32,
        ram_bytes: u64,
        stream_bytes: u64,
        stop_pages: u64,
    },
    Error {
        /// unreachable, refused, cancelled, destination-failed, link,
        /// guest, busy, bad-request or failed.
        kind: String,
        message: String,
    },
}

fn kind(e: &MigrateError) -> &'static str {
    match e {
        MigrateError::Unreachable { .. } | MigrateError::Destination { .. } => "unreachable",
        MigrateError::Refused(_) => "refused",
        MigrateError::Cancelled(_) => "cancelled",
        MigrateError::Remote { .. } => "destination-failed",
        MigrateError::Link { .. } | MigrateError::Protocol(_) => "link",
        MigrateError::Guest(_) => "guest",
        _ => "failed",
    }
}

/// What the process prints (text or a JSON line).
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, value: serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", text());
        }
    }

    fn summary(&self, s: &LoadSummary) {
        let v =
            serde_json::json!({"event": "summary", "all_verified": s.all_verified(), "summary": s});
        self.line(v, || {
            let st = &s.stats;
            let mut t = format!(
                "summary: {} jobs on {} queues, {} verified, {} failed, {} repeated, {} never completed, {} completed before an older job",
                st.jobs, s.queues, st.verified, st.failed, st.repeated, s.never_completed, st.reordered
            );
            if let Some(d) = s.device_completed {
                t += &format!("; the device counted {d} completions, the driver read {}", s.completed);
            }
            if s.all_verified() {
                t += "\nevery job verified exactly once";
            } else if let Some(f) = &s.failure {
                t += &format!("\nNOT every job verified: {f}");
            } else {
                t += "\nNOT every job verified";
            }
            t
        });
    }
}

/// The VM as the control thread and the main loop share it.
struct Shared {
    vm: Arc<Vm>,
    /// `None` once the guest has left (migrated) or stopped.
    load: Mutex<Option<Load>>,
    /// Where the VM went, once it has.
    migrated: Mutex<Option<String>>,
    json: bool,
}

pub fn run(a: VmArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=86400.0).contains(&a.status_every) {
        bail!(
            "--status-every {}: expected seconds from 0 (no status lines) to 86400",
            a.status_every
        );
    }
    vm(a)
}

fn vm(a: VmArgs) -> anyhow::Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot catch signals")?;
    }
    let out = Out { json: a.json };
    // Bound before anything else: a destination that could not serve its
    // control socket after taking a VM would lose it. The file goes with
    // the process (`_file`), and only if it is still the one made here.
    let control = a.control.as_deref().map(bind_control).transpose()?;
    let (vm, load) = match &a.incoming {
        Some(at) => match wait_for_migration(at, &a.connect, &stop, &out)? {
            Some(v) => v,
            None => return Ok(ExitCode::SUCCESS),
        },
        None => boot(&a)?,
    };
    let shared = Arc::new(Shared {
        vm,
        load: Mutex::new(Some(load)),
        migrated: Mutex::new(None),
        json: a.json,
    });
    let _file = if let Some((listener, file)) = control {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("vm-control".into())
            .spawn(move || serve_control(&listener, &s))
            .context("cannot start the control thread")?;
        Some(file)
    } else {
        None
    };
    let counters = shared
        .load
        .lock()
        .as_ref()
        .map(Load::counters)
        .context("no load")?;
    let every = Duration::from_secs_f64(a.status_every.max(0.0));
    let (mut last, mut last_verified) = (Instant::now(), counters.stats().verified);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(to) = shared.migrated.lock().clone() {
            out.line(serde_json::json!({"event": "migrated", "to": to}), || {
                format!("migrated to {to}: the VM runs on there")
            });
            return Ok(ExitCode::SUCCESS);
        }
        // (A migration under way holds the lock: the guest is not ended.)
        let ended = shared
            .load
            .try_lock()
            .is_some_and(|l| l.as_ref().is_some_and(|l| !l.is_running()));
        if stop.load(Ordering::Acquire) || ended {
            // Waits for a migration under way to end first.
            let Some(load) = shared.load.lock().take() else {
                continue;
            };
            let summary = load.finish();
            out.summary(&summary);
            return Ok(if summary.all_verified() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        if !every.is_zero() && last.elapsed() >= every {
            let st = counters.stats();
            let rate = (st.verified - last_verified) as f64 / last.elapsed().as_secs_f64();
            (last, last_verified) = (Instant::now(), st.verified);
            out.line(
                serde_json::json!({"event": "status", "stats": st, "verified_per_s": rate.round()}),
                || {
                    format!(
                        "status: {} jobs, {} verified ({rate:.0}/s), {} failed, {} repeated",
                        st.jobs, st.verified, st.failed, st.repeated
                    )
                },
            );
        }
    }
}

fn boot(a: &VmArgs) -> anyhow::Result<(Arc<Vm>, Load)> {
    let ram = GuestRam::new(RAM_BASE, a.ram_mib << 20).context("cannot make guest RAM")?;
    let vmm = LoopbackVmm::connect_migratable(&a.connect, ram)
        .with_context(|| format!("cannot connect to the instance at {}", a.connect.display()))?;
    let vm = Vm::new(vmm);
    let opts = LoadOptions {
        queues: a.queues,
        depth: a.depth,
    };
    let load = Load::start(&vm, opts).context("the guest cannot start its load")?;
    Ok((vm, load))
}

/// Waits at `at` for a source; a failed attempt (refused, broken off) is
/// reported and the next one awaited. `None`: stopped by a signal first.
fn wait_for_migration(
    at: &Endpoint,
    dest: &Path,
    stop: &AtomicBool,
    out: &Out,
) -> anyhow::Result<Option<(Arc<Vm>, Load)>> {
    let listener = at
        .listen()
        .with_context(|| format!("cannot listen at {at}"))?;
    listener.set_nonblocking(true)?;
    let here = listener.local();
    out.line(
        serde_json::json!({"event": "listening", "at": here}),
        || format!("waiting for a migration at {here}"),
    );
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        let (link, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("accept"),
        };
        let check = |image: &[u8]| Load::check_image(image).map_err(|e| e.to_string());
        match migrate::incoming_checked(link, dest, &check) {
            Ok(got) => {
                let load = Load::adopt(&got.vm, &got.guest)
                    .context("the migrated guest cannot go on (its device runs here)")?;
                out.line(
                    serde_json::json!({"event": "incoming", "from": peer,
                        "ram_bytes": got.ram_bytes, "stream_bytes": got.stream_bytes}),
                    || {
                        format!(
                            "migrated in from {peer}: {:.1} MiB of RAM, {} B of device state; the guest goes on",
                            got.ram_bytes as f64 / (1 << 20) as f64,
                            got.stream_bytes
                        )
                    },
                );
                return Ok(Some((got.vm, load)));
            }
            Err(e) => {
                eprintln!(
                    "wdvirt: incoming migration from {peer} failed: {e}; waiting for another"
                );
            }
        }
    }
}

/// The control socket at `path`, made as the transport makes its sockets
/// (mode 0600; a live one refused, a stale one replaced, another file
/// refused and left alone).
fn bind_control(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    SocketFile::bind(path, &SocketAccess::default())
        .with_context(|| format!("cannot serve the control socket {}", path.display()))
}

fn serve_control(listener: &UnixListener, s: &Shared) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if let Err(e) = control(conn, s) {
            tracing::warn!("control connection: {e}");
        }
    }
}

fn send(w: &mut impl Write, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn control(conn: UnixStream, s: &Shared) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Progress is written while the guest may be paused: a client that
    // stops reading must not hold it there.
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(64 << 10).read_line(&mut line)?;
    let mut w = &conn;
    let req = match serde_json::from_str::<Request>(&line) {
        Ok(r) => r,
        Err(e) => {
            return send(
                &mut w,
                &Reply::Error {
                    kind: "bad-request".into(),
                    message: format!("not a request: {e}"),
                },
            );
        }
    };
    match req {
        Request::Status => {
            let stats = s.load.lock().as_ref().map(Load::stats);
            match stats {
                Some(stats) => send(&mut w, &Reply::Status { stats }),
                None => send(&mut w, &busy()),
            }
        }
        Request::Migrate {
            to,
            max_rounds,
            converged_pages,
        } => {
            let d = MigrateOptions::default();
            let opts = MigrateOptions {
                max_rounds: max_rounds.unwrap_or(d.max_rounds).min(migrate::MAX_ROUNDS),
                converged_pages: converged_pages.unwrap_or(d.converged_pages),
            };
            let reply = migrate_to(&to, &opts, s, &mut w);
            let sent = send(&mut w, &reply);
            // Only now may the main loop end the process: the client has
            // its answer (or has gone, and the VM runs on there anyway).
            if let Reply::Done { to, .. } = &reply {
                *s.migrated.lock() = Some(to.clone());
            }
            sent
        }
    }
}

fn busy() -> Reply {
    Reply::Error {
        kind: "busy".into(),
        message: "the VM has no guest running here (it has migrated or stopped)".into(),
    }
}

/// Runs the source half to `to`, telling `w` each step; a client that
/// goes away cancels the migration.
fn migrate_to(to: &str, opts: &MigrateOptions, s: &Shared, w: &mut impl Write) -> Reply {
    let at: Endpoint = match to.parse() {
        Ok(a) => a,
        Err(message) => {
            return Reply::Error {
                kind: "bad-request".into(),
                message,
            };
        }
    };
    let mut guard = s.load.lock();
    let Some(load) = guard.as_mut() else {
        return busy();
    };
    let text = |m: String| {
        if !s.json {
            println!("{m}");
        }
    };
    text(format!("migrating to {at}"));
    let link = match at.connect() {
        Ok(l) => l,
        Err(source) => {
            let e = MigrateError::Unreachable {
                to: at.to_string(),
                source,
            };
            text(format!("migration failed: {e}"));
            return Reply::Error {
                kind: kind(&e).into(),
                message: e.to_string(),
            };
        }
    };
    let mut progress = |p: &Progress| {
        let r = Reply::Progress {
            phase: p.phase.to_string(),
            round: p.round,
            round_pages: p.round_pages,
            ram_bytes: p.ram_bytes,
            stream_bytes: p.stream_bytes,
        };
        match send(w, &r) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    };
    match migrate::send(&s.vm, link, opts, &mut progress, load) {
        Ok(f) => {
            let summary = guard.take().map(Load::detach);
            if let Some(sum) = &summary
                && !sum.all_verified()
            {
                tracing::warn!("the guest had failures before it left: {:?}", sum.failure);
            }
            Reply::Done {
                to: at.to_string(),
                downtime_ms: f.downtime.as_secs_f64() * 1e3,
                pre_copy_rounds: f.pre_copy_rounds,
                ram_bytes: f.ram_bytes,
                stream_bytes: f.stream_bytes,
                stop_pages: f.stop_pages,
            }
        }
        Err(e) => {
            text(format!("migration failed, the VM runs on here: {e}"));
            Reply::Error {
                kind: kind(&e).into(),
                message: e.to_string(),
            }
        }
    }
}
