//! Instance management in the manner of `mdevctl`: `types`, `define`,
//! `undefine`, `start`, `stop`, `modify`, `list`. Each command is one API
//! call to the daemon; `--json` prints the daemon's answer as it came.

use clap::Args;
use uuid::Uuid;

use super::client::ApiClient;
use crate::daemon::action::{Action, DefineRequest, ModifyRequest};
use crate::daemon::view::{AcceleratorView, InstanceView, TypeView, Usage};

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TypesArgs {
    #[command(flatten)]
    pub out: JsonFlag,
}

#[derive(Args, Debug)]
pub struct AcceleratorsArgs {
    #[command(flatten)]
    pub out: JsonFlag,
}

#[derive(Args, Debug)]
pub struct DefineArgs {
    /// The instance type (`wdvirt types` lists them).
    #[arg(long = "type", short = 't', value_name = "TYPE")]
    pub type_name: String,
    /// Instance name (also its socket's file name); default TYPE-N.
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// The instance's UUID; default a random one.
    #[arg(long, short = 'u')]
    pub uuid: Option<Uuid>,
    /// Start it whenever the daemon starts.
    #[arg(long, short = 'a')]
    pub auto: bool,
    /// Place it near this NUMA node (the VM's).
    #[arg(long, value_name = "NODE")]
    pub numa: Option<u32>,
    /// A QoS policy overriding the type's.
    #[arg(long, value_name = "POLICY")]
    pub qos: Option<String>,
    /// The VM the instance is for (the libvirt hook sets the domain's name).
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// The user the VMM runs as (a name or a uid). The instance's socket is
    /// created mode 0600 and owned by this user, so only it (and root) can
    /// connect. Default: the daemon's --instance-owner, else the daemon's
    /// own user.
    #[arg(long, value_name = "USER|UID")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub out: JsonFlag,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// The instance's name or UUID.
    #[arg(value_name = "NAME|UUID")]
    pub id: String,
    #[command(flatten)]
    pub out: JsonFlag,
}

