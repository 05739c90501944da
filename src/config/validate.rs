//! From the parsed files to a `Config`: names resolved, ranges checked,
//! duplicates found across files, and every type checked against the
//! accelerators that could ever host it. Errors are collected, not returned at
//! the first, so an operator fixes a file in one pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_saphyr::{Location, Spanned};

use super::error::{ConfigError, Located, Note, Place};
use super::model::*;
use super::raw::*;

/// A parsed file and its text (for the offending line in errors).
pub(crate) struct Parsed {
    pub name: String,
    pub text: String,
    pub raw: RawFile,
}

/// The text of 1-based `line` of `text`, counting lines as YAML does: `\n`,
/// `\r\n` and a lone `\r` each end one.
pub(crate) fn line_of(text: &str, line: u32) -> String {
    if line == 0 {
        return String::new();
    }
    text.split('\n')
        .flat_map(|l| {
            let l = l.strip_suffix('\r').unwrap_or(l);
            l.split('\r')
        })
        .nth(line as usize - 1)
        .unwrap_or_default()
        .to_string()
}

/// Names defined so far, in definition order, with where each was written.
#[derive(Default)]
pub(super) struct Names {
    places: HashMap<String, Place>,
    order: Vec<String>,
}

impl Names {
    pub(super) fn get(&self, name: &str) -> Option<&Place> {
        self.places.get(name)
    }
    pub(super) fn contains(&self, name: &str) -> bool {
        self.places.contains_key(name)
    }
    fn insert(&mut self, name: &str, place: Place) {
        self.places.insert(name.to_string(), place);
        self.order.push(name.to_string());
    }
    /// For "(defined: ...)" in messages.
    pub(super) fn list(&self) -> String {
        defined(self.order.iter().cloned())
    }
}

pub(super) struct Ctx<'a> {
    files: &'a [Parsed],
    /// What discovery found on the host, which the files may name too.
    host: &'a HostNames,
    pub(super) errors: Vec<Located>,
    nodes: BTreeMap<u32, Place>,
    pub(super) accels: Names,
    pub(super) policies: Names,
}

