//! What the libvirt hook does for each operation libvirt calls it with
//! (`/etc/libvirt/hooks/qemu.d/wdvirt NAME OPERATION SUBOPERATION EXTRA`,
//! the domain XML on stdin). Every step is an [`Action`] handed to a
//! [`Daemon`]; the hook never calls back into libvirt.
//!
//! | operation | what happens |
//! |---|---|
//! | `prepare begin`, `restore begin` | define and start every instance asked for; on any failure undo what this call made and fail (libvirt shows the message and does not start QEMU) |
//! | `started begin` | record the domain's name on each instance and check QEMU is attached; never fails the domain |
//! | `release end` | stop and undefine every instance made for the domain |
//! | `reconnect begin` | re-adopt the domain's instances (libvirtd restarted); running ones are not touched; never fails the domain |
//! | `migrate begin` | refuse: QEMU 11.1 cannot carry a vfio-user device's state |
//! | anything else | nothing |
//!
//! A domain that asks for nothing costs one XML parse and no daemon call.

use std::path::Path;

use super::metadata::{Domain, MetadataError, Planned, socket_path};
use crate::daemon::action::{Action, DefineRequest, ModifyRequest, Outcome};
use crate::daemon::view::{InstanceState, InstanceView};

/// A refusal from the daemon (its HTTP status and kind when it answered).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    /// `None` when the daemon could not be reached.
    pub status: Option<u16>,
    /// The daemon's machine-readable kind (`no-such-instance`, ...), when
    /// it answered.
    pub kind: Option<String>,
    pub message: String,
}

/// The daemon as the hook sees it: one action at a time.
pub trait Daemon {
    fn handle(&self, action: Action) -> Result<Outcome, DaemonError>;
}

/// The operations libvirt's QEMU driver calls hooks with that the hook
/// acts on; every other one (`start`, `stopped`, `attach`, ...) is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Prepare,
    Started,
    Release,
    Migrate,
    Restore,
    Reconnect,
    Other,
}

impl Operation {
    /// OPERATION and SUBOPERATION as libvirt passes them; the pair the hook
    /// acts on, or `Other`.
    pub fn from_args(op: &str, sub: &str) -> Operation {
        match (op, sub) {
            ("prepare", "begin") => Operation::Prepare,
            ("started", "begin") => Operation::Started,
            ("release", "end") => Operation::Release,
            ("migrate", "begin") => Operation::Migrate,
            ("restore", "begin") => Operation::Restore,
            ("reconnect", "begin") => Operation::Reconnect,
            _ => Operation::Other,
        }
    }

    /// Whether the domain XML matters (`Other`'s is not even parsed).
    fn reads_xml(self) -> bool {
        self != Operation::Other
    }

    /// Whether the domain's QEMU is running already: libvirt kills a
    /// running domain whose `started` or `reconnect` hook fails, so these
    /// report what went wrong and succeed.
    fn domain_runs(self) -> bool {
        matches!(self, Operation::Started | Operation::Reconnect)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("domain '{domain}': {source}")]
    Metadata {
        domain: String,
        #[source]
        source: MetadataError,
    },
    #[error(
        "domain '{0}' asks for wdvirt instances but its guest RAM is not shared: the device reaches guest memory through the fds QEMU passes, so add <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking> (`wdvirt libvirt snippet` prints it)"
    )]
    MemoryNotShared(String),
    #[error(
        "domain '{domain}' asks for wdvirt instance {instance} but its <qemu:commandline> adds no vfio-user-pci device at a socket named {instance}.sock (`wdvirt libvirt snippet --domain {domain}` prints the lines to add)"
    )]
    SocketNotNamed { domain: String, instance: String },
    #[error("domain '{domain}': instance {instance}: {source}")]
    Daemon {
        domain: String,
        instance: String,
        #[source]
        source: DaemonError,
    },
    #[error(
        "domain '{domain}': the wdvirt instance name {instance} is taken by an instance {owner}; rename or undefine it"
    )]
    NameTaken {
        domain: String,
        instance: String,
        owner: String,
    },
    #[error(
        "domain '{domain}' cannot be migrated: it holds wdvirt instance(s) {instances}, and QEMU 11.1's vfio-user-pci cannot carry a vfio-user device's state (QEMU would not stop the migration, and the device's queues and jobs would be lost silently); wdvirt's own migration path is not available here. Shut the domain down and start it on the destination instead."
    )]
    Migration { domain: String, instances: String },
    #[error("the daemon's answer to {0} was not an instance")]
    Unexpected(&'static str),
}

