//! The instance registry: every defined instance by UUID and by name, the
//! running ones with their placement, and the one function that carries out
//! an [`Action`]. Definitions are durable before an action is acknowledged.
//!
//! One lock guards the registry; actions are short (binding a socket,
//! starting a thread, one atomic file write), so callers are serialised and
//! the registry is always consistent with the disk and the partition pools.
//! The one long step, a stopping device's drain (at most 2 s), runs outside
//! the lock, with the instance marked `stopping`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use parking_lot::Mutex;
use uuid::Uuid;

use super::access::{UserId, own_user, resolve_user};
use super::action::{
    Action, ActionError, DefineRequest, ModifyRequest, Outcome, UpgradeRequest, UpgradeView,
};
use super::catalog::{Catalog, Placed, QosAccounts};
use super::instance::{Instance, InstanceSpec, KeepPlan};
use super::store::{Definition, Store};
use super::view::{InstanceState, InstanceView};
use crate::restart::adopt;
use crate::restart::keep::HolderLink;
use crate::stats::report::{Interference, SchedulerStats, StatsReport, Throttled};
use crate::transport::server::SocketAccess;

struct Running {
    instance: Instance,
    placed: Placed,
    /// Who owns its socket (mode 0600).
    socket_owner: UserId,
}

struct Entry {
    def: Definition,
    running: Option<Running>,
    /// Being stopped, outside the registry's lock (its device draining).
    stopping: bool,
    /// Started at least once since the daemon started.
    was_started: bool,
}

impl Entry {
    fn new(def: Definition) -> Entry {
        Entry {
            def,
            running: None,
            stopping: false,
            was_started: false,
        }
    }

    fn state(&self) -> InstanceState {
        match &self.running {
            Some(r) if r.instance.attached() => InstanceState::Attached,
            Some(_) => InstanceState::Started,
            None if self.stopping => InstanceState::Stopping,
            None if self.was_started => InstanceState::Stopped,
            None => InstanceState::Defined,
        }
    }

    /// Refuses what cannot be done while the instance runs or stops.
    fn must_be_idle(&self, what: &str) -> Result<(), ActionError> {
        if self.running.is_some() || self.stopping {
            return Err(ActionError::WrongState {
                name: self.def.name.clone(),
                state: self.state().name(),
                what: what.into(),
            });
        }
        Ok(())
    }
}

#[derive(Default)]
struct Entries {
    by_uuid: BTreeMap<Uuid, Entry>,
    shutting_down: bool,
}

impl Entries {
    fn find(&self, id: &str) -> Result<Uuid, ActionError> {
        if let Ok(u) = Uuid::parse_str(id)
            && self.by_uuid.contains_key(&u)
        {
            return Ok(u);
        }
        self.by_uuid
            .values()
            .find(|e| e.def.name == id)
            .map(|e| e.def.uuid)
            .ok_or_else(|| ActionError::NoSuchInstance(id.into()))
    }

    fn name_taken(&self, name: &str) -> bool {
        self.by_uuid.values().any(|e| e.def.name == name)
    }
}

/// A character instance names may have: A-Z a-z 0-9 - _ .
pub fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Whether `name` is 1 to `max` bytes of [`name_char`]s, not starting
/// with '.' or '-': the shape of an instance name (the libvirt hook keeps
/// a domain's name as its instances' base only when it has this shape).
pub fn plain_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.chars().all(name_char)
        && !name.starts_with(['.', '-'])
}

/// Where instance `name`'s socket is in `run_dir`: `NAME.sock`, what the
/// daemon serves and what a VMM (or `<qemu:commandline>`) names.
pub fn socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.sock"))
}

/// Names an operator may use: they become socket file names (`NAME.sock`
/// in the run directory), so nothing that could leave it, hide as a dot
/// file, read as an option, pass for another instance's UUID, or take the
/// API socket's name.
fn check_name(name: &str) -> Result<(), ActionError> {
    if !plain_name(name, 64) {
        return Err(ActionError::Invalid(format!(
            "instance name '{name}' must be 1-64 characters of A-Z a-z 0-9 - _ ., not starting with '.' or '-'"
        )));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(ActionError::Invalid(format!(
            "instance name '{name}' reads as a UUID; instances are named by name or UUID, so a name cannot be one"
        )));
    }
    if name == "api" {
        return Err(ActionError::Invalid(
            "instance name 'api' is reserved (api.sock is the daemon's own socket)".into(),
        ));
    }
    Ok(())
}

