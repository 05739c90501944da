//! Instance types: their shape (one function or several), depth, QoS policy
//! and placement constraints, and whether any accelerator could ever host
//! each of their functions.

use serde_saphyr::Location;

use super::error::{ConfigError, Place};
use super::model::*;
use super::raw::RawType;
use super::validate::Ctx;
use crate::vdev::wd::{MAX_QUEUES, ShapeError};

pub(super) fn check_type(
    cx: &mut Ctx,
    fi: usize,
    t: &RawType,
    origin: Place,
) -> Option<(InstanceType, Vec<Location>)> {
    let name = t.name.value.clone();
    let mut ok = true;
    // Each function with the place its errors point at.
    let mut functions = Vec::new();
    let mut places = Vec::new();
    match (&t.queues, &t.operations, &t.functions) {
        (None, None, None) => {
            cx.err(
                fi,
                t.name.referenced,
                ConfigError::NoFunction { name: name.clone() },
            );
            ok = false;
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            cx.err(
                fi,
                t.name.referenced,
                ConfigError::BothShapes { name: name.clone() },
            );
            ok = false;
        }
        (None, None, Some(fs)) => {
            if fs.value.is_empty() {
                cx.err(
                    fi,
                    fs.referenced,
                    ConfigError::NoFunction { name: name.clone() },
                );
                ok = false;
            }
            for f in &fs.value {
                let queues = cx.range(
                    fi,
                    &f.value.queues,
                    "queues",
                    1,
                    MAX_QUEUES as u64,
                    ShapeError::QUEUES,
                );
                let ops = cx.ops(fi, &f.value.operations);
                match (queues, ops) {
                    (Some(queues), Some(ops)) => {
                        functions.push(Function { queues, ops });
                        places.push(f.referenced);
                    }
                    _ => ok = false,
                }
            }
        }
        (q, o, None) => {
            let queues = match q {
                Some(q) => cx.range(fi, q, "queues", 1, MAX_QUEUES as u64, ShapeError::QUEUES),
                None => {
                    cx.err(
                        fi,
                        t.name.referenced,
                        ConfigError::Needs {
                            field: "operations",
                            needs: "queues (the function's queue count)",
                        },
                    );
                    None
                }
            };
            let ops = match o {
                Some(o) => cx.ops(fi, o),
                None => {
                    cx.err(
                        fi,
                        t.name.referenced,
                        ConfigError::Needs {
                            field: "queues",
                            needs: "operations (what the queues may run)",
                        },
                    );
                    None
                }
            };
            match (queues, ops) {
                (Some(queues), Some(ops)) => {
                    functions.push(Function { queues, ops });
                    places.push(t.name.referenced);
                }
                _ => ok = false,
            }
        }
    }
    let total: u32 = functions.iter().map(|f| f.queues).sum();
    if ok && ShapeError::check_queues(total).is_err() {
        let at = t
            .functions
            .as_ref()
            .map_or(t.name.referenced, |f| f.referenced);
        cx.err(
            fi,
            at,
            ConfigError::TooManyQueues {
                name: name.clone(),
                queues: total,
            },
        );
        ok = false;
    }
    let max_depth = match &t.max_depth {
        None => 1024,
        Some(d) if ShapeError::check_depth(d.value).is_ok() => d.value,
        Some(d) => {
            cx.err(
                fi,
                d.referenced,
                ConfigError::OutOfRange {
                    what: "max_depth",
                    value: d.value.into(),
                    expected: ShapeError::DEPTH.into(),
                },
            );
            ok = false;
            0
        }
    };
    if !cx.policies.contains(&t.qos.value) {
        let defined = cx.policies.list();
        cx.err(
            fi,
            t.qos.referenced,
            ConfigError::UnknownPolicy {
                name: t.qos.value.clone(),
                defined,
            },
        );
        ok = false;
    }
    let mut placement = Placement::default();
    if let Some(p) = &t.placement {
        if let Some(d) = &p.max_distance {
            placement.max_distance = cx.range(fi, d, "max_distance", 1, 65_535, "1..=65535");
            ok &= placement.max_distance.is_some();
        }
        if let Some(list) = &p.accelerators {
            if list.value.is_empty() {
                cx.err(fi, list.referenced, ConfigError::EmptyAllowList);
                ok = false;
            }
            let mut names = Vec::new();
            for a in &list.value {
                if cx.has_accel(&a.value) {
                    names.push(a.value.clone());
                } else {
                    let defined = cx.accel_list();
                    cx.err(
                        fi,
                        a.referenced,
                        ConfigError::UnknownAccelerator {
                            name: a.value.clone(),
                            defined,
                        },
                    );
                    ok = false;
                }
            }
            placement.accelerators = Some(names);
        }
        if let Some(n) = &p.numa_node {
            placement.numa_node = cx.node(fi, n);
            ok &= placement.numa_node.is_some();
        }
    }
    ok.then(|| {
        (
            InstanceType {
                name,
                functions,
                max_depth,
                qos: t.qos.value.clone(),
                placement,
                origin,
            },
            places,
        )
    })
}

/// Refuse a type with a function that no accelerator (within its allow-list)
/// could ever host, saying per accelerator why not.
pub(super) fn check_hostable(
    cx: &mut Ctx,
    fi: usize,
    t: &InstanceType,
    places: &[Location],
    accels: &[Accelerator],
) {
    // An allow-list naming what discovery found: the merged graph decides.
    if let Some(list) = &t.placement.accelerators
        && list.iter().any(|n| !accels.iter().any(|a| &a.name == n))
    {
        return;
    }
    let n = t.functions.len();
    for (i, (f, at)) in t.functions.iter().zip(places).enumerate() {
        if accels.iter().any(|a| t.can_host(a, f)) {
            continue;
        }
        let mut reasons = Vec::new();
        for a in accels {
            if let Some(list) = &t.placement.accelerators
                && !list.contains(&a.name)
            {
                continue;
            }
            let mut why = Vec::new();
            let missing = f.ops & !a.ops;
            if missing != 0 {
                why.push(format!("lacks {}", ops_names(missing).join(", ")));
            }
            if f.queues > a.queue_pairs {
                why.push(format!(
                    "has {} queue pairs (needs {})",
                    a.queue_pairs, f.queues
                ));
            }
            reasons.push(format!("{} {}", a.name, why.join(" and ")));
        }
        if reasons.is_empty() {
            reasons.push("no accelerator is defined".into());
        }
        let function = if n == 1 {
            format!(
                "(queues {}, operations {})",
                f.queues,
                ops_names(f.ops).join(", ")
            )
        } else {
            format!(
                "function {} of {n} (queues {}, operations {})",
                i + 1,
                f.queues,
                ops_names(f.ops).join(", ")
            )
        };
        cx.err(
            fi,
            *at,
            ConfigError::Unhostable {
                name: t.name.clone(),
                function,
                reasons,
            },
        );
    }
}
