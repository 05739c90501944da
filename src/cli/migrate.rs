//! `wdvirt migrate`: tells a VM process (`wdvirt vm --control PATH`) to
//! move to a destination VM process waiting with `wdvirt vm --incoming`,
//! and shows the migration's progress as the VM reports it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::client::ApiClient;
use super::vm::{Reply, Request};
use crate::daemon::action::{Action, DefineRequest};
use crate::daemon::view::InstanceView;
use crate::vmm::link::Endpoint;

#[derive(Args, Debug)]
#[command(after_help = "\
The destination is a second VM process, started waiting on an instance of the
same type (its daemon's `wdvirt start` prints the socket):

  dest$ wdvirt vm --incoming tcp:10.0.9.2:4444 --connect /run/wdvirt/vm1.sock
  src$  wdvirt migrate --vm /tmp/vm1.ctl --to tcp:10.0.9.2:4444
  migrating to tcp:10.0.9.2:4444
  PRE_COPY: 2.1 KiB of device state, compatibility accepted
  copying RAM, round 0: 4096 pages, 16.0 MiB so far
  copying RAM, round 1: 75 pages, 16.3 MiB so far
  STOP_COPY: 12 pages while stopped, 16.3 MiB so far
  done
  migrated to tcp:10.0.9.2:4444: downtime 3.2 ms, 2 rounds, 16.3 MiB of RAM, 9.8 KiB of device state

Or, with the destination daemon on this host, let this command prepare it
(an instance of the source's type, and a VM process on it that runs on after):

  wdvirt migrate --vm /tmp/vm1.ctl --to-daemon /run/wdvirt/api.sock --type quad \\
      --name vm1 --new-control /tmp/vm1-new.ctl

Whatever fails (a destination of another type refuses the compatibility
block; nothing listens; the link breaks; Ctrl-C here cancels) leaves the VM
running on the source, and the exit status is 1.

The migration link has no authentication: let `--incoming` listen on a
migration network, loopback or a UNIX socket only (docs/security.md).")]
pub struct MigrateArgs {
    /// The source VM's control socket (`wdvirt vm --control PATH`).
    #[arg(long, value_name = "CONTROL_SOCK")]
    pub vm: PathBuf,
    /// Where the destination VM process waits (`wdvirt vm --incoming`).
    #[arg(
        long,
        value_name = "tcp:HOST:PORT|unix:PATH",
        required_unless_present = "to_daemon",
        conflicts_with = "to_daemon"
    )]
    pub to: Option<Endpoint>,
    /// Prepare the destination on this host instead: define and start an
    /// instance of --type through this daemon's API socket, start a
    /// destination VM process on it (`wdvirt vm --incoming`, its control
    /// socket at --new-control, its output in --new-control's path + .log),
    /// and migrate to it. On failure the instance is stopped and undefined
    /// and that process ended.
    #[arg(long, value_name = "API_SOCK", requires_all = ["type_name", "new_control"])]
    pub to_daemon: Option<PathBuf>,
    /// The destination instance's type (the source's: `wdvirt list` on its
    /// host).
    #[arg(long = "type", value_name = "TYPE")]
    pub type_name: Option<String>,
    /// The destination instance's name (default: the daemon's TYPE-N).
    #[arg(long)]
    pub name: Option<String>,
    /// The control socket of the destination VM process --to-daemon starts.
    #[arg(long, value_name = "PATH")]
    pub new_control: Option<PathBuf>,
    /// At most this many rounds of dirty pages while the VM runs (0..=1000).
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::vmm::migrate::MAX_ROUNDS)))]
    pub max_rounds: u32,
    /// Stop the rounds once one copies at most this many pages.
    #[arg(long, default_value_t = 64)]
    pub converged_pages: u64,
    /// JSON lines (progress, then done or error) instead of text.
    #[arg(long)]
    pub json: bool,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn kib(b: u64) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

pub fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    match (&a.to, &a.to_daemon) {
        (Some(to), _) => migrate(&a, to),
        (None, Some(api)) => to_daemon(&a, api),
        (None, None) => anyhow::bail!("--to or --to-daemon is needed"),
    }
}

/// A destination prepared here: the instance through the daemon's API and
/// a `wdvirt vm --incoming` process on it.
struct Prepared<'a> {
    api: ApiClient,
    instance: String,
    child: Option<std::process::Child>,
    json: &'a bool,
}

impl Prepared<'_> {
    /// Undoes it all after a failure.
    fn undo(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let id = self.instance.clone();
        let stop: anyhow::Result<InstanceView> = self.api.act(&Action::Stop { id: id.clone() });
        let gone: anyhow::Result<InstanceView> = self.api.act(&Action::Undefine { id });
        match (stop, gone) {
            (_, Ok(_)) if !*self.json => {
                eprintln!(
                    "wdvirt: destination instance {} stopped and undefined",
                    self.instance
                )
            }
            (_, Ok(_)) => {}
            (_, Err(e)) => eprintln!(
                "wdvirt: the destination instance {} could not be undefined: {e:#}",
                self.instance
            ),
        }
    }
}