/// A VM's name is the operator's (libvirt allows nearly any text), but it
/// lands in listings and logs: bounded, and no control characters.
fn check_vm(vm: Option<&str>) -> Result<(), ActionError> {
    match vm {
        Some(v) if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) => {
            Err(ActionError::Invalid(format!(
                "VM name {v:?} must be 1-256 bytes (UTF-8) with no control characters"
            )))
        }
        _ => Ok(()),
    }
}

pub struct Registry {
    catalog: Catalog,
    store: Store,
    run_dir: PathBuf,
    /// Owns an instance's socket when its definition names nobody.
    instance_owner: UserId,
    entries: Mutex<Entries>,
    /// The fd holder that keeps started instances for a successor daemon.
    holder: Option<Arc<HolderLink>>,
    /// The daemon's program file, as started (an upgrade's default).
    exe: Option<PathBuf>,
    /// An accepted upgrade's program, and its signal to the daemon.
    upgrade: Mutex<Option<PathBuf>>,
    upgrade_asked: tokio::sync::Notify,
}

impl Registry {
    /// Loads every stored definition (unreadable files are reported and
    /// skipped).
    pub fn open(catalog: Catalog, store: Store, run_dir: PathBuf) -> Result<Registry, ActionError> {
        let (defs, bad) = store.load()?;
        for b in bad {
            tracing::error!(
                "skipping definition {}: {} (fix or remove the file)",
                b.path.display(),
                b.reason
            );
        }
        let mut entries = Entries::default();
        for def in defs {
            // A file edited by hand is held to the same rules as a define.
            let refused = check_name(&def.name)
                .err()
                .map(|e| e.to_string())
                .or_else(|| {
                    entries.name_taken(&def.name).then(|| {
                        format!("the name '{}' is already defined by another file", def.name)
                    })
                });
            if let Some(why) = refused {
                tracing::error!(
                    "skipping definition {}: {why} (fix or remove the file)",
                    store.dir().join(format!("{}.json", def.uuid)).display()
                );
                continue;
            }
            if catalog.get_type(&def.type_name).is_none() {
                tracing::warn!(
                    instance = %def.name,
                    "defined with type '{}', which the configuration no longer has; it cannot start until the type is back",
                    def.type_name
                );
            }
            entries.by_uuid.insert(def.uuid, Entry::new(def));
        }
        Ok(Registry {
            catalog,
            store,
            run_dir,
            instance_owner: own_user(),
            entries: Mutex::new(entries),
            holder: None,
            exe: std::env::current_exe().ok(),
            upgrade: Mutex::new(None),
            upgrade_asked: tokio::sync::Notify::new(),
        })
    }

    /// Keep every instance started from now on in the fd holder at `link`,
    /// and take over what it keeps of a predecessor's
    /// ([`start_held`](Self::start_held)).
    pub fn with_holder(mut self, link: Arc<HolderLink>) -> Registry {
        self.holder = Some(link);
        self
    }

    /// The fd holder, if instances are kept in one.
    pub fn holder(&self) -> Option<&Arc<HolderLink>> {
        self.holder.as_ref()
    }

