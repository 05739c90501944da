//! The daemon: it owns every instance. Definitions persist under the state
//! directory, instances serve their vfio-user sockets under the run
//! directory, and one API socket takes [`action::Action`]s.
//!
//! Files by role: `action` (the one command enum and its errors), `registry`
//! (instances by name and UUID, and carrying out actions), `store` (durable
//! definitions), `catalog` (types, policies, accelerators and placement),
//! `instance` (one served instance), `api` (HTTP over a UNIX socket), `view`
//! (what listings show). Neighbours: `config` and `partition` below the
//! catalog, `vdev`/`transport` below an instance, `cli` above.

pub mod access;
pub mod action;
pub mod api;
pub mod catalog;
pub mod instance;
pub mod registry;
pub mod store;
pub mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::restart::holder::{self, HolderClient, HolderError};
use crate::restart::keep::HolderLink;

use self::catalog::Catalog;
use self::registry::Registry;
use self::store::Store;

/// Where the daemon keeps things (all overridable, so tests run in a temp
/// directory).
#[derive(Clone, Debug)]
pub struct DaemonPaths {
    /// YAML files, or directories of them.
    pub config: Vec<PathBuf>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub api: PathBuf,
    /// Also serve `/metrics` over TCP here (`--metrics-addr`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The fd holder's socket (`--holder`): started instances are kept
    /// there for a successor daemon. `None`: nothing outlives the daemon.
    pub holder: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Persist(#[from] store::PersistError),
    #[error("cannot create the run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve the API at {path}: {source}")]
    Api {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve metrics at {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the API's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Registry(#[from] action::ActionError),
    #[error("{what}: {source}")]
    Access {
        what: &'static str,
        #[source]
        source: access::AccessError,
    },
    #[error(
        "upgrade: cannot run {exe}: {source}; every instance waits in the fd holder for the next daemon to start"
    )]
    Upgrade {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot keep instances across restarts with the fd holder at {path}: {source} (or run with --no-holder)"
    )]
    Holder {
        path: PathBuf,
        #[source]
        source: crate::restart::holder::HolderError,
    },
}

/// Who may use the daemon: the API's group and the default owner of
/// instance sockets (`access`).
#[derive(Clone, Debug, Default)]
pub struct DaemonAccess {
    /// `--api-group` or `daemon: api_group`; `None`: the daemon's group.
    pub api_group: Option<String>,
    /// `--instance-owner` or `daemon: instance_owner`; `None`: the
    /// daemon's user.
    pub instance_owner: Option<String>,
}

impl DaemonAccess {
    /// The API's rule and the default socket owner, resolved on this host.
    pub fn resolve(&self) -> Result<(access::ApiAccess, access::UserId), DaemonError> {
        let group = match &self.api_group {
            Some(g) => Some(
                access::resolve_group(g).map_err(|source| DaemonError::Access {
                    what: "the API group (--api-group, daemon: api_group)",
                    source,
                })?,
            ),
            None => None,
        };
        let owner = match &self.instance_owner {
            Some(u) => access::resolve_user(u).map_err(|source| DaemonError::Access {
                what: "the instance owner (--instance-owner, daemon: instance_owner)",
                source,
            })?,
            None => access::own_user(),
        };
        Ok((access::ApiAccess::new(group), owner))
    }
}

/// Builds the registry from the configuration and the stored definitions.
pub fn open(
    paths: &DaemonPaths,
    catalog: Catalog,
    instance_owner: access::UserId,
) -> Result<Arc<Registry>, DaemonError> {
    let store = Store::open(&paths.state_dir)?;
    std::fs::create_dir_all(&paths.run_dir).map_err(|source| DaemonError::RunDir {
        path: paths.run_dir.clone(),
        source,
    })?;
    let mut registry =
        Registry::open(catalog, store, paths.run_dir.clone())?.with_instance_owner(instance_owner);
    if let Some(path) = &paths.holder {
        registry = registry.with_holder(Arc::new(HolderLink::new(path)));
    }
    Ok(Arc::new(registry))
}

/// Becomes `exe`, run with this process's arguments and environment: the
/// same process (pid, cgroup, parent), a new program that takes every
/// instance over from the fd holder. Nothing is stopped first: to the
/// devices this is a SIGKILL at a moment of our choosing, which the holder
/// and the journals make safe. If the exec fails the process exits at once
/// (status 1), leaving every instance to the holder for the next daemon:
/// nothing is stopped or let go of on the way out.
fn exec_upgrade(exe: &Path) -> ! {
    use std::os::unix::process::CommandExt;
    tracing::info!("upgrade: exec {}", exe.display());
    let e = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    let e = DaemonError::Upgrade {
        exe: exe.to_owned(),
        source: e,
    };
    tracing::error!("{e}");
    eprintln!("wdvirt: {e}");
    std::process::exit(1)
}