/// What a hook call did, one line each (the CLI prints them on stderr:
/// libvirt reads a hook's stdout as XML for some operations).
pub type Report = Vec<String>;

/// Runs one hook call. `xml` is the domain XML libvirt passed on stdin.
/// `name` is the domain's name as libvirt passed it (used in messages
/// when the XML cannot be read).
pub fn run(op: Operation, name: &str, xml: &str, daemon: &dyn Daemon) -> Result<Report, HookError> {
    if !op.reads_xml() {
        return Ok(Report::new());
    }
    let domain = match Domain::parse(xml) {
        Ok(d) => d,
        // Metadata changed under a running domain (`virsh metadata`), or a
        // domain started before the hook was installed.
        Err(source) if op.domain_runs() => {
            let e = HookError::Metadata {
                domain: name.into(),
                source,
            };
            return Ok(vec![format!("{e}; nothing done")]);
        }
        Err(source) => {
            return Err(HookError::Metadata {
                domain: name.into(),
                source,
            });
        }
    };
    if !domain.asks_for_instances() {
        return Ok(Report::new());
    }
    match op {
        Operation::Prepare | Operation::Restore => prepare(&domain, daemon),
        Operation::Started => Ok(started(&domain, daemon)),
        Operation::Release => release(&domain, daemon),
        Operation::Reconnect => Ok(reconnect(&domain, daemon)),
        Operation::Migrate => Err(HookError::Migration {
            domain: domain.name.clone(),
            instances: names(&domain.planned()),
        }),
        _ => Ok(Report::new()),
    }
}