    /// Starts every instance a predecessor daemon left in the fd holder,
    /// taking over its socket and VMM. What the holder keeps of an
    /// instance no longer defined is let go.
    pub fn start_held(&self) {
        let Some(link) = &self.holder else { return };
        let held = match link.instances() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("cannot ask the fd holder what it keeps: {e}");
                return;
            }
        };
        for u in held {
            let known = self.entries.lock().by_uuid.contains_key(&u);
            if !known {
                tracing::warn!(
                    "the fd holder keeps instance {u}, which is not defined: letting it go"
                );
                let _ = link.drop_prefix(&format!("inst/{u}/"));
                continue;
            }
            if let Err(e) = self.handle(Action::Start { id: u.to_string() }) {
                tracing::error!("taking over instance {u}: {e}");
            }
        }
    }

    /// Instance sockets whose definition names no owner are owned by
    /// `owner` (the daemon's `--instance-owner`); by default the daemon's
    /// own user.
    pub fn with_instance_owner(mut self, owner: UserId) -> Registry {
        self.instance_owner = owner;
        self
    }

    /// Who owns instance sockets when a definition names nobody.
    pub fn instance_owner(&self) -> &UserId {
        &self.instance_owner
    }

    /// The user `def`'s socket is owned by.
    fn socket_owner(&self, def: &Definition) -> Result<UserId, super::access::AccessError> {
        match &def.owner {
            Some(o) => resolve_user(o),
            None => Ok(self.instance_owner.clone()),
        }
    }

    /// Starts every `auto` instance; failures are logged, not fatal.
    pub fn start_auto(&self) {
        let autos: Vec<String> = {
            let e = self.entries.lock();
            e.by_uuid
                .values()
                .filter(|e| e.def.auto && e.running.is_none())
                .map(|e| e.def.uuid.to_string())
                .collect()
        };
        for id in autos {
            if let Err(e) = self.handle(Action::Start { id: id.clone() }) {
                tracing::error!("auto-start of {id}: {e}");
            }
        }
    }

    /// Carries out one action.
    pub fn handle(&self, action: Action) -> Result<Outcome, ActionError> {
        if let Action::Stop { id } = &action {
            return self.stop(id);
        }
        let mut entries = self.entries.lock();
        if entries.shutting_down && action.mutates() {
            return Err(ActionError::ShuttingDown);
        }
        match action {
            Action::ListTypes => Ok(Outcome::Types(self.catalog.types())),
            Action::ListAccelerators => Ok(Outcome::Accelerators(self.catalog.accelerators())),
            Action::ListInstances { defined } => {
                let mut list: Vec<InstanceView> = entries
                    .by_uuid
                    .values()
                    .filter(|e| defined || e.running.is_some())
                    .map(|e| self.view(e))
                    .collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Outcome::Instances(list))
            }
            Action::GetInstance { id } => {
                let u = entries.find(&id)?;
                Ok(self.instance_outcome(&entries, u))
            }
            Action::Define(req) => self.define(&mut entries, req),
            Action::Undefine { id } => {
                let u = entries.find(&id)?;
                let e = &entries.by_uuid[&u];
                e.must_be_idle("stop it before undefining it")?;
                let view = self.view(e);
                self.store.remove(u)?;
                entries.by_uuid.remove(&u);
                Ok(Outcome::Instance(Box::new(view)))
            }
            Action::Start { id } => {
                let u = entries.find(&id)?;
                self.start(&mut entries, u)?;
                Ok(self.instance_outcome(&entries, u))
            }
            Action::Stop { .. } => unreachable!("handled above, outside the lock"),
            Action::Modify { id, changes } => {
                let u = entries.find(&id)?;
                self.modify(&mut entries, u, changes)?;
                Ok(self.instance_outcome(&entries, u))
            }
            Action::Stats { vm, instance } => self
                .stats(&entries, vm, instance)
                .map(|r| Outcome::Stats(Box::new(r))),
            Action::Upgrade(req) => self.upgrade(&mut entries, req).map(Outcome::Upgrade),
        }
    }

    fn instance_outcome(&self, entries: &Entries, u: Uuid) -> Outcome {
        Outcome::Instance(Box::new(self.view(&entries.by_uuid[&u])))
    }

    fn check_definition(
        &self,
        type_name: &str,
        qos: Option<&str>,
        numa: Option<u32>,
    ) -> Result<(), ActionError> {
        if let Some(n) = numa {
            self.catalog.check_numa(n).map_err(ActionError::Invalid)?;
        }
        if self.catalog.get_type(type_name).is_none() {
            return Err(ActionError::NoSuchType {
                name: type_name.into(),
                known: self.catalog.type_names(),
            });
        }
        if let Some(q) = qos
            && !self.catalog.has_policy(q)
        {
            return Err(ActionError::NoSuchPolicy {
                name: q.into(),
                known: self.catalog.policy_names(),
            });
        }
        Ok(())
    }

    fn define(&self, entries: &mut Entries, req: DefineRequest) -> Result<Outcome, ActionError> {
        self.check_definition(&req.type_name, req.qos.as_deref(), req.numa)?;
        check_vm(req.vm.as_deref())?;
        let name = match req.name {
            Some(n) => {
                check_name(&n)?;
                if entries.name_taken(&n) {
                    return Err(ActionError::AlreadyExists(format!(
                        "an instance named '{n}' is already defined"
                    )));
                }
                n
            }
            None => {
                let n = (0..)
                    .map(|i| format!("{}-{i}", req.type_name))
                    .find(|n| !entries.name_taken(n))
                    .expect("some index is free");
                check_name(&n)?;
                n
            }
        };
        let uuid = req.uuid.unwrap_or_else(Uuid::new_v4);
        if entries.by_uuid.contains_key(&uuid) {
            return Err(ActionError::AlreadyExists(format!(
                "an instance with UUID {uuid} is already defined"
            )));
        }
        let def = Definition {
            uuid,
            name,
            type_name: req.type_name,
            auto: req.auto,
            numa: req.numa,
            qos: req.qos,
            vm: req.vm,
            owner: req.owner,
        };
        self.socket_owner(&def)
            .map_err(|e| ActionError::Invalid(format!("owner: {e}")))?;
        // Durable before it is acknowledged.
        self.store.save(&def)?;
        tracing::info!(instance = %def.name, %uuid, "defined");
        entries.by_uuid.insert(uuid, Entry::new(def));
        Ok(self.instance_outcome(entries, uuid))
    }

    fn modify(&self, entries: &mut Entries, u: Uuid, m: ModifyRequest) -> Result<(), ActionError> {
        let e = entries.by_uuid.get_mut(&u).expect("found by caller");
        let mut def = e.def.clone();
        if let Some(a) = m.auto {
            def.auto = a;
        }
        if let Some(t) = m.type_name {
            if t != def.type_name {
                e.must_be_idle("stop it before changing its type")?;
            }
            def.type_name = t;
        }
        if let Some(n) = m.numa {
            def.numa = n;
        }
        if let Some(q) = m.qos {
            def.qos = q;
        }
        if let Some(vm) = m.vm {
            check_vm(vm.as_deref())?;
            def.vm = vm;
        }
        if let Some(owner) = m.owner {
            def.owner = owner;
            self.socket_owner(&def)
                .map_err(|e| ActionError::Invalid(format!("owner: {e}")))?;
        }
        self.check_definition(&def.type_name, def.qos.as_deref(), def.numa)?;
        if def != e.def {
            self.store.save(&def)?;
            let policy = self.effective_qos(&def);
            let changed = policy != self.effective_qos(&e.def);
            e.def = def;
            // A running instance's QoS changes at once (nothing else does).
            if let (true, Some(r)) = (changed, &e.running) {
                self.catalog.apply_policy(&r.placed, &policy);
                tracing::info!(instance = %e.def.name, policy, "QoS policy applied");
            }
        }
        Ok(())
    }

    /// The QoS policy an instance runs under: its own, else its type's.
    fn effective_qos(&self, def: &Definition) -> String {
        def.qos.clone().unwrap_or_else(|| {
            self.catalog
                .get_type(&def.type_name)
                .map(|t| t.qos.clone())
                .unwrap_or_default()
        })
    }

    fn start(&self, entries: &mut Entries, u: Uuid) -> Result<(), ActionError> {
        let e = entries.by_uuid.get_mut(&u).expect("found by caller");
        let name = e.def.name.clone();
        if e.running.is_some() || e.stopping {
            return Err(ActionError::WrongState {
                name,
                state: e.state().name(),
                what: if e.stopping {
                    "wait for its stop to finish".into()
                } else {
                    "it is already started".into()
                },
            });
        }
        let ty =
            self.catalog
                .get_type(&e.def.type_name)
                .ok_or_else(|| ActionError::NoSuchType {
                    name: e.def.type_name.clone(),
                    known: self.catalog.type_names(),
                })?;
        // Before placing: a user gone from the host since the define
        // leaves nothing to release.
        let owner = self
            .socket_owner(&e.def)
            .map_err(|err| ActionError::Start {
                name: name.clone(),
                reason: format!("its socket's owner: {err}"),
            })?;
        let placed =
            self.catalog
                .place(ty, e.def.numa)
                .map_err(|reason| ActionError::Placement {
                    name: name.clone(),
                    reason,
                })?;
        let spec = InstanceSpec {
            name: name.clone(),
            socket: socket_path(&self.run_dir, &name),
            config: placed.config,
            type_name: e.def.type_name.clone(),
        };
        // Under its policy before its first job.
        self.catalog
            .apply_policy(&placed, &self.effective_qos(&e.def));
        let own = rustix::process::geteuid().as_raw();
        let access = SocketAccess {
            mode: 0o600,
            uid: (owner.uid != own).then_some(owner.uid),
            gid: None,
        };
        let plan = self.keep_plan(u, &name, &placed.config);
        match Instance::start_kept(
            spec,
            placed.backends.clone(),
            placed.pasid(),
            self.catalog.daemon_settings().limits.transport_limits(),
            access,
            plan,
        ) {
            Ok(instance) => {
                match instance.adoption() {
                    Some(a) => {
                        tracing::info!(instance = %name, pasid = placed.pasid(), jobs_rerun = a.jobs_rerun, "taken over with its VMM at {} (rebuilt in {:?})", instance.socket().display(), a.rebuilt_in)
                    }
                    None => {
                        tracing::info!(instance = %name, pasid = placed.pasid(), owner = %owner.name, "started at {}", instance.socket().display())
                    }
                }
                e.running = Some(Running {
                    instance,
                    placed,
                    socket_owner: owner,
                });
                e.was_started = true;
                Ok(())
            }
            Err(err) => {
                self.catalog.release(placed.allocation);
                Err(ActionError::Start {
                    name,
                    reason: err.to_string(),
                })
            }
        }
    }

    /// Accept an upgrade to `req.exe` (default: the daemon's own program
    /// file): the program must run and say it is wdvirt, and the fd holder
    /// must be there to keep the instances meanwhile. From now on no action
    /// changes anything; the daemon execs the program once the API has
    /// answered ([`Registry::upgrade_to`]).
    fn upgrade(
        &self,
        entries: &mut Entries,
        req: UpgradeRequest,
    ) -> Result<UpgradeView, ActionError> {
        let err = ActionError::Upgrade;
        if self.holder.is_none() {
            return Err(err(
                "the daemon runs without the fd holder (--no-holder): its instances would stop"
                    .into(),
            ));
        }
        let exe = match req.exe {
            Some(e) => std::path::absolute(&e).unwrap_or(e),
            None => self.exe.clone().ok_or_else(|| {
                err("the daemon's own program file is not known; give --exe".into())
            })?,
        };
        let out = std::process::Command::new(&exe)
            .arg("--version")
            .output()
            .map_err(|e| err(format!("{} does not run: {e}", exe.display())))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || !version.starts_with("wdvirt ") {
            return Err(err(format!(
                "{} is not a wdvirt program (its --version said {version:?})",
                exe.display()
            )));
        }
        let running: Vec<&Running> = (entries.by_uuid.values())
            .filter_map(|e| e.running.as_ref())
            .collect();
        let view = UpgradeView {
            pid: std::process::id(),
            exe: exe.clone(),
            version,
            instances: running.len(),
            attached: running.iter().filter(|r| r.instance.attached()).count(),
        };
        entries.shutting_down = true;
        *self.upgrade.lock() = Some(exe);
        self.upgrade_asked.notify_one();
        Ok(view)
    }

    /// Waits until an upgrade is accepted.
    pub async fn upgrade_asked(&self) {
        self.upgrade_asked.notified().await
    }

    /// The program an accepted upgrade execs.
    pub fn upgrade_to(&self) -> Option<PathBuf> {
        self.upgrade.lock().clone()
    }

    /// How instance `u` starts: taken over if the holder keeps it, kept in
    /// the holder otherwise (or not kept at all without one).
    fn keep_plan(&self, u: Uuid, name: &str, config: &crate::vdev::wd::WdConfig) -> KeepPlan {
        let Some(link) = &self.holder else {
            return KeepPlan::None;
        };
        match adopt::take(link, u, config.queues, config.max_depth) {
            Ok(Some(taken)) => KeepPlan::Adopt(Box::new(taken)),
            Ok(None) => KeepPlan::Fresh {
                link: link.clone(),
                uuid: u,
            },
            Err(e) => {
                tracing::error!(
                    instance = %name,
                    "what the fd holder keeps of it cannot be taken over ({e}); starting it afresh, and a VMM it had loses its device"
                );
                let _ = link.drop_prefix(&format!("inst/{u}/"));
                KeepPlan::Fresh {
                    link: link.clone(),
                    uuid: u,
                }
            }
        }
    }

    /// Stops an instance without holding the registry's lock while its
    /// device drains (up to the 2 s reset budget): listings and other
    /// instances' actions go on meanwhile; the instance shows `stopping`.
    fn stop(&self, id: &str) -> Result<Outcome, ActionError> {
        let (u, name, running) = {
            let mut entries = self.entries.lock();
            if entries.shutting_down {
                return Err(ActionError::ShuttingDown);
            }
            let u = entries.find(id)?;
            let e = entries.by_uuid.get_mut(&u).expect("found above");
            let Some(running) = e.running.take() else {
                return Err(ActionError::WrongState {
                    name: e.def.name.clone(),
                    state: e.state().name(),
                    what: "only a started instance can be stopped".into(),
                });
            };
            e.stopping = true;
            (u, e.def.name.clone(), running)
        };
        self.stop_running(&name, running);
        let mut entries = self.entries.lock();
        let e = entries
            .by_uuid
            .get_mut(&u)
            .expect("a stopping instance stays defined");
        e.stopping = false;
        Ok(self.instance_outcome(&entries, u))
    }

    fn stop_running(&self, name: &str, running: Running) {
        if running.instance.attached() {
            tracing::warn!(instance = %name, "stopping with a VMM attached: its device goes away");
        }
        // The device is dropped (its queues drained) before the placement
        // goes back to the pools.
        running.instance.stop();
        self.catalog.release(running.placed.allocation);
        tracing::info!(instance = %name, "stopped");
    }

    /// Stops every running instance (daemon exit) and refuses changes from
    /// now on. Returns the names of instances that had a VMM attached.
    pub fn shutdown(&self) -> Vec<String> {
        let running: Vec<(String, Running)> = {
            let mut entries = self.entries.lock();
            entries.shutting_down = true;
            entries
                .by_uuid
                .values_mut()
                .filter_map(|e| Some((e.def.name.clone(), e.running.take()?)))
                .collect()
        };
        let attached = running
            .iter()
            .filter(|(_, r)| r.instance.attached())
            .map(|(n, _)| n.clone())
            .collect();
        // Side by side: each may wait out its drain budget. Where no thread
        // can be had, the stop runs here.
        std::thread::scope(|s| {
            for (name, r) in running {
                let slot = std::sync::Arc::new(parking_lot::Mutex::new(Some((name, r))));
                let theirs = slot.clone();
                let spawned = std::thread::Builder::new().spawn_scoped(s, move || {
                    if let Some((name, r)) = theirs.lock().take() {
                        self.stop_running(&name, r);
                    }
                });
                if spawned.is_err()
                    && let Some((name, r)) = slot.lock().take()
                {
                    self.stop_running(&name, r);
                }
            }
        });
        attached
    }

    /// The statistics of started instances: every one, one instance (which
    /// must be started), or those of one VM (which some definition must name).
    fn stats(
        &self,
        entries: &Entries,
        vm: Option<String>,
        instance: Option<String>,
    ) -> Result<StatsReport, ActionError> {
        if let Some(v) = &vm
            && !entries
                .by_uuid
                .values()
                .any(|e| e.def.vm.as_ref() == Some(v))
        {
            return Err(ActionError::NoSuchVm(v.clone()));
        }
        let only = match &instance {
            Some(id) => {
                let u = entries.find(id)?;
                let e = &entries.by_uuid[&u];
                if e.running.is_none() {
                    return Err(ActionError::WrongState {
                        name: e.def.name.clone(),
                        state: e.state().name(),
                        what: "an instance has statistics only while it is started".into(),
                    });
                }
                if let Some(v) = &vm
                    && e.def.vm.as_ref() != Some(v)
                {
                    return Err(ActionError::Invalid(format!(
                        "instance '{}' is not attached to VM '{v}'",
                        e.def.name
                    )));
                }
                Some(u)
            }
            None => None,
        };
        // Every started instance by PASID, to name the neighbours the
        // scheduler reports (it knows tenants only by PASID).
        let by_pasid: BTreeMap<u32, &Entry> = entries
            .by_uuid
            .values()
            .filter_map(|e| Some((e.running.as_ref()?.placed.pasid(), e)))
            .collect();
        // Each scheduler's lock once per report, not once per instance.
        let accounts = self.catalog.qos_accounts();
        let samples = entries
            .by_uuid
            .values()
            .filter(|e| only.is_none_or(|u| u == e.def.uuid))
            .filter(|e| vm.is_none() || e.def.vm == vm)
            .filter_map(|e| {
                let r = e.running.as_ref()?;
                let mut sample = r.instance.stats_sample(
                    e.def.uuid,
                    e.def.vm.clone(),
                    self.effective_qos(&e.def),
                );
                sample.scheduler = scheduler_stats(&accounts, &r.placed, &by_pasid);
                Some(sample)
            })
            .collect();
        let named: Vec<String> = vm.into_iter().collect();
        let mut report = StatsReport::build(samples, &named);
        report.process.vmm_fds = crate::transport::closer::totals();
        Ok(report)
    }

    fn view(&self, e: &Entry) -> InstanceView {
        let qos = self.effective_qos(&e.def);
        InstanceView {
            uuid: e.def.uuid,
            name: e.def.name.clone(),
            type_name: e.def.type_name.clone(),
            state: e.state(),
            auto: e.def.auto,
            numa: e.def.numa,
            qos,
            vm: e.def.vm.clone(),
            socket: e.running.as_ref().map(|r| r.instance.socket().to_owned()),
            socket_owner: e.running.as_ref().map(|r| r.socket_owner.name.clone()),
            owner: e.def.owner.clone(),
            pasid: e.running.as_ref().map(|r| r.placed.pasid()),
            placement: e
                .running
                .as_ref()
                .map(|r| r.placed.functions.clone())
                .unwrap_or_default(),
            report: e.running.as_ref().map(|r| r.instance.report()),
        }
    }
}