/// Makes sure the fd holder at `path` runs: the one already there (a
/// predecessor daemon's, keeping its instances), or a new one. Called once
/// the daemon has its state directory and its API socket, so a daemon that
/// cannot start leaves no holder behind.
fn start_holder(path: &Path) -> Result<(), DaemonError> {
    let holder_err = |source| DaemonError::Holder {
        path: path.to_owned(),
        source,
    };
    match HolderClient::connect(path).and_then(|mut c| c.hello()) {
        Ok(info) => {
            tracing::info!(
                pid = info.pid,
                held = info.held,
                "fd holder already running at {}",
                path.display()
            );
        }
        Err(HolderError::NotRunning { .. }) => {
            let exe = std::env::current_exe().map_err(|e| holder_err(HolderError::Io(e)))?;
            let pid = holder::spawn(&exe, path).map_err(holder_err)?;
            tracing::info!(pid, "started the fd holder at {}", path.display());
        }
        Err(e) => return Err(holder_err(e)),
    }
    Ok(())
}

/// How long a stop waits for API calls in progress.
const API_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves the API until SIGTERM or SIGINT, then stops every instance.
/// `ready` runs once the API answers (with the auto-started instances up).
pub fn run(
    paths: &DaemonPaths,
    registry: Arc<Registry>,
    access: access::ApiAccess,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    let access = Arc::new(access);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(DaemonError::Runtime)?;
    let api_err = |source| DaemonError::Api {
        path: paths.api.clone(),
        source,
    };
    rt.block_on(async {
        let listener = api::bind(&paths.api, &access).map_err(api_err)?;
        let metrics = match paths.metrics_addr {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Metrics { addr, source })?;
                if !addr.ip().is_loopback() {
                    tracing::warn!("serving /metrics beyond this host, at {addr}");
                }
                Some(l)
            }
            None => None,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(api_err)?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(api_err)?;
        if let Some(link) = registry.holder() {
            start_holder(link.path())?;
        }
        registry.start_held();
        registry.start_auto();
        ready();
        let signalled = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = signalled.clone();
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let upgrading = registry.clone();
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
                _ = upgrading.upgrade_asked() => tracing::info!("upgrade: handing every instance over"),
            }
            let _ = stop_metrics.send(());
            notify.notify_one();
        };
        if let Some(l) = metrics {
            let stopped = async move {
                let _ = metrics_stopped.await;
            };
            let reg = registry.clone();
            tokio::spawn(async move {
                if let Err(e) = api::serve_metrics(l, reg, stopped).await {
                    tracing::error!("the /metrics listener stopped: {e}");
                }
            });
        }
        // A graceful stop waits for open API connections; a client that
        // never finishes its request must not keep the daemon (and every
        // instance) from stopping.
        let deadline = async move {
            signalled.notified().await;
            tokio::time::sleep(API_DRAIN).await;
            tracing::warn!(
                "API clients still connected {API_DRAIN:?} after the signal: closing them"
            );
        };
        tokio::select! {
            r = api::serve(
                listener,
                registry.clone(),
                access.clone(),
                registry.instance_owner().clone(),
                shutdown,
            ) => r.map_err(api_err),
            () = deadline => Ok(()),
        }
    })?;
    let _ = std::fs::remove_file(&paths.api);
    if let Some(exe) = registry.upgrade_to() {
        exec_upgrade(&exe);
    }
    let attached = registry.shutdown();
    // Every instance stopped and let go of: a holder keeping nothing ends.
    if let Some(link) = registry.holder() {
        let held = HolderClient::connect(link.path()).and_then(|mut c| Ok((c.hello()?.held, c)));
        match held {
            Ok((0, c)) => {
                let _ = c.quit();
            }
            Ok((n, _)) => tracing::warn!(
                "the fd holder at {} still keeps {n} fds",
                link.path().display()
            ),
            Err(e) => tracing::warn!("the fd holder at {}: {e}", link.path().display()),
        }
    }
    if !attached.is_empty() {
        tracing::warn!(
            "stopped with VMs still attached to: {} (their devices are gone)",
            attached.join(", ")
        );
        eprintln!(
            "wdvirt: stopped with VMs still attached to: {}",
            attached.join(", ")
        );
    }
    Ok(())
}