#[derive(Args, Debug)]
pub struct ModifyArgs {
    /// The instance's name or UUID.
    #[arg(value_name = "NAME|UUID")]
    pub id: String,
    /// Start with the daemon.
    #[arg(long, conflicts_with = "manual")]
    pub auto: bool,
    /// Do not start with the daemon.
    #[arg(long)]
    pub manual: bool,
    /// Change the type (a stopped instance only).
    #[arg(long = "type", value_name = "TYPE")]
    pub type_name: Option<String>,
    /// Place near this NUMA node from the next start.
    #[arg(long, value_name = "NODE", conflicts_with = "no_numa")]
    pub numa: Option<u32>,
    /// Drop the NUMA hint.
    #[arg(long)]
    pub no_numa: bool,
    /// Use this QoS policy instead of the type's.
    #[arg(long, value_name = "POLICY", conflicts_with = "type_qos")]
    pub qos: Option<String>,
    /// Go back to the type's QoS policy.
    #[arg(long)]
    pub type_qos: bool,
    /// The VM using the instance.
    #[arg(long, value_name = "NAME", conflicts_with = "no_vm")]
    pub vm: Option<String>,
    /// The instance is no VM's.
    #[arg(long)]
    pub no_vm: bool,
    /// The user its VMM runs as (a name or a uid), from the next start: the
    /// socket is 0600 and owned by this user.
    #[arg(long, value_name = "USER|UID", conflicts_with = "default_owner")]
    pub owner: Option<String>,
    /// Its socket is owned by the daemon's --instance-owner again.
    #[arg(long)]
    pub default_owner: bool,
    #[command(flatten)]
    pub out: JsonFlag,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Every defined instance, started or not (default: started ones).
    #[arg(long, short = 'd')]
    pub defined: bool,
    #[command(flatten)]
    pub out: JsonFlag,
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn types(api: &ApiClient, a: TypesArgs) -> anyhow::Result<()> {
    let types: Vec<TypeView> = api.act(&Action::ListTypes)?;
    if a.out.json {
        return print_json(&types);
    }
    let mut rows = vec![[
        "TYPE".to_string(),
        "QUEUES".into(),
        "DEPTH".into(),
        "QOS".into(),
        "AVAILABLE".into(),
        "OPERATIONS".into(),
    ]];
    for t in &types {
        let ops = t
            .functions
            .iter()
            .map(|f| format!("{}q: {}", f.queues, f.operations.join(",")))
            .collect::<Vec<_>>()
            .join(" + ");
        let by: Vec<_> = t
            .available_by_accelerator
            .iter()
            .map(|(a, n)| format!("{a}:{n}"))
            .collect();
        rows.push([
            t.name.clone(),
            t.queues.to_string(),
            t.max_depth.to_string(),
            t.qos.clone(),
            if by.is_empty() {
                t.available_instances.to_string()
            } else {
                format!("{} ({})", t.available_instances, by.join(" "))
            },
            ops,
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// `used/total` with a bar: `#` used, `~` draining, `.` free.
fn usage_bar(u: &Usage) -> String {
    const WIDTH: u64 = 20;
    let total = u64::from(u.total.max(1));
    let cells = |n: u32| (u64::from(n) * WIDTH).div_ceil(total) as usize;
    let (used, draining) = (cells(u.used), cells(u.draining));
    let free = (WIDTH as usize).saturating_sub(used + draining);
    format!(
        "[{}{}{}] {}/{}",
        "#".repeat(used),
        "~".repeat(draining),
        ".".repeat(free),
        u.used,
        u.total
    )
}

pub fn accelerators(api: &ApiClient, a: AcceleratorsArgs) -> anyhow::Result<()> {
    let accels: Vec<AcceleratorView> = api.act(&Action::ListAccelerators)?;
    if a.out.json {
        return print_json(&accels);
    }
    let mut rows = vec![[
        "ACCELERATOR".to_string(),
        "BACKEND".into(),
        "ENGINES".into(),
        "QUEUE PAIRS".into(),
        "PASIDS".into(),
        "OPERATIONS".into(),
    ]];
    for x in &accels {
        rows.push([
            x.name.clone(),
            x.backend.clone(),
            x.engines.to_string(),
            usage_bar(&x.queue_pairs),
            usage_bar(&x.pasids),
            x.operations.join(","),
        ]);
    }
    print_table(&rows);
    // The host graph as a distance table: shortest paths between every
    // accelerator and every node it reaches (- where none).
    let mut columns: Vec<String> = accels
        .iter()
        .flat_map(|x| x.distances.keys().cloned())
        .chain(accels.iter().map(|x| x.name.clone()))
        .collect();
    columns.sort_by_key(|c| (!c.starts_with("node"), c.clone()));
    columns.dedup();
    if columns.len() > 1 {
        println!();
        let mut header = vec!["DISTANCE".to_string()];
        header.extend(columns.iter().cloned());
        let mut table = vec![header];
        for x in &accels {
            let mut row = vec![x.name.clone()];
            row.extend(columns.iter().map(|c| {
                if *c == x.name {
                    "0".to_string()
                } else {
                    x.distances.get(c).map_or("-".into(), |d| d.to_string())
                }
            }));
            table.push(row);
        }
        print_rows(&table);
    }
    Ok(())
}

pub fn define(api: &ApiClient, a: DefineArgs) -> anyhow::Result<()> {
    let req = DefineRequest {
        type_name: a.type_name,
        name: a.name,
        uuid: a.uuid,
        auto: a.auto,
        numa: a.numa,
        qos: a.qos,
        vm: a.vm,
        owner: a.owner,
    };
    let v: InstanceView = api.act(&Action::Define(req))?;
    if a.out.json {
        return print_json(&v);
    }
    // Like mdevctl: the UUID alone, so `U=$(wdvirt define ...)` works.
    println!("{}", v.uuid);
    eprintln!("wdvirt: defined {} ({})", v.name, v.type_name);
    Ok(())
}

pub fn undefine(api: &ApiClient, a: IdArgs) -> anyhow::Result<()> {
    let v: InstanceView = api.act(&Action::Undefine { id: a.id })?;
    if a.out.json {
        return print_json(&v);
    }
    eprintln!("wdvirt: undefined {} ({})", v.name, v.uuid);
    Ok(())
}

pub fn start(api: &ApiClient, a: IdArgs) -> anyhow::Result<()> {
    let v: InstanceView = api.act(&Action::Start { id: a.id })?;
    if a.out.json {
        return print_json(&v);
    }
    // The socket path alone on stdout: what a VMM is pointed at.
    if let Some(s) = &v.socket {
        println!("{}", s.display());
    }
    eprintln!(
        "wdvirt: started {} (PASID {}) on {}",
        v.name,
        v.pasid.map_or("-".into(), |p| p.to_string()),
        v.placement
            .iter()
            .map(|p| p.accelerator.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    Ok(())
}

pub fn stop(api: &ApiClient, a: IdArgs) -> anyhow::Result<()> {
    let v: InstanceView = api.act(&Action::Stop { id: a.id })?;
    if a.out.json {
        return print_json(&v);
    }
    eprintln!("wdvirt: stopped {}", v.name);
    Ok(())
}

pub fn modify(api: &ApiClient, a: ModifyArgs) -> anyhow::Result<()> {
    let changes = ModifyRequest {
        auto: if a.auto {
            Some(true)
        } else if a.manual {
            Some(false)
        } else {
            None
        },
        type_name: a.type_name,
        numa: if a.no_numa {
            Some(None)
        } else {
            a.numa.map(Some)
        },
        qos: if a.type_qos {
            Some(None)
        } else {
            a.qos.map(Some)
        },
        vm: if a.no_vm { Some(None) } else { a.vm.map(Some) },
        owner: if a.default_owner {
            Some(None)
        } else {
            a.owner.map(Some)
        },
    };
    if changes == ModifyRequest::default() {
        anyhow::bail!(
            "nothing to change: give --auto/--manual, --type, --numa/--no-numa, --qos/--type-qos, --vm/--no-vm or --owner/--default-owner"
        );
    }
    let v: InstanceView = api.act(&Action::Modify { id: a.id, changes })?;
    if a.out.json {
        return print_json(&v);
    }
    eprintln!("wdvirt: modified {}", v.name);
    Ok(())
}

pub fn list(api: &ApiClient, a: ListArgs) -> anyhow::Result<()> {
    let list: Vec<InstanceView> = api.act(&Action::ListInstances { defined: a.defined })?;
    if a.out.json {
        return print_json(&list);
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "UUID".into(),
        "TYPE".into(),
        "STATE".into(),
        "AUTO".into(),
        "PASID".into(),
        "JOBS".into(),
        "FAILED".into(),
        "LIMITS".into(),
        "SOCKET".into(),
    ]];
    for v in &list {
        let total = v.report.as_ref().map(|r| {
            let mut t = crate::stats::QueueSnapshot::default();
            r.queues.iter().for_each(|q| t.add(q));
            t
        });
        let jobs = |f: fn(&crate::stats::QueueSnapshot) -> u64| {
            total.as_ref().map_or("-".to_string(), |t| f(t).to_string())
        };
        rows.push([
            v.name.clone(),
            v.uuid.to_string(),
            v.type_name.clone(),
            v.state.name().into(),
            if v.auto { "auto" } else { "manual" }.into(),
            v.pasid.map_or("-".into(), |p| p.to_string()),
            jobs(|q| q.jobs_ok),
            jobs(|q| q.jobs_failed),
            v.report.as_ref().map_or("-".into(), limit_hits),
            v.socket
                .as_ref()
                .map_or("-".into(), |s| s.display().to_string()),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// The limits an instance's VMMs ran into, summed over every connection
/// (`docs/security.md`, "Limits"): `stalled=1,fds=253`, or `0`.
fn limit_hits(r: &crate::daemon::instance::InstanceReport) -> String {
    let t = &r.transport_totals;
    let hits = [
        ("frames", t.bad_frames),
        ("fds", t.fds_refused),
        ("stalled", t.stalled),
        ("conns", r.refused_connections),
        ("logs", r.log_lines_suppressed),
        ("panics", t.panics),
    ];
    let shown: Vec<String> = hits
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what}={n}"))
        .collect();
    if shown.is_empty() {
        "0".into()
    } else {
        shown.join(",")
    }
}

/// Left-aligned columns, two spaces apart; the last column unpadded.
fn print_table<const N: usize>(rows: &[[String; N]]) {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.to_vec()).collect();
    print_rows(&rows);
}

/// Left-aligned columns, two spaces apart; the last column unpadded.
pub(super) fn print_rows(rows: &[Vec<String>]) {
    print!("{}", columns(rows));
}

/// `rows` as left-aligned columns two spaces apart, the last unpadded, one
/// line each.
pub(super) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == r.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_bars_show_used_draining_and_free() {
        let u = |used, draining, total| super::Usage {
            total,
            used,
            draining,
            free: total - used - draining,
        };
        assert_eq!(super::usage_bar(&u(0, 0, 8)), "[....................] 0/8");
        assert_eq!(super::usage_bar(&u(4, 0, 8)), "[##########..........] 4/8");
        assert_eq!(
            super::usage_bar(&u(1, 1, 64)),
            "[#~..................] 1/64"
        );
        assert_eq!(super::usage_bar(&u(8, 0, 8)), "[####################] 8/8");
    }
}
