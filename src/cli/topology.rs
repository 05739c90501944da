//! `wdvirt topology` and `wdvirt plan`: the host graph discovery finds
//! (merged with YAML when given), and dry runs of placement on it. Both work
//! with no daemon; when one answers at `--api`, its pools' usage is shown
//! and planned against instead of an empty host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

use super::client::ApiClient;
use super::ctl::print_rows;
use crate::config::{self, Config};
use crate::daemon::action::Action;
use crate::daemon::catalog::TypeDef;
use crate::daemon::view::AcceleratorView;
use crate::partition::{Node, Topology};
use crate::topology::host::{self, Host};
use crate::topology::render::{self, PoolUsage, cpu_ranges, memory};
use crate::topology::{self as topo, Detail, Discovery, Source};

#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// The sysfs tree to read: `/sys`, or a recorded tree of another
    /// machine (tests/sysfs/ holds three).
    #[arg(long, value_name = "DIR", default_value = topo::DEFAULT_SYSFS)]
    pub sysfs: PathBuf,
    /// YAML to merge with what is found (repeatable; files or directories,
    /// as for `wdvirt daemon --config`). Without it: discovery alone.
    #[arg(long, value_name = "FILE|DIR")]
    pub config: Vec<PathBuf>,
    /// Which readers to run, comma-separated: numa, pci, uacce, idxd, soft.
    #[arg(long, value_name = "LIST", default_value = "numa,pci,uacce,idxd,soft")]
    pub sources: String,
    /// Do not ask a running daemon for its pools' usage: show a fresh
    /// partition of the host.
    #[arg(long)]
    pub offline: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
What is read (docs/topology.md):
  devices/system/node/nodeN     CPUs, memory, SLIT distances; memory-only
                                nodes (HBM, CXL) and generic initiators
  bus/pci/devices/ADDR          numa_node, local_cpulist, iommu_group, and
                                the PASID capability from `config`
  class/uacce/NAME              api, flags, available_instances, algorithms,
                                region sizes, isolate, the parent PCI function
  bus/dsa/devices/{dsaN,iaxN}   op_cap, state, PASID; work queues wqN.M
  soft (no file)                one software accelerator per NUMA node, one
                                engine per usable CPU
Entries that cannot be used are listed under SKIPPED with their path; none
stops discovery.

Examples:
  wdvirt topology                                  # this machine
  wdvirt topology --config /etc/wdvirt             # as the daemon sees it
  wdvirt topology --sysfs tests/sysfs/hbm-shared --svg host.svg
  wdvirt topology --dot | dot -Tpng > host.png     # Graphviz, if installed
  wdvirt topology --json | jq '.host.accelerators[].name'")]
pub struct TopologyArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Print JSON: the merged graph, each accelerator's pools, what
    /// discovery read and skipped.
    #[arg(long, conflicts_with = "dot")]
    pub json: bool,
    /// Print the graph in Graphviz DOT.
    #[arg(long)]
    pub dot: bool,
    /// Also write the graph as SVG to FILE, drawn without Graphviz, and
    /// its DOT beside it (FILE with the extension .dot).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Draw the SVG with Graphviz's `dot` instead (it must be installed).
    #[arg(long, requires = "svg")]
    pub graphviz: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
A dry run: nothing is placed. Placement is the daemon's (docs/placement.md):
each function on one accelerator that runs all its operations, the closest
combination first. For each accelerator that cannot take the next instance,
the constraint that stops it is named, e.g.
  hisi_zip-0–node3 distance 22 > max 20; hisi_sec2-2: no sha256 (function 1)

Types come from --config; without it, the built-in types of
policies/default.yaml (zip, hash, mover, all-4q) on the discovered host.
Accelerators this build has no backend for (uacce, idxd) are planned on
like any other but marked: the daemon serves instances on `soft` ones.

Examples:
  wdvirt plan zip --count 4
  wdvirt plan zip-hash --near 1 --config /etc/wdvirt
  wdvirt plan zip-hash --sysfs tests/sysfs/kunpeng920-2s --sources numa,pci,uacce \\
      --config tests/sysfs/types.yaml --near 3")]