impl Ctx<'_> {
    fn node_list(&self) -> String {
        let mut ids: BTreeSet<u32> = self.nodes.keys().copied().collect();
        ids.extend(self.host.numa_nodes.iter().copied());
        defined(ids.into_iter().map(|k| k.to_string()))
    }
    /// A NUMA node the files define or the host has.
    fn has_node(&self, id: u32) -> bool {
        self.nodes.contains_key(&id) || self.host.numa_nodes.contains(&id)
    }
    /// An accelerator the files define or the host has.
    pub(super) fn has_accel(&self, name: &str) -> bool {
        self.accels.contains(name) || self.host.accelerators.iter().any(|a| a == name)
    }
    /// Accelerators for "(defined: ...)" in messages.
    pub(super) fn accel_list(&self) -> String {
        let mut list = self.accels.list();
        let extra: Vec<&str> = self
            .host
            .accelerators
            .iter()
            .filter(|a| !self.accels.contains(a))
            .map(String::as_str)
            .collect();
        if !extra.is_empty() {
            list = format!("{list}; found on this host: {}", extra.join(", "));
        }
        list
    }
    /// `v` if it names a defined NUMA node.
    pub(super) fn node(&mut self, file: usize, v: &Spanned<u32>) -> Option<u32> {
        if self.has_node(v.value) {
            Some(v.value)
        } else {
            let defined = self.node_list();
            self.err(
                file,
                v.referenced,
                ConfigError::UnknownNumaNode {
                    id: v.value,
                    defined,
                },
            );
            None
        }
    }
    /// A user or group as `daemon:` names it: a number, or a name of the
    /// shape Linux accounts have (resolved later, on the daemon's host).
    fn account(
        &mut self,
        file: usize,
        v: &Option<Spanned<String>>,
        what: &'static str,
    ) -> Option<String> {
        let v = v.as_ref()?;
        let s = &v.value;
        if super::is_account_name(s) {
            return Some(s.clone());
        }
        self.err(
            file,
            v.referenced,
            ConfigError::BadAccount {
                what,
                name: super::error::printable(s),
            },
        );
        None
    }
    pub(super) fn place(&self, file: usize, loc: Location) -> Place {
        Place {
            file: self.files[file].name.clone(),
            line: loc.line() as u32,
            column: loc.column() as u32,
        }
    }
    pub(super) fn err(&mut self, file: usize, loc: Location, error: ConfigError) {
        let place = self.place(file, loc);
        let source_line = line_of(&self.files[file].text, place.line);
        self.errors.push(Located {
            place,
            source_line,
            error,
            note: None,
        });
    }
    fn duplicate(
        &mut self,
        file: usize,
        loc: Location,
        what: &'static str,
        name: String,
        first: &Place,
    ) {
        let first_text = self
            .files
            .iter()
            .find(|f| f.name == first.file)
            .map(|f| line_of(&f.text, first.line))
            .unwrap_or_default();
        self.err(
            file,
            loc,
            ConfigError::Duplicate {
                what,
                name,
                first: first.to_string(),
            },
        );
        if let Some(last) = self.errors.last_mut() {
            last.note = Some(Box::new(Note {
                place: first.clone(),
                source_line: first_text,
                message: "first defined here".into(),
            }));
        }
    }
    /// `v` if it lies in `lo..=hi`, else an error at its place.
    pub(super) fn range<T: Copy + Into<u64>>(
        &mut self,
        file: usize,
        v: &Spanned<T>,
        what: &'static str,
        lo: u64,
        hi: u64,
        expected: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Option<T> {
        let x: u64 = v.value.into();
        if (lo..=hi).contains(&x) {
            Some(v.value)
        } else {
            self.err(
                file,
                v.referenced,
                ConfigError::OutOfRange {
                    what,
                    value: x,
                    expected: expected.into(),
                },
            );
            None
        }
    }
    fn name(&mut self, file: usize, n: &Spanned<String>, what: &'static str) -> bool {
        let s = &n.value;
        let ok = valid_name(s);
        if !ok {
            self.err(
                file,
                n.referenced,
                ConfigError::BadName {
                    what,
                    name: s.clone(),
                },
            );
        }
        ok
    }
    pub(super) fn ops(&mut self, file: usize, list: &Spanned<Vec<Spanned<String>>>) -> Option<u32> {
        if list.value.is_empty() {
            self.err(file, list.referenced, ConfigError::NoOperations);
            return None;
        }
        let mut mask = 0u32;
        let mut ok = true;
        for item in &list.value {
            if item.value == "all" {
                if list.value.len() > 1 {
                    self.err(file, item.referenced, ConfigError::AllWithOthers);
                    ok = false;
                }
                mask = wdvirt_abi::ALL_OPS;
            } else if let Some(op) = wdvirt_abi::Opcode::from_name(&item.value) {
                mask |= op.bit();
            } else {
                let known: Vec<_> = wdvirt_abi::Opcode::ALL.iter().map(|o| o.name()).collect();
                self.err(
                    file,
                    item.referenced,
                    ConfigError::UnknownOperation {
                        name: item.value.clone(),
                        known: known.join(", "),
                    },
                );
                ok = false;
            }
        }
        ok.then_some(mask)
    }
    fn cpus(&mut self, file: usize, list: &Option<Spanned<String>>) -> Vec<u32> {
        let Some(list) = list else { return Vec::new() };
        match parse_cpu_list(&list.value) {
            Ok(v) => v,
            Err(why) => {
                self.err(
                    file,
                    list.referenced,
                    ConfigError::BadCpuList {
                        list: list.value.clone(),
                        why,
                    },
                );
                Vec::new()
            }
        }
    }
}

/// Highest CPU number accepted in a cpu list (Linux's NR_CPUS is at most 8192).
pub const MAX_CPU: u32 = 8191;
/// Highest NUMA node id accepted (Linux's MAX_NUMNODES is 1024 at most).
pub const MAX_NODE: u32 = 1023;
/// Most engine threads one accelerator runs.
pub const MAX_ENGINES: u32 = 64;