fn to_daemon(a: &MigrateArgs, api_sock: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (Some(ty), Some(ctl)) = (&a.type_name, &a.new_control) else {
        anyhow::bail!("--to-daemon needs --type and --new-control");
    };
    let api = ApiClient::new(api_sock);
    let req = DefineRequest {
        type_name: ty.clone(),
        name: a.name.clone(),
        uuid: None,
        auto: false,
        numa: None,
        qos: None,
        vm: None,
        owner: None,
    };
    let v: InstanceView = api.act(&Action::Define(req)).with_context(|| {
        format!(
            "cannot define the destination instance through {}",
            api_sock.display()
        )
    })?;
    let mut prep = Prepared {
        api,
        instance: v.name.clone(),
        child: None,
        json: &a.json,
    };
    let started: anyhow::Result<InstanceView> = prep.api.act(&Action::Start { id: v.name.clone() });
    let socket = match started.map(|v| v.socket) {
        Ok(Some(s)) => s,
        Ok(None) => {
            prep.undo();
            anyhow::bail!("the daemon started {} but gave no socket", v.name);
        }
        Err(e) => {
            prep.undo();
            return Err(e.context(format!("cannot start the destination instance {}", v.name)));
        }
    };
    let incoming = PathBuf::from(format!("{}.incoming", ctl.display()));
    let log = PathBuf::from(format!("{}.log", ctl.display()));
    let child = std::fs::File::create(&log).and_then(|out| {
        let err = out.try_clone()?;
        std::process::Command::new(std::env::current_exe()?)
            .arg("vm")
            .arg("--incoming")
            .arg(format!("unix:{}", incoming.display()))
            .arg("--connect")
            .arg(&socket)
            .arg("--control")
            .arg(ctl)
            .arg("--json")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
    });
    match child {
        Ok(c) => prep.child = Some(c),
        Err(e) => {
            prep.undo();
            return Err(anyhow::Error::from(e).context("cannot start the destination VM process"));
        }
    }
    // It listens once it says so (its socket file comes a moment before).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let listening =
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"event\":\"listening\""));
    while !listening() {
        let exited = prep
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if exited.is_some() || std::time::Instant::now() > deadline {
            prep.undo();
            anyhow::bail!(
                "the destination VM process did not come up (its output: {})",
                log.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = prep.child.as_ref().map_or(0, |c| c.id());
    if a.json {
        println!(
            "{}",
            serde_json::json!({"event": "prepared", "instance": v.name, "socket": socket,
                "pid": pid, "control": ctl, "log": log})
        );
    } else {
        println!(
            "prepared instance {} ({}) and a destination VM process {pid} on it (control {}, output {})",
            v.name,
            socket.display(),
            ctl.display(),
            log.display()
        );
    }
    let to = Endpoint::Unix(incoming);
    match migrate(a, &to) {
        Ok(code) if code == ExitCode::SUCCESS => {
            // The VM runs on in its own process: let it go.
            drop(prep.child.take());
            Ok(code)
        }
        other => {
            prep.undo();
            other
        }
    }
}

fn migrate(a: &MigrateArgs, to: &Endpoint) -> anyhow::Result<ExitCode> {
    let conn = UnixStream::connect(&a.vm).with_context(|| {
        format!(
            "cannot reach the VM's control socket {} (is `wdvirt vm --control` running there?)",
            a.vm.display()
        )
    })?;
    let req = Request::Migrate {
        to: to.to_string(),
        max_rounds: Some(a.max_rounds),
        converged_pages: Some(a.converged_pages),
    };
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    (&conn)
        .write_all(&line)
        .context("the VM's control socket")?;
    if !a.json {
        println!("migrating to {to}");
    }
    for l in BufReader::new(&conn).lines() {
        let l = l.context("the VM's control socket")?;
        let reply: Reply = serde_json::from_str(&l)
            .with_context(|| format!("the VM answered something else: {l}"))?;
        if a.json {
            println!("{l}");
        }
        match reply {
            Reply::Progress {
                phase,
                round,
                round_pages,
                ram_bytes,
                stream_bytes,
            } if !a.json => match phase.as_str() {
                "PRE_COPY" => println!(
                    "PRE_COPY: {} of device state, compatibility accepted",
                    kib(stream_bytes)
                ),
                "copying RAM" => println!(
                    "copying RAM, round {round}: {round_pages} pages, {} so far",
                    mib(ram_bytes)
                ),
                "STOP_COPY" => println!(
                    "STOP_COPY: {round_pages} pages while stopped, {} so far",
                    mib(ram_bytes)
                ),
                p => println!("{p}"),
            },
            Reply::Progress { .. } | Reply::Status { .. } => {}
            Reply::Done {
                to,
                downtime_ms,
                pre_copy_rounds,
                ram_bytes,
                stream_bytes,
                ..
            } => {
                if !a.json {
                    println!(
                        "migrated to {to}: downtime {downtime_ms:.1} ms, {pre_copy_rounds} rounds, {} of RAM, {} of device state",
                        mib(ram_bytes),
                        kib(stream_bytes)
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            Reply::Error { kind, message } => {
                eprintln!("wdvirt: error: migration to {to} failed ({kind}): {message}",);
                return Ok(ExitCode::from(1));
            }
        }
    }
    anyhow::bail!("the VM closed its control socket before the migration ended (did it exit?)")
}
