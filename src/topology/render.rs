//! The host graph as a picture: Graphviz DOT (always), and SVG drawn by
//! `layout-rs` in pure Rust, so that it works where Graphviz is not
//! installed; Graphviz's own `dot` is used only when asked for.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::host::{Host, Origin};
use crate::config::Backend;
use crate::partition::Node;

/// How full one accelerator's pools are, from the daemon or a fresh
/// partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub queue_pairs: u32,
    pub free_queue_pairs: u32,
    pub pasids: u32,
    pub free_pasids: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the SVG renderer failed on this graph: {0}")]
    Layout(String),
    #[error("cannot run Graphviz's `dot`: {0}")]
    Dot(std::io::Error),
    #[error("Graphviz's `dot` failed: {0}")]
    DotFailed(String),
}

/// A DOT identifier or label, quoted and escaped (names come from sysfs).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `0-3,8` from a sorted list.
pub fn cpu_ranges(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

/// `64.0 GiB` from KiB.
pub fn memory(kib: Option<u64>) -> String {
    match kib {
        None => "-".into(),
        Some(k) => format!("{:.1} GiB", k as f64 / (1024.0 * 1024.0)),
    }
}

fn vertex(n: &Node) -> String {
    quote(&n.to_string())
}

/// The graph in DOT: NUMA nodes as boxes (memory-only ones shaded),
/// accelerators as ellipses with their free queue pairs and PASIDs (an IDXD
/// device's work queues as boxes of their own, dashed when not usable),
/// links labelled with their distance (dashed: declared in YAML).
pub fn to_dot(host: &Host, usage: &BTreeMap<String, PoolUsage>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph host {{");
    let _ = writeln!(s, "  node [fontname=\"Helvetica\", fontsize=11];");
    for n in &host.numa {
        let label = format!(
            "node{}\n{}\ncpus {}\n{}",
            n.id,
            n.role,
            cpu_ranges(&n.cpus),
            memory(n.memory_kib)
        );
        let style = match n.role {
            "memory-only" => "shape=box, style=filled, fillcolor=\"lightyellow\"",
            "initiator" => "shape=box, style=dashed",
            _ => "shape=box, style=filled, fillcolor=\"lightblue\"",
        };
        let _ = writeln!(
            s,
            "  {} [label={}, {style}];",
            vertex(&Node::Numa(n.id)),
            quote(&label)
        );
    }
    for a in &host.accelerators {
        let ops = crate::config::ops_names(a.ops).join(",");
        let pools = match usage.get(&a.name) {
            Some(u) => format!(
                "qp {}/{} free, PASIDs {}/{} free",
                u.free_queue_pairs, u.queue_pairs, u.free_pasids, u.pasids
            ),
            None => format!("qp {}, PASIDs {}", a.queue_pairs, a.pasids),
        };
        let label = format!("{}\n{} — {}\n{}", a.name, a.backend, ops, pools);
        let fill = match a.backend {
            Backend::Soft => "palegreen",
            Backend::Uacce => "lightsalmon",
            Backend::Idxd => "plum",
        };
        let me = vertex(&Node::Accelerator(a.name.clone()));
        let _ = writeln!(
            s,
            "  {me} [label={}, shape=ellipse, style=filled, fillcolor=\"{fill}\"];",
            quote(&label)
        );
        // An IDXD device's queue pools are its work queues: one vertex each.
        if let Some(super::model::Detail::Idxd { work_queues, .. }) =
            a.found.as_ref().map(|f| &f.detail)
        {
            for w in work_queues {
                let id = quote(&format!("{}/{}", a.name, w.name));
                let label = format!(
                    "{}\n{} {} {}\nsize {}",
                    w.name, w.kind, w.mode, w.state, w.size
                );
                let style = if w.usable() { "solid" } else { "dashed" };
                let _ = writeln!(
                    s,
                    "  {id} [label={}, shape=box, style={style}];",
                    quote(&label)
                );
                let _ = writeln!(s, "  {me} -- {id} [style=dotted];");
            }
        }
    }
    for l in &host.links {
        let style = match l.origin {
            Origin::Discovered => "solid",
            Origin::Yaml | Origin::Merged => "dashed",
        };
        let _ = writeln!(
            s,
            "  {} -- {} [label=\"{}\", style={style}];",
            vertex(&l.a),
            vertex(&l.b),
            l.distance
        );
    }
    let _ = writeln!(s, "}}");
    s
}

/// SVG drawn from `dot` by `layout-rs` (no Graphviz needed).
pub fn svg(dot: &str) -> Result<String, RenderError> {
    let dot = dot.to_string();
    // The renderer is third-party layout code fed our own DOT; a panic in
    // it must not take the command down with it.
    std::panic::catch_unwind(move || {
        let mut parser = layout::gv::DotParser::new(&dot);
        let graph = parser.process().map_err(RenderError::Layout)?;
        let mut builder = layout::gv::GraphBuilder::new();
        builder.visit_graph(&graph);
        let mut vg = builder.get();
        let mut svg = layout::backends::svg::SVGWriter::new();
        vg.do_it(false, false, false, &mut svg);
        Ok(svg.finalize())
    })
    .unwrap_or_else(|_| Err(RenderError::Layout("the layout panicked".into())))
}

/// SVG drawn by Graphviz's `dot`, if it is installed.
pub fn svg_with_graphviz(dot: &str) -> Result<String, RenderError> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RenderError::Dot)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(dot.as_bytes()).map_err(RenderError::Dot)?;
    }
    let out = child.wait_with_output().map_err(RenderError::Dot)?;
    if !out.status.success() {
        return Err(RenderError::DotFailed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| RenderError::DotFailed("output is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_ranges_compact() {
        assert_eq!(quote("a\"b\\c\nd\u{7}"), "\"a\\\"b\\\\c\\nd?\"");
        assert_eq!(cpu_ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_ranges(&[]), "-");
        assert_eq!(memory(Some(64 * 1024 * 1024)), "64.0 GiB");
    }

    #[test]
    fn the_pure_rust_renderer_draws_an_undirected_graph() {
        let svg = svg("graph g { \"node0\" [label=\"node0\\ncpus 0-1\"]; \"node0\" -- \"soft0\" [label=\"10\"]; }")
            .unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"), "{svg}");
        assert!(svg.contains("soft0"));
    }
}