/// The rule for every name (accelerators, types, policies): 1 to 63 of
/// `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether `s` can name an accelerator: a [`valid_name`] that is not a NUMA
/// node's `nodeN`. Discovery skips devices named otherwise.
pub fn accelerator_name_ok(s: &str) -> bool {
    valid_name(s) && node_ref(s).is_none()
}

/// Linux cpu-list syntax: `0-3,8,10-11` (ranges inclusive). Sorted, deduplicated.
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>, String> {
    let mut set = BTreeSet::new();
    let num = |t: &str| -> Result<u32, String> {
        let t = t.trim();
        let v: u32 = t
            .parse()
            .map_err(|_| format!("'{t}' is not a cpu number"))?;
        if v > MAX_CPU {
            return Err(format!("cpu {v} is above {MAX_CPU}"));
        }
        Ok(v)
    };
    for part in s.split(',') {
        if part.trim().is_empty() {
            return Err("empty item".into());
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {a}-{b} runs backwards"));
                }
                set.extend(a..=b);
            }
            None => {
                set.insert(num(part)?);
            }
        }
    }
    Ok(set.into_iter().collect())
}

fn defined<I: IntoIterator<Item = String>>(names: I) -> String {
    let v: Vec<String> = names.into_iter().collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// `nodeN` → N.
pub fn node_ref(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("node")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Names that discovery found on the host (`docs/topology.md`): the files
/// may link to these accelerators, list them in a type's allow-list and
/// name these NUMA nodes, without declaring them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNames {
    pub accelerators: Vec<String>,
    pub numa_nodes: Vec<u32>,
}

pub(crate) fn validate(files: &[Parsed], host: &HostNames) -> Result<Config, Vec<Located>> {
    let mut cx = Ctx {
        files,
        host,
        errors: Vec::new(),
        nodes: BTreeMap::new(),
        accels: Names::default(),
        policies: Names::default(),
    };
    let mut cfg = Config::default();

    // NUMA nodes first: everything else may name them.
    for (fi, f) in files.iter().enumerate() {
        for n in &f.raw.numa_nodes {
            let Some(id) = cx.range(fi, &n.id, "NUMA node id", 0, MAX_NODE.into(), "0..=1023")
            else {
                continue;
            };
            if let Some(first) = cx.nodes.get(&id) {
                let first = first.clone();
                cx.duplicate(fi, n.id.referenced, "NUMA node", id.to_string(), &first);
                continue;
            }
            let place = cx.place(fi, n.id.referenced);
            cx.nodes.insert(id, place);
        }
    }
    let mut seen_nodes = BTreeSet::new();
    // Each ordered pair's distance, to hold the two rows of a pair to one
    // value (the host graph has one edge per pair).
    let mut pair_distance: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    for (fi, f) in files.iter().enumerate() {
        for n in &f.raw.numa_nodes {
            let id = n.id.value;
            if !cx.nodes.contains_key(&id) || !seen_nodes.insert(id) {
                continue;
            }
            let cpus = cx.cpus(fi, &n.cpus);
            let mut distances = BTreeMap::new();
            for (&to, d) in &n.distances {
                let d = cx.range(fi, d, "distance", 1, 255, "1..=255");
                if !cx.has_node(to) {
                    let defined = cx.node_list();
                    cx.err(
                        fi,
                        n.distances[&to].referenced,
                        ConfigError::UnknownNumaNode { id: to, defined },
                    );
                } else if let Some(d) = d {
                    match pair_distance.get(&(to, id)) {
                        Some(&there) if there != d && to != id => cx.err(
                            fi,
                            n.distances[&to].referenced,
                            ConfigError::AsymmetricDistance {
                                a: id,
                                b: to,
                                here: d,
                                there,
                            },
                        ),
                        _ => {
                            pair_distance.insert((id, to), d);
                            distances.insert(to, d);
                        }
                    }
                }
            }
            cfg.numa_nodes.push(NumaNode {
                id,
                cpus,
                distances,
                origin: cx.nodes[&id].clone(),
            });
        }
    }
    // Accelerators: names first (links may point forward).
    for (fi, f) in files.iter().enumerate() {
        for a in &f.raw.accelerators {
            if !cx.name(fi, &a.name, "accelerator") {
                continue;
            }
            if node_ref(&a.name.value).is_some() {
                cx.err(
                    fi,
                    a.name.referenced,
                    ConfigError::ReservedName {
                        name: a.name.value.clone(),
                    },
                );
                continue;
            }
            if let Some(first) = cx.accels.get(&a.name.value) {
                let first = first.clone();
                cx.duplicate(
                    fi,
                    a.name.referenced,
                    "accelerator",
                    a.name.value.clone(),
                    &first,
                );
                continue;
            }
            let place = cx.place(fi, a.name.referenced);
            cx.accels.insert(&a.name.value, place);
        }
    }
    let errors_before_accels = cx.errors.len();
    // Every edge an accelerator declares (its `numa_node` and its links),
    // unordered: the host graph has one edge per pair.
    let mut edges: BTreeSet<(String, String)> = BTreeSet::new();
    let mut new_edge = |a: &str, b: &str| {
        let key = if a < b { (a, b) } else { (b, a) };
        edges.insert((key.0.to_string(), key.1.to_string()))
    };
    for (fi, f) in files.iter().enumerate() {
        for a in &f.raw.accelerators {
            let name = &a.name.value;
            let origin = match cx.accels.get(name).cloned() {
                Some(p) if p == cx.place(fi, a.name.referenced) => p,
                _ => continue, // bad name or duplicate: already reported
            };
            let backend = Backend::from_name(&a.backend.value);
            if backend.is_none() {
                cx.err(
                    fi,
                    a.backend.referenced,
                    ConfigError::UnknownBackend(a.backend.value.clone()),
                );
            }
            let engines = cx.range(fi, &a.engines, "engines", 1, MAX_ENGINES.into(), "1..=64");
            let queue_pairs = cx.range(fi, &a.queue_pairs, "queue_pairs", 1, 4096, "1..=4096");
            let ops = cx.ops(fi, &a.operations);
            let pasids = cx.range(fi, &a.pasids, "pasids", 1, (1 << 20) - 1, "1..=1048575");
            let numa_node = a.numa_node.as_ref().map(|n| cx.node(fi, n));
            if let Some(Some(n)) = numa_node {
                new_edge(name, &format!("node{n}"));
            }
            let cpus = cx.cpus(fi, &a.cpus);
            let mut links = Vec::new();
            for l in &a.links {
                let distance = cx.range(fi, &l.distance, "distance", 1, 255, "1..=255");
                let to = if l.to.value == *name {
                    cx.err(fi, l.to.referenced, ConfigError::SelfLink);
                    None
                } else if cx.has_accel(&l.to.value) {
                    Some(Endpoint::Accelerator(l.to.value.clone()))
                } else if let Some(id) = node_ref(&l.to.value) {
                    let s = Spanned {
                        value: id,
                        referenced: l.to.referenced,
                        defined: l.to.defined,
                    };
                    cx.node(fi, &s).map(Endpoint::NumaNode)
                } else {
                    let defined = format!(
                        "{}; NUMA nodes as nodeN: {}",
                        cx.accel_list(),
                        cx.node_list()
                    );
                    cx.err(
                        fi,
                        l.to.referenced,
                        ConfigError::UnknownAccelerator {
                            name: l.to.value.clone(),
                            defined,
                        },
                    );
                    None
                };
                if let (Some(to), Some(distance)) = (to, distance) {
                    let other = match &to {
                        Endpoint::Accelerator(x) => x.clone(),
                        Endpoint::NumaNode(x) => format!("node{x}"),
                    };
                    if new_edge(name, &other) {
                        links.push(Link { to, distance });
                    } else {
                        cx.err(
                            fi,
                            l.to.referenced,
                            ConfigError::DuplicateLink {
                                a: name.clone(),
                                b: other,
                            },
                        );
                    }
                }
            }
            if let (
                Some(backend),
                Some(engines),
                Some(queue_pairs),
                Some(ops),
                Some(pasids),
                Some(numa_node),
            ) = (
                backend,
                engines,
                queue_pairs,
                ops,
                pasids,
                numa_node.map_or(Some(None), |n| n.map(Some)),
            ) {
                cfg.accelerators.push(Accelerator {
                    name: name.clone(),
                    backend,
                    engines,
                    queue_pairs,
                    ops,
                    pasids,
                    numa_node,
                    cpus,
                    links,
                    origin,
                });
            }
        }
    }
    let accels_sound = cx.errors.len() == errors_before_accels;
    // With no software accelerator declared, the daemon uses the ones
    // discovery finds: the merged graph is checked then
    // (`daemon::catalog::check_placeable`), not the YAML alone.
    let declares_soft = cfg.accelerators.iter().any(|a| a.backend == Backend::Soft);

    // QoS policies.
    for (fi, f) in files.iter().enumerate() {
        for p in &f.raw.qos_policies {
            if !cx.name(fi, &p.name, "QoS policy") {
                continue;
            }
            if let Some(first) = cx.policies.get(&p.name.value) {
                let first = first.clone();
                cx.duplicate(
                    fi,
                    p.name.referenced,
                    "QoS policy",
                    p.name.value.clone(),
                    &first,
                );
                continue;
            }
            let origin = cx.place(fi, p.name.referenced);
            cx.policies.insert(&p.name.value, origin.clone());
            let weight = cx.range(fi, &p.weight, "weight", 1, 10_000, "1..=10000");
            let max_in_flight = match &p.max_in_flight {
                None => Some(None),
                Some(m) => cx
                    .range(fi, m, "max_in_flight", 1, 65_536, "1..=65536")
                    .map(Some),
            };
            let mut rate = RateLimit::default();
            let mut rate_ok = true;
            if let Some(r) = &p.rate {
                let mut one = |cx: &mut Ctx, v: &Option<Spanned<u64>>, what: &'static str| match v {
                    None => None,
                    Some(v) => {
                        let r = cx.range(fi, v, what, 1, u64::MAX, "at least 1");
                        rate_ok &= r.is_some();
                        r
                    }
                };
                rate.jobs_per_sec = one(&mut cx, &r.jobs_per_sec, "jobs_per_sec");
                rate.bytes_per_sec = one(&mut cx, &r.bytes_per_sec, "bytes_per_sec");
                rate.burst_jobs = one(&mut cx, &r.burst_jobs, "burst_jobs");
                rate.burst_bytes = one(&mut cx, &r.burst_bytes, "burst_bytes");
                if let (Some(b), None) = (&r.burst_jobs, &r.jobs_per_sec) {
                    cx.err(
                        fi,
                        b.referenced,
                        ConfigError::Needs {
                            field: "burst_jobs",
                            needs: "jobs_per_sec (a burst above which rate?)",
                        },
                    );
                    rate_ok = false;
                }
                if let (Some(b), None) = (&r.burst_bytes, &r.bytes_per_sec) {
                    cx.err(
                        fi,
                        b.referenced,
                        ConfigError::Needs {
                            field: "burst_bytes",
                            needs: "bytes_per_sec (a burst above which rate?)",
                        },
                    );
                    rate_ok = false;
                }
            }
            let priorities: Vec<Option<u32>> = p
                .queue_priorities
                .iter()
                .flatten()
                .map(|q| cx.range(fi, q, "queue_priorities", 0, 7, "0..=7"))
                .collect();
            let queue_priorities: Option<Vec<u8>> =
                priorities.into_iter().map(|q| q.map(|q| q as u8)).collect();
            if let (Some(weight), Some(max_in_flight), true, Some(queue_priorities)) =
                (weight, max_in_flight, rate_ok, queue_priorities)
            {
                cfg.qos_policies.push(QosPolicy {
                    name: p.name.value.clone(),
                    weight,
                    rate,
                    max_in_flight,
                    queue_priorities,
                    origin,
                });
            }
        }
    }

    // Instance types.
    let mut type_names: HashMap<String, Place> = HashMap::new();
    for (fi, f) in files.iter().enumerate() {
        for t in &f.raw.types {
            if !cx.name(fi, &t.name, "type") {
                continue;
            }
            if let Some(first) = type_names.get(&t.name.value) {
                let first = first.clone();
                cx.duplicate(fi, t.name.referenced, "type", t.name.value.clone(), &first);
                continue;
            }
            let origin = cx.place(fi, t.name.referenced);
            type_names.insert(t.name.value.clone(), origin.clone());
            let errors_before = cx.errors.len();
            let name = t.name.value.clone();
            if let Some(t) = super::types::check_type(&mut cx, fi, t, origin) {
                let (ty, places) = t;
                if accels_sound && declares_soft && cx.errors.len() == errors_before {
                    super::types::check_hostable(&mut cx, fi, &ty, &places, &cfg.accelerators);
                }
                if cx.errors.len() == errors_before {
                    cfg.types.push(ty);
                }
            } else {
                debug_assert!(
                    cx.errors.len() > errors_before,
                    "type {name} refused silently"
                );
            }
        }
    }

    // The daemon's own settings: one file says them.
    let mut daemon_at: Option<Place> = None;
    for (fi, f) in files.iter().enumerate() {
        let Some(d) = &f.raw.daemon else {
            continue;
        };
        if let Some(first) = &daemon_at {
            let first = first.clone();
            cx.duplicate(fi, d.referenced, "section", "daemon".into(), &first);
            continue;
        }
        daemon_at = Some(cx.place(fi, d.referenced));
        cfg.daemon.api_group = cx.account(fi, &d.value.api_group, "api_group");
        cfg.daemon.instance_owner = cx.account(fi, &d.value.instance_owner, "instance_owner");
        if let Some(l) = &d.value.limits {
            cfg.daemon.limits = daemon_limits(&mut cx, fi, &l.value);
        }
    }

    if cx.errors.is_empty() {
        Ok(cfg)
    } else {
        // In reading order: files as given, then line and column.
        let rank = |e: &Located| {
            let file = files.iter().position(|f| f.name == e.place.file);
            (file, e.place.line, e.place.column)
        };
        cx.errors.sort_by_key(rank);
        Err(cx.errors)
    }
}