pub struct PlanArgs {
    /// The instance type.
    #[arg(value_name = "TYPE")]
    pub type_name: String,
    /// How many instances to place, one after the other.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub count: u32,
    /// The VM's NUMA node (overrides the type's).
    #[arg(long, value_name = "NODE")]
    pub near: Option<u32>,
    #[command(flatten)]
    pub host: HostArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn sources(list: &str) -> anyhow::Result<Vec<Box<dyn Source>>> {
    let all = topo::all_sources();
    let mut out = Vec::new();
    let wanted: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for w in &wanted {
        if !all.iter().any(|s| s.name() == *w) {
            bail!(
                "unknown source '{w}' (known: {})",
                all.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    for s in all {
        if wanted.contains(&s.name()) {
            out.push(s);
        }
    }
    Ok(out)
}

/// What both commands start from.
struct Loaded {
    cfg: Config,
    found: Discovery,
    host: Host,
    /// Where the usage shown comes from.
    usage_from: String,
    usage: BTreeMap<String, PoolUsage>,
}

fn load(
    a: &HostArgs,
    api: &ApiClient,
    api_path: &std::path::Path,
    default_types: bool,
) -> anyhow::Result<Loaded> {
    let host::OnHost { cfg, found, host } = host::load(&a.sysfs, &sources(&a.sources)?, |names| {
        if !a.config.is_empty() {
            config::load_paths_on(&a.config, names)
        } else if default_types {
            let mut c = config::embedded_default()?;
            c.accelerators.clear();
            Ok(c)
        } else {
            Ok(Config::default())
        }
    })?;
    let mut usage: BTreeMap<String, PoolUsage> = host
        .accelerators
        .iter()
        .map(|x| {
            (
                x.name.clone(),
                PoolUsage {
                    queue_pairs: x.queue_pairs,
                    free_queue_pairs: x.queue_pairs,
                    pasids: x.pasids,
                    free_pasids: x.pasids,
                },
            )
        })
        .collect();
    let mut usage_from = "a fresh partition (nothing placed)".to_string();
    if !a.offline {
        match api.act::<Vec<AcceleratorView>>(&Action::ListAccelerators) {
            Ok(views) => {
                usage_from = format!("the daemon at {}", api_path.display());
                for v in views {
                    if let Some(u) = usage.get_mut(&v.name) {
                        *u = PoolUsage {
                            queue_pairs: v.queue_pairs.total,
                            free_queue_pairs: v.queue_pairs.free,
                            pasids: v.pasids.total,
                            free_pasids: v.pasids.free,
                        };
                    }
                }
            }
            Err(e) => tracing::debug!("no daemon answers: {e:#}"),
        }
    }
    Ok(Loaded {
        cfg,
        found,
        host,
        usage_from,
        usage,
    })
}

pub fn topology(
    a: TopologyArgs,
    api: &ApiClient,
    api_path: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let l = load(&a.host, api, api_path, false)?;
    let dot = render::to_dot(&l.host, &l.usage);
    if let Some(path) = &a.svg {
        let svg = if a.graphviz {
            render::svg_with_graphviz(&dot)?
        } else {
            render::svg(&dot)?
        };
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        // The DOT it was drawn from, beside it, for Graphviz or an editor.
        let dot_path = path.with_extension("dot");
        std::fs::write(&dot_path, &dot)
            .with_context(|| format!("cannot write {}", dot_path.display()))?;
        eprintln!(
            "wdvirt: wrote {} and {}",
            path.display(),
            dot_path.display()
        );
    }
    if a.json {
        // The problems once: under `host` (discovery's and the merge's).
        let mut discovered = serde_json::to_value(&l.found)?;
        if let Some(o) = discovered.as_object_mut() {
            o.remove("problems");
        }
        let out = serde_json::json!({
            "sysfs": a.host.sysfs,
            "config": a.host.config,
            "usage_from": l.usage_from,
            "host": l.host,
            "usage": l.usage,
            "discovered": discovered,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if a.dot {
        print!("{dot}");
    } else if a.svg.is_none() {
        print_text(&a.host, &l);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(a: &HostArgs, l: &Loaded) {
    println!(
        "host graph of {} ({}), usage from {}",
        a.sysfs.display(),
        if a.config.is_empty() {
            "discovery alone".to_string()
        } else {
            format!(
                "merged with {}",
                a.config
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        l.usage_from
    );
    let topo = l.host.topology(false).ok();
    println!();
    let mut rows = vec![vec![
        "NODE".to_string(),
        "ROLE".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "ORIGIN".into(),
        "DISTANCES".into(),
    ]];
    for n in &l.host.numa {
        let me = Node::Numa(n.id);
        let d: Vec<String> = l
            .host
            .numa
            .iter()
            .filter(|m| m.id != n.id)
            .filter_map(|m| {
                let t = topo.as_ref()?;
                Some(format!(
                    "node{}:{}",
                    m.id,
                    t.distance(&me, &Node::Numa(m.id))?
                ))
            })
            .collect();
        rows.push(vec![
            format!("node{}", n.id),
            n.role.to_string(),
            cpu_ranges(&n.cpus),
            memory(n.memory_kib),
            origin(n.origin),
            if d.is_empty() {
                "-".into()
            } else {
                d.join(" ")
            },
        ]);
    }
    print_rows(&rows);
    println!();
    let mut rows = vec![vec![
        "ACCELERATOR".to_string(),
        "BACKEND".into(),
        "NODE".into(),
        "PCI".into(),
        "IOMMU".into(),
        "PASID CAP".into(),
        "QUEUE PAIRS FREE".into(),
        "PASIDS FREE".into(),
        "ORIGIN".into(),
        "OPERATIONS".into(),
    ]];
    for x in &l.host.accelerators {
        let pci = x
            .found
            .as_ref()
            .and_then(|f| f.pci.as_deref())
            .and_then(|p| l.found.pci_function(p));
        let u = l.usage.get(&x.name);
        rows.push(vec![
            x.name.clone(),
            if x.drivable {
                x.backend.to_string()
            } else {
                format!("{} (no backend)", x.backend)
            },
            x.numa_node.map_or("-".into(), |n| format!("node{n}")),
            pci.map_or("-".into(), |p| p.address.clone()),
            pci.and_then(|p| p.iommu_group)
                .map_or("-".into(), |g| g.to_string()),
            pci.map_or("-".into(), |p| p.pasid.to_string()),
            u.map_or("-".into(), |u| {
                format!("{}/{}", u.free_queue_pairs, u.queue_pairs)
            }),
            u.map_or("-".into(), |u| format!("{}/{}", u.free_pasids, u.pasids)),
            origin(x.origin),
            config::ops_names(x.ops).join(","),
        ]);
    }
    print_rows(&rows);
    for x in &l.host.accelerators {
        if let Some(f) = &x.found {
            match &f.detail {
                Detail::Uacce {
                    api, algorithms, ..
                } => println!(
                    "  {}: {} api {api}, algorithms {}",
                    x.name,
                    f.path,
                    algorithms.join(" ")
                ),
                Detail::Idxd { work_queues, .. } => {
                    let wqs: Vec<String> = work_queues
                        .iter()
                        .map(|w| {
                            format!(
                                "{} {} {} {} size {}{}",
                                w.name,
                                w.kind,
                                w.mode,
                                w.state,
                                w.size,
                                if w.usable() { "" } else { " (not usable)" }
                            )
                        })
                        .collect();
                    println!("  {}: {}; {}", x.name, f.path, wqs.join("; "));
                }
                Detail::Soft { cpus } => println!(
                    "  {}: software engines on CPUs {}",
                    x.name,
                    cpu_ranges(cpus)
                ),
            }
        }
    }
    println!();
    let mut rows = vec![vec!["LINK".to_string(), "DISTANCE".into(), "ORIGIN".into()]];
    for k in &l.host.links {
        rows.push(vec![
            format!("{}–{}", k.a, k.b),
            k.distance.to_string(),
            origin(k.origin),
        ]);
    }
    print_rows(&rows);
    if !l.host.problems.is_empty() {
        println!();
        println!("SKIPPED ({})", l.host.problems.len());
        for p in &l.host.problems {
            println!("  {p}");
        }
    }
}

fn origin(o: host::Origin) -> String {
    match o {
        host::Origin::Discovered => "discovered",
        host::Origin::Yaml => "yaml",
        host::Origin::Merged => "discovered+yaml",
    }
    .into()
}

pub fn plan(a: PlanArgs, api: &ApiClient, api_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let l = load(&a.host, api, api_path, true)?;
    let Some(t) = l.cfg.instance_type(&a.type_name) else {
        let known: Vec<&str> = l.cfg.types.iter().map(|t| t.name.as_str()).collect();
        bail!(
            "unknown type '{}' (known: {})",
            a.type_name,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let topo: Topology = l.host.topology(false)?;
    let mut req = TypeDef::from_config(t).placement;
    if a.near.is_some() {
        req.numa_node = a.near;
    }
    let free: Vec<(u32, u32)> = topo
        .accelerators()
        .iter()
        .map(|x| {
            l.usage.get(&x.name).map_or((x.queue_pairs, x.pasids), |u| {
                (u.free_queue_pairs, u.free_pasids)
            })
        })
        .collect();
    let plan = topo.plan(&req, &free, a.count)?;
    let no_backend: Vec<&str> = l
        .host
        .accelerators
        .iter()
        .filter(|x| !x.drivable)
        .map(|x| x.name.as_str())
        .collect();
    let enough = plan.placed.len() as u32 == a.count;
    if a.json {
        let out = serde_json::json!({
            "type": a.type_name,
            "count": a.count,
            "near": req.numa_node,
            "usage_from": l.usage_from,
            "fits": enough,
            "plan": plan,
            "no_backend": no_backend,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "type {} ({}){}: {} of {} fit now; {} in all (usage from {})",
            a.type_name,
            t.functions
                .iter()
                .map(|f| format!("{}q {}", f.queues, config::ops_names(f.ops).join(",")))
                .collect::<Vec<_>>()
                .join(" + "),
            req.numa_node
                .map_or(String::new(), |n| format!(" near node{n}")),
            plan.placed.len(),
            a.count,
            plan.fit,
            l.usage_from
        );
        for (i, p) in plan.placed.iter().enumerate() {
            let marked: Vec<String> = p
                .accelerators
                .iter()
                .map(|x| {
                    if no_backend.contains(&x.as_str()) {
                        format!("{x} (no backend in this build)")
                    } else {
                        x.clone()
                    }
                })
                .collect();
            println!(
                "  #{}: {}  (total distance {}, max {})",
                i + 1,
                marked.join(" + "),
                p.total_distance,
                p.max_distance
            );
        }
        if let Some(why) = &plan.refusal {
            if plan.rejections.is_empty() {
                println!("next instance refused: {why}");
            } else {
                println!("next instance refused; per accelerator:");
                for r in &plan.rejections {
                    println!("  {r}");
                }
            }
        }
    }
    Ok(if enough {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
