//! `wdvirt daemon`: the service that owns instances.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::daemon::{self, DaemonPaths};

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Instance types, QoS policies and accelerators: a YAML file or a
    /// directory of them (repeatable; see `wdvirt validate`, `policies/`).
    #[arg(long, value_name = "PATH", default_value = "/etc/wdvirt")]
    pub config: Vec<PathBuf>,
    /// Where definitions persist (one JSON file per instance).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/wdvirt")]
    pub state_dir: PathBuf,
    /// Where instance sockets are created (`NAME.sock`).
    #[arg(long, value_name = "DIR", default_value = "/run/wdvirt")]
    pub run_dir: PathBuf,
    /// The sysfs tree accelerators, NUMA nodes and CPUs are discovered in
    /// (merged with the YAML; `wdvirt topology --help`).
    #[arg(long, value_name = "DIR", default_value = crate::topology::DEFAULT_SYSFS)]
    pub sysfs: PathBuf,
    /// Also serve Prometheus `/metrics` over TCP: a PORT (on 127.0.0.1) or
    /// an IP:PORT. The API socket serves `/metrics` in any case.
    #[arg(long, value_name = "[IP:]PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Who may use the API: a group name or gid. The API socket is created
    /// mode 0660 with this group, so only its members (and root) can
    /// connect; the daemon also checks each caller's credentials
    /// (SO_PEERCRED) and answers anyone outside the group, the daemon's
    /// user and root with 403 `forbidden`, counted in `GET /v1/access`.
    /// Overrides `daemon: api_group` in the configuration; default: the
    /// daemon's own group. E.g. `--api-group wdvirt` after `groupadd
    /// wdvirt; usermod -aG wdvirt alice`.
    #[arg(long, value_name = "GROUP|GID")]
    pub api_group: Option<String>,
    /// The user VMMs run as: a user name or uid. Each instance socket is
    /// created mode 0600 and owned by this user, so a VMM running as anyone
    /// else (but root) is refused at connect. `wdvirt define --owner`
    /// overrides it per instance. Overrides `daemon: instance_owner` in
    /// the configuration; default: the daemon's own user. For libvirt,
    /// the `user` of /etc/libvirt/qemu.conf (`libvirt-qemu` on Debian).
    #[arg(long, value_name = "USER|UID")]
    pub instance_owner: Option<String>,
    /// The fd holder's socket. Started instances, their VMMs' connections
    /// and guest memory are kept in a small holder process, so that a
    /// daemon killed or restarted takes every VM's device back with its
    /// jobs: VMMs never see the socket close. The daemon starts the holder
    /// if none runs there. Default: RUN_DIR/holder.sock.
    #[arg(long, value_name = "PATH")]
    pub holder: Option<PathBuf>,
    /// Keep nothing across restarts: when the daemon stops or dies, every
    /// VMM loses its device.
    #[arg(long, conflicts_with = "holder")]
    pub no_holder: bool,
}

/// `9808` is loopback's port 9808; `0.0.0.0:9808` says where on purpose.
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok((std::net::Ipv4Addr::LOCALHOST, port).into());
    }
    s.parse().map_err(|_| {
        format!("'{s}' is neither a PORT nor an IP:PORT (e.g. 9808, 127.0.0.1:9808, [::1]:9808)")
    })
}

pub fn run(a: DaemonArgs, api: PathBuf) -> anyhow::Result<ExitCode> {
    // Absolute, so sockets handed to VMMs and the state directory's parent
    // mean the same whatever the daemon's working directory.
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let run_dir = abs(a.run_dir);
    let holder =
        (!a.no_holder).then(|| abs(a.holder.unwrap_or_else(|| run_dir.join("holder.sock"))));
    let paths = DaemonPaths {
        config: a.config,
        state_dir: abs(a.state_dir),
        run_dir,
        api: abs(api),
        metrics_addr: a.metrics_addr,
        holder,
    };
    let catalog = daemon::catalog::Catalog::load(&paths.config, &a.sysfs)?;
    let from_file = catalog.daemon_settings().clone();
    let (access, owner) = daemon::DaemonAccess {
        api_group: a.api_group.or(from_file.api_group),
        instance_owner: a.instance_owner.or(from_file.instance_owner),
    }
    .resolve()?;
    let registry = daemon::open(&paths, catalog, owner)?;
    daemon::run(&paths, registry, access, || {
        eprintln!("wdvirt: daemon ready, API at {}", paths.api.display());
        // systemd's Type=notify (dist/systemd/wdvirt.service).
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot tell systemd we are ready: {e}");
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The unit file's ExecStart is a command line this binary accepts.
    #[test]
    fn the_systemd_units_command_line_parses() {
        let unit = include_str!("../../dist/systemd/wdvirt.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert!(args[0].ends_with("/wdvirt"));
        let cli = crate::cli::Cli::try_parse_from(&args).unwrap();
        let crate::cli::Command::Daemon(d) = cli.command else {
            panic!("ExecStart does not run the daemon");
        };
        assert_eq!(d.run_dir, std::path::Path::new("/run/wdvirt"));
        assert_eq!(cli.api, std::path::Path::new("/run/wdvirt/api.sock"));
        assert!(!d.no_holder, "the unit keeps instances across restarts");
        // `systemctl reload` is the live upgrade, against the same API.
        let reload = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecReload="))
            .expect("an ExecReload line");
        let args: Vec<&str> = reload.split_whitespace().collect();
        let cli = crate::cli::Cli::try_parse_from(&args).unwrap();
        assert!(matches!(cli.command, crate::cli::Command::Upgrade(_)));
        assert_eq!(cli.api, std::path::Path::new("/run/wdvirt/api.sock"));
    }
}