/// `daemon: limits:`, each value inside the range `transport::Limits`
/// allows (`wdvirt serve` refuses the same values on its command line).
fn daemon_limits(cx: &mut Ctx, fi: usize, l: &RawLimits) -> DaemonLimits {
    use crate::transport::Limits as L;
    fn ends<T: Copy + Into<u64>>(r: std::ops::RangeInclusive<T>) -> (u64, u64) {
        ((*r.start()).into(), (*r.end()).into())
    }
    let usize_ends = |r: std::ops::RangeInclusive<usize>| (*r.start() as u64, *r.end() as u64);
    let (size_lo, size_hi) = ends(L::MESSAGE_SIZE_RANGE);
    let (fds_lo, fds_hi) = usize_ends(L::MSG_FDS_RANGE);
    let (maps_lo, maps_hi) = usize_ends(L::DMA_MAPS_RANGE);
    let (ms_lo, ms_hi) = ends(L::MESSAGE_TIMEOUT_MS_RANGE);
    DaemonLimits {
        max_message_size: l.max_message_size.as_ref().and_then(|v| {
            cx.range(
                fi,
                v,
                "max_message_size",
                size_lo,
                size_hi,
                format!("{size_lo} to {size_hi} bytes"),
            )
        }),
        max_msg_fds: l
            .max_msg_fds
            .as_ref()
            .and_then(|v| {
                cx.range(
                    fi,
                    v,
                    "max_msg_fds",
                    fds_lo,
                    fds_hi,
                    format!("{fds_lo} to {fds_hi}"),
                )
            })
            .map(|v| v as usize),
        max_dma_maps: l
            .max_dma_maps
            .as_ref()
            .and_then(|v| {
                let expected = format!("{maps_lo} to {maps_hi}");
                cx.range(fi, v, "max_dma_maps", maps_lo, maps_hi, expected)
            })
            .map(|v| v as usize),
        message_timeout_ms: l.message_timeout_ms.as_ref().and_then(|v| {
            cx.range(
                fi,
                v,
                "message_timeout_ms",
                ms_lo,
                ms_hi,
                format!("{ms_lo} to {ms_hi} milliseconds"),
            )
        }),
        log_lines_per_sec: l.log_lines_per_sec.as_ref().map(|v| v.value),
    }
}