/// What the QoS schedulers of the instance's accelerators report for
/// it, summed over them; the entitlement when it uses one accelerator.
fn scheduler_stats(
    accounts: &QosAccounts,
    placed: &Placed,
    by_pasid: &BTreeMap<u32, &Entry>,
) -> Option<SchedulerStats> {
    let snaps = accounts.of(placed);
    let mut out = SchedulerStats::default();
    let mut held: BTreeMap<u32, u64> = BTreeMap::new();
    for (t, _) in &snaps {
        out.engine_ns += t.engine_ns;
        out.throttled.add(&Throttled {
            rate_ns: t.throttled_ns.rate,
            cap_ns: t.throttled_ns.cap,
            share_ns: t.throttled_ns.share,
        });
        for i in &t.interference {
            *held.entry(i.neighbour_pasid).or_default() += i.engine_ns;
        }
    }
    if let [(_, share)] = snaps.as_slice() {
        out.entitlement = *share;
    }
    // A neighbour stopped since is no longer named (its PASID may be
    // someone else's by now).
    out.interference = held
        .into_iter()
        .filter_map(|(pasid, held_ns)| {
            let n = by_pasid.get(&pasid)?;
            Some(Interference {
                neighbour: n.def.uuid,
                neighbour_name: n.def.name.clone(),
                neighbour_vm: n.def.vm.clone(),
                held_ns,
            })
        })
        .collect();
    out.interference
        .sort_by_key(|i| std::cmp::Reverse(i.held_ns));
    (!snaps.is_empty()).then_some(out)
}