fn names(planned: &[Planned]) -> String {
    planned
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn get(daemon: &dyn Daemon, name: &str) -> Result<Option<InstanceView>, DaemonError> {
    match daemon.handle(Action::GetInstance { id: name.into() }) {
        Ok(Outcome::Instance(v)) => Ok(Some(*v)),
        Ok(_) => Err(DaemonError {
            status: None,
            kind: None,
            message: "the daemon's answer to get-instance was not an instance".into(),
        }),
        // Only the instance's absence: any other 404 (a daemon without the
        // route, say) is an error.
        Err(e) if e.kind.as_deref() == Some("no-such-instance") => Ok(None),
        Err(e) => Err(e),
    }
}

fn instance(outcome: Outcome, what: &'static str) -> Result<InstanceView, HookError> {
    match outcome {
        Outcome::Instance(v) => Ok(*v),
        _ => Err(HookError::Unexpected(what)),
    }
}

/// Stops (if running) and undefines one instance; what went wrong, if
/// anything.
fn remove(daemon: &dyn Daemon, v: &InstanceView) -> Result<(), DaemonError> {
    if v.state.running() {
        daemon.handle(Action::Stop { id: v.name.clone() })?;
    }
    daemon.handle(Action::Undefine { id: v.name.clone() })?;
    Ok(())
}

fn prepare(domain: &Domain, daemon: &dyn Daemon) -> Result<Report, HookError> {
    if !domain.shared_memory {
        return Err(HookError::MemoryNotShared(domain.name.clone()));
    }
    let planned = domain.planned();
    for p in &planned {
        let socket = socket_path(Path::new("/"), &p.name);
        let named = domain
            .vfio_user_sockets
            .iter()
            .any(|s| s.file_name() == socket.file_name());
        if !named {
            return Err(HookError::SocketNotNamed {
                domain: domain.name.clone(),
                instance: p.name.clone(),
            });
        }
    }
    let mut made: Vec<InstanceView> = Vec::new();
    let mut report = Report::new();
    let result = (|| {
        for p in &planned {
            let v = prepare_one(domain, p, daemon, &mut report)?;
            report.push(format!(
                "started {} ({}) for domain '{}' at {}",
                v.name,
                v.type_name,
                domain.name,
                v.socket.as_deref().unwrap_or(Path::new("?")).display()
            ));
            made.push(v);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(report),
        Err(e) => {
            // Nothing this call made outlives its failure.
            for v in made.iter().rev() {
                if let Err(undo) = remove(daemon, v) {
                    tracing::error!(instance = %v.name, "rolling back: {undo}");
                }
            }
            Err(e)
        }
    }
}

fn prepare_one(
    domain: &Domain,
    p: &Planned,
    daemon: &dyn Daemon,
    report: &mut Report,
) -> Result<InstanceView, HookError> {
    let err = |source| HookError::Daemon {
        domain: domain.name.clone(),
        instance: p.name.clone(),
        source,
    };
    if let Some(old) = get(daemon, &p.name).map_err(err)? {
        if old.vm.as_deref() != Some(domain.name.as_str()) {
            return Err(HookError::NameTaken {
                domain: domain.name.clone(),
                instance: p.name.clone(),
                owner: match &old.vm {
                    Some(vm) => format!("of VM '{vm}'"),
                    None => "an operator defined".into(),
                },
            });
        }
        if old.state == InstanceState::Attached {
            return Err(HookError::NameTaken {
                domain: domain.name.clone(),
                instance: p.name.clone(),
                owner: "that a running VMM is attached to".into(),
            });
        }
        // Left by a run whose release never came (libvirtd killed, say):
        // made afresh so its type and policy follow the XML.
        remove(daemon, &old).map_err(err)?;
        report.push(format!("removed {} left from an earlier run", p.name));
    }
    daemon
        .handle(Action::Define(DefineRequest {
            type_name: p.type_name.clone(),
            name: Some(p.name.clone()),
            uuid: None,
            auto: false,
            numa: p.numa,
            qos: p.qos.clone(),
            vm: Some(domain.name.clone()),
            // Its socket is QEMU's alone when the XML names QEMU's user;
            // else the daemon's --instance-owner.
            owner: domain.qemu_user.clone(),
        }))
        .map_err(err)?;
    match daemon.handle(Action::Start { id: p.name.clone() }) {
        Ok(o) => instance(o, "start"),
        Err(e) => {
            if let Err(undo) = daemon.handle(Action::Undefine { id: p.name.clone() }) {
                tracing::error!(instance = %p.name, "rolling back: {undo}");
            }
            Err(err(e))
        }
    }
}

/// Never fails (see [`Operation::domain_runs`]): what went wrong is reported.
fn started(domain: &Domain, daemon: &dyn Daemon) -> Report {
    let mut report = Report::new();
    for p in domain.planned() {
        // Only an instance of this domain's (or of none) is labelled: one
        // of the same name another VM holds is left alone.
        match get(daemon, &p.name) {
            Err(e) => {
                report.push(format!("{}: cannot ask the daemon: {e}", p.name));
                continue;
            }
            Ok(None) => {
                report.push(format!("{}: the daemon has no such instance", p.name));
                continue;
            }
            Ok(Some(v)) if v.vm.as_ref().is_some_and(|vm| *vm != domain.name) => {
                report.push(format!(
                    "{}: belongs to VM '{}', not '{}'; left alone",
                    p.name,
                    v.vm.as_deref().unwrap_or("?"),
                    domain.name
                ));
                continue;
            }
            Ok(Some(_)) => {}
        }
        let changes = ModifyRequest {
            vm: Some(Some(domain.name.clone())),
            ..Default::default()
        };
        match daemon.handle(Action::Modify {
            id: p.name.clone(),
            changes,
        }) {
            Ok(o) => {
                let v = match instance(o, "modify") {
                    Ok(v) => v,
                    Err(e) => {
                        report.push(format!("{}: {e}", p.name));
                        continue;
                    }
                };
                report.push(if v.state == InstanceState::Attached {
                    format!("{} attached to domain '{}'", v.name, domain.name)
                } else {
                    format!(
                        "{} is {}, not attached: QEMU has not connected to {}",
                        v.name,
                        v.state.name(),
                        v.socket.as_deref().unwrap_or(Path::new("?")).display()
                    )
                });
            }
            // The domain runs already: failing here would make libvirt
            // kill it. Say so and go on.
            Err(e) => report.push(format!("{}: cannot record the attachment: {e}", p.name)),
        }
    }
    report
}

fn release(domain: &Domain, daemon: &dyn Daemon) -> Result<Report, HookError> {
    let mut report = Report::new();
    let mut first_error = None;
    for p in domain.planned() {
        let err = |source| HookError::Daemon {
            domain: domain.name.clone(),
            instance: p.name.clone(),
            source,
        };
        let outcome = get(daemon, &p.name).and_then(|v| match v {
            None => Ok(None),
            // Not ours (another VM's, or an operator's): left alone.
            Some(v) if v.vm.as_deref() != Some(domain.name.as_str()) => Ok(Some(false)),
            Some(v) => remove(daemon, &v).map(|()| Some(true)),
        });
        match outcome {
            Ok(None) => report.push(format!("{}: already gone", p.name)),
            Ok(Some(false)) => report.push(format!(
                "{}: not made for domain '{}'; left alone",
                p.name, domain.name
            )),
            Ok(Some(true)) => report.push(format!("released {}", p.name)),
            Err(e) => {
                let e = err(e);
                report.push(e.to_string());
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// libvirtd restarted while the domain runs. The instances are the
/// daemon's, not libvirtd's: nothing running is stopped or restarted
/// (QEMU's connection is the guest's device). Ones the daemon knows without
/// a VM are adopted; missing or stopped ones are reported. Never fails:
/// a failing reconnect hook makes libvirt kill the domain.
fn reconnect(domain: &Domain, daemon: &dyn Daemon) -> Report {
    let mut report = Report::new();
    for p in domain.planned() {
        let line = match get(daemon, &p.name) {
            Err(e) => format!("{}: cannot ask the daemon: {e}", p.name),
            Ok(None) => format!(
                "{}: the daemon has no such instance; the domain's device is gone until it restarts",
                p.name
            ),
            Ok(Some(v)) if v.vm.is_none() => {
                let changes = ModifyRequest {
                    vm: Some(Some(domain.name.clone())),
                    ..Default::default()
                };
                match daemon.handle(Action::Modify {
                    id: p.name.clone(),
                    changes,
                }) {
                    Ok(_) => format!("adopted {} ({})", p.name, v.state.name()),
                    Err(e) => format!("{}: cannot adopt: {e}", p.name),
                }
            }
            Ok(Some(v)) if v.vm.as_deref() != Some(domain.name.as_str()) => format!(
                "{}: belongs to VM '{}', not '{}'; left alone",
                p.name,
                v.vm.as_deref().unwrap_or("?"),
                domain.name
            ),
            Ok(Some(v)) => format!("{} is {}; left as it is", p.name, v.state.name()),
        };
        report.push(line);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_parse_as_libvirt_passes_them() {
        assert_eq!(Operation::from_args("prepare", "begin"), Operation::Prepare);
        assert_eq!(Operation::from_args("release", "end"), Operation::Release);
        assert_eq!(Operation::from_args("migrate", "begin"), Operation::Migrate);
        assert_eq!(Operation::from_args("prepare", "end"), Operation::Other);
        assert_eq!(Operation::from_args("frobnicate", "-"), Operation::Other);
    }

    struct NoDaemon;
    impl Daemon for NoDaemon {
        fn handle(&self, a: Action) -> Result<Outcome, DaemonError> {
            panic!("no daemon call expected, got {a:?}")
        }
    }

    #[test]
    fn operations_that_need_nothing_never_parse_or_call() {
        for (op, sub) in [("start", "begin"), ("stopped", "end"), ("attach", "begin")] {
            let op = Operation::from_args(op, sub);
            assert_eq!(op, Operation::Other);
            assert!(
                run(op, "x", "not xml at all", &NoDaemon)
                    .unwrap()
                    .is_empty()
            );
        }
        let plain = "<domain><name>plain</name></domain>";
        for op in [
            Operation::Prepare,
            Operation::Started,
            Operation::Release,
            Operation::Reconnect,
            Operation::Migrate,
            Operation::Restore,
        ] {
            assert!(
                run(op, "plain", plain, &NoDaemon).unwrap().is_empty(),
                "{op:?}"
            );
        }
    }
}
