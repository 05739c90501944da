//! `wdvirt migrate`: tells a VM process (`wdvirt vm --control PATH`) to
//! move to a destination VM process waiting with `wdvirt vm --incoming`,
//! and shows the migration's progress as the VM reports it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::vm::{Reply, Request};
use crate::vmm::link::Endpoint;

#[derive(Args, Debug)]
#[command(after_help = "\
The destination is a second VM process, started waiting on an instance of the
same type (its daemon's `wdvirt start` prints the socket):

  dest$ wdvirt vm --incoming tcp:0.0.0.0:4444 --connect /run/wdvirt/vm1.sock
  src$  wdvirt migrate --vm /tmp/vm1.ctl --to tcp:dest:4444
  migrating to tcp:dest:4444
  PRE_COPY: 2.1 KiB of device state, compatibility accepted
  copying RAM, round 0: 4096 pages, 16.0 MiB so far
  copying RAM, round 1: 75 pages, 16.3 MiB so far
  STOP_COPY: 12 pages while stopped, 16.3 MiB so far
  done
  migrated to tcp:dest:4444: downtime 3.2 ms, 2 rounds, 16.3 MiB of RAM, 9.8 KiB of device state

Whatever fails (a destination of another type refuses the compatibility
block; nothing listens; the link breaks; Ctrl-C here cancels) leaves the VM
running on the source, and the exit status is 1.")]
pub struct MigrateArgs {
    /// The source VM's control socket (`wdvirt vm --control PATH`).
    #[arg(long, value_name = "CONTROL_SOCK")]
    pub vm: PathBuf,
    /// Where the destination VM process waits (`wdvirt vm --incoming`).
    #[arg(long, value_name = "tcp:HOST:PORT|unix:PATH")]
    pub to: Endpoint,
    /// At most this many rounds of dirty pages while the VM runs.
    #[arg(long, default_value_t = 8)]
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
    let conn = UnixStream::connect(&a.vm).with_context(|| {
        format!(
            "cannot reach the VM's control socket {} (is `wdvirt vm --control` running there?)",
            a.vm.display()
        )
    })?;
    let req = Request::Migrate {
        to: a.to.to_string(),
        max_rounds: Some(a.max_rounds),
        converged_pages: Some(a.converged_pages),
    };
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    (&conn)
        .write_all(&line)
        .context("the VM's control socket")?;
    if !a.json {
        println!("migrating to {}", a.to);
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
                eprintln!(
                    "wdvirt: error: migration to {} failed ({kind}): {message}",
                    a.to
                );
                return Ok(ExitCode::from(1));
            }
        }
    }
    anyhow::bail!("the VM closed its control socket before the migration ended (did it exit?)")
}
