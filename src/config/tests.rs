//! Every bad-input case with its exact place and message, the rendering, the
//! shipped examples, and the schema.

use std::path::PathBuf;

use wdvirt_abi::{ALL_OPS, Opcode};

use super::*;

/// Accelerators and policies placed after the case under test, so the case's
/// own line numbers start at 1.
const REST: &str = "
accelerators:
  - name: soft0
    backend: soft
    engines: 2
    queue_pairs: 8
    operations: [deflate-compress, deflate-decompress, copy]
    pasids: 16
  - name: soft1
    backend: soft
    engines: 1
    queue_pairs: 2
    operations: [sha256, crc32c]
    pasids: 16
qos_policies:
  - {name: gold, weight: 100}
  - {name: bronze, weight: 10}
";

fn errs(yaml: &str) -> Vec<Located> {
    match load_str("t.yaml", yaml) {
        Ok(c) => panic!("accepted: {c:#?}"),
        Err(ConfigErrors(v)) => v,
    }
}

/// The one error `yaml` + REST has: its line, column and message.
fn one(yaml: &str) -> (u32, u32, String) {
    let v = errs(&format!("{yaml}{REST}"));
    assert_eq!(v.len(), 1, "{}", ConfigErrors(v.clone()));
    let e = &v[0];
    assert_eq!(e.place.file, "t.yaml");
    (e.place.line, e.place.column, e.error.to_string())
}

fn ok(yaml: &str) -> Config {
    load_str("t.yaml", &format!("{yaml}{REST}")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_good_file_resolves_names_and_operation_masks() {
    let c = ok("types:\n  - {name: z, queues: 2, operations: [deflate-compress], qos: gold}\n");
    assert_eq!(c.accelerators.len(), 2);
    assert_eq!(c.qos_policies.len(), 2);
    let t = c.instance_type("z").unwrap();
    assert_eq!(
        t.functions,
        vec![Function {
            queues: 2,
            ops: Opcode::DeflateCompress.bit()
        }]
    );
    assert_eq!(t.max_depth, 1024, "default depth");
    assert_eq!(t.qos, "gold");
    assert_eq!((t.origin.line, t.origin.column), (2, 12));
    let a = c.accelerator("soft1").unwrap();
    assert_eq!(a.ops, Opcode::Sha256.bit() | Opcode::Crc32c.bit());
    assert_eq!((a.origin.line, a.origin.column), (11, 11));
}

#[test]
fn yaml_syntax_error_is_placed() {
    let (l, c, m) = one("types:\n  - name: z\n    operations: [sha256\n    qos: gold\n");
    // The unclosed `[` runs on into the next line, where `:` cannot be.
    assert_eq!((l, c), (4, 8), "{m}");
    assert_eq!(m, "illegal placement of ':' indicator");
}

#[test]
fn unknown_key_lists_the_known_ones() {
    let (l, c, m) = one(
        "types:\n  - name: z\n    queues: 1\n    operations: [all]\n    qos: gold\n    colour: blue\n",
    );
    assert_eq!((l, c), (6, 5));
    assert!(
        m.contains("unknown field `colour`") && m.contains("max_depth") && m.contains("placement"),
        "{m}"
    );
}

#[test]
fn unknown_top_level_key() {
    let v = errs("instance_types: []\n");
    assert_eq!((v[0].place.line, v[0].place.column), (1, 1));
    let m = v[0].error.to_string();
    assert!(
        m.contains("unknown field `instance_types`") && m.contains("qos_policies"),
        "{m}"
    );
}

#[test]
fn wrong_type_says_what_was_expected() {
    let (l, c, m) =
        one("types:\n  - name: z\n    queues: four\n    operations: [all]\n    qos: gold\n");
    assert_eq!((l, c), (3, 13));
    assert_eq!(m, "expected a whole number from 0 to 4294967295");
    let (l, c, m) =
        one("types:\n  - name: z\n    queues: 1\n    operations: sha256\n    qos: gold\n");
    assert_eq!((l, c), (4, 17));
    assert!(m.contains("expected a list"), "{m}");
}

#[test]
fn missing_key_is_named() {
    let (l, c, m) = one("types:\n  - name: z\n    queues: 1\n    operations: [all]\n");
    // serde-saphyr places it at the mapping's last key.
    assert_eq!((l, c), (4, 5));
    assert_eq!(m, "missing field `qos`");
}

#[test]
fn out_of_range_values_are_each_reported_with_the_range() {
    let v = errs(
        "accelerators:\n  - name: a\n    backend: soft\n    engines: 65\n    queue_pairs: 0\n    operations: [all]\n    pasids: 1048576\n",
    );
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                4,
                14,
                "engines 65 is out of range (expected 1..=64)".to_string()
            ),
            (
                5,
                18,
                "queue_pairs 0 is out of range (expected 1..=4096)".to_string()
            ),
            (
                7,
                13,
                "pasids 1048576 is out of range (expected 1..=1048575)".to_string()
            ),
        ]
    );
}

#[test]
fn max_depth_must_be_a_power_of_two() {
    let (l, c, m) = one(
        "types:\n  - name: z\n    queues: 1\n    operations: [all]\n    max_depth: 1000\n    qos: gold\n",
    );
    assert_eq!((l, c), (5, 16));
    assert_eq!(
        m,
        "max_depth 1000 is out of range (expected a power of two in 2..=65536)"
    );
}

#[test]
fn qos_ranges_and_bursts_without_rates() {
    let v = errs(
        "qos_policies:\n  - name: p\n    weight: 0\n    rate: {burst_jobs: 5}\n    max_in_flight: 70000\n",
    );
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                3,
                13,
                "weight 0 is out of range (expected 1..=10000)".to_string()
            ),
            (
                4,
                24,
                "burst_jobs needs jobs_per_sec (a burst above which rate?)".to_string()
            ),
            (
                5,
                20,
                "max_in_flight 70000 is out of range (expected 1..=65536)".to_string()
            ),
        ]
    );
}

#[test]
fn queue_priorities_are_read_in_queue_order_and_each_is_checked_at_its_place() {
    let c = load_str(
        "t.yaml",
        "qos_policies:\n  - {name: p, weight: 1, queue_priorities: [0, 7, 3]}\n  - {name: q, weight: 1}\n",
    )
    .unwrap();
    assert_eq!(c.qos_policy("p").unwrap().queue_priorities, vec![0, 7, 3]);
    assert!(c.qos_policy("q").unwrap().queue_priorities.is_empty());
    let v = errs("qos_policies:\n  - name: p\n    weight: 1\n    queue_priorities: [1, 8]\n");
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![(
            4,
            27,
            "queue_priorities 8 is out of range (expected 0..=7)".to_string()
        )]
    );
}

#[test]
fn duplicate_name_in_one_file_points_at_both() {
    let v = errs(
        "qos_policies:\n  - {name: gold, weight: 1}\n  - {name: silver, weight: 1}\n  - {name: gold, weight: 2}\n",
    );
    assert_eq!(v.len(), 1, "{}", ConfigErrors(v.clone()));
    let e = &v[0];
    assert_eq!((e.place.line, e.place.column), (4, 12));
    assert_eq!(
        e.error.to_string(),
        "duplicate QoS policy 'gold' (first defined at t.yaml:2:12)"
    );
    let n = e.note.as_ref().unwrap();
    assert_eq!((n.place.line, n.place.column), (2, 12));
    assert_eq!(
        e.to_string(),
        "t.yaml:4:12: error: duplicate QoS policy 'gold' (first defined at t.yaml:2:12)\n   |\n 4 |   - {name: gold, weight: 2}\n   |            ^\nt.yaml:2:12: note: first defined here\n   |\n 2 |   - {name: gold, weight: 1}\n   |            ^"
    );
}

#[test]
fn a_key_given_twice_is_a_yaml_error() {
    let (l, c, m) = one(
        "types:\n  - name: z\n    queues: 1\n    queues: 2\n    operations: [all]\n    qos: gold\n",
    );
    assert_eq!((l, c), (4, 5));
    assert_eq!(m, "duplicate mapping key `queues` is not allowed here");
}

#[test]
fn duplicate_name_across_files_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), REST).unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        "# more\naccelerators:\n  - {name: soft1, backend: soft, engines: 1, queue_pairs: 1, operations: [all], pasids: 1}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
    let ConfigErrors(v) = load_paths(&[dir.path().to_path_buf()]).unwrap_err();
    assert_eq!(v.len(), 1, "{}", ConfigErrors(v.clone()));
    let a = dir.path().join("a.yaml").display().to_string();
    let b = dir.path().join("b.yml").display().to_string();
    assert_eq!(
        v[0].place,
        Place {
            file: b,
            line: 3,
            column: 12
        }
    );
    assert_eq!(
        v[0].error.to_string(),
        format!("duplicate accelerator 'soft1' (first defined at {a}:9:11)")
    );
    assert_eq!(
        v[0].note.as_ref().unwrap().place,
        Place {
            file: a,
            line: 9,
            column: 11
        }
    );
}

#[test]
fn files_of_a_directory_merge_and_refer_to_each_other() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-host.yaml"), REST).unwrap();
    std::fs::write(
        dir.path().join("20-types.yml"),
        "types:\n  - {name: h, queues: 1, operations: [sha256], qos: bronze}\n",
    )
    .unwrap();
    let c = load_paths(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(
        (c.accelerators.len(), c.qos_policies.len(), c.types.len()),
        (2, 2, 1)
    );
    assert!(c.types[0].origin.file.ends_with("20-types.yml"));
}

#[test]
fn an_empty_directory_and_a_missing_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let ConfigErrors(v) = load_paths(&[dir.path().to_path_buf(), missing.clone()]).unwrap_err();
    assert_eq!(v.len(), 2);
    assert!(
        v[0].to_string().contains("no *.yaml or *.yml files"),
        "{}",
        v[0]
    );
    assert!(
        v[1].to_string()
            .starts_with(&format!("{}: error: cannot read:", missing.display())),
        "{}",
        v[1]
    );
}

#[test]
fn unknown_qos_policy_lists_the_defined_ones() {
    let (l, c, m) =
        one("types:\n  - name: z\n    queues: 1\n    operations: [all]\n    qos: bogus\n");
    assert_eq!((l, c), (5, 10));
    assert_eq!(m, "unknown QoS policy 'bogus' (defined: gold, bronze)");
}

#[test]
fn unknown_accelerator_in_the_allow_list() {
    let (l, c, m) = one(
        "types:\n  - name: z\n    queues: 1\n    operations: [copy]\n    qos: gold\n    placement:\n      accelerators: [soft0, soft9]\n",
    );
    assert_eq!((l, c), (7, 29));
    assert_eq!(m, "unknown accelerator 'soft9' (defined: soft0, soft1)");
}

#[test]
fn unknown_accelerator_or_node_in_links() {
    let v = errs(
        "accelerators:\n  - name: a\n    backend: soft\n    engines: 1\n    queue_pairs: 1\n    operations: [all]\n    pasids: 1\n    links:\n      - {to: b, distance: 10}\n      - {to: node3, distance: 10}\n      - {to: a, distance: 10}\n",
    );
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                9,
                14,
                "unknown accelerator 'b' (defined: a; NUMA nodes as nodeN: none)".to_string()
            ),
            (10, 14, "unknown NUMA node 3 (defined: none)".to_string()),
            (11, 14, "a link to itself".to_string()),
        ]
    );
}

#[test]
fn unknown_backend_and_operation() {
    let v = errs(
        "accelerators:\n  - name: a\n    backend: fpga\n    engines: 1\n    queue_pairs: 1\n    operations: [sha256, sha512]\n    pasids: 1\n",
    );
    assert_eq!((v[0].place.line, v[0].place.column), (3, 14));
    assert_eq!(
        v[0].error.to_string(),
        "unknown backend 'fpga' (known: soft, uacce, idxd)"
    );
    assert_eq!((v[1].place.line, v[1].place.column), (6, 26));
    assert!(
        v[1].error
            .to_string()
            .starts_with("unknown operation 'sha512' (known: all, nop, deflate-compress,"),
        "{}",
        v[1].error
    );
}

#[test]
fn a_type_no_accelerator_has_the_operations_for_says_why_per_accelerator() {
    let (l, c, m) =
        one("types:\n  - name: z\n    queues: 1\n    operations: [sha256, copy]\n    qos: gold\n");
    assert_eq!((l, c), (2, 11));
    assert_eq!(
        m,
        "type 'z' (queues 1, operations sha256, copy) can never be placed: soft0 lacks sha256; soft1 lacks copy"
    );
}

#[test]
fn a_function_with_more_queues_than_any_pool() {
    let (l, c, m) = one(
        "types:\n  - name: z\n    qos: gold\n    functions:\n      - {queues: 2, operations: [copy]}\n      - queues: 3\n        operations: [crc32c]\n",
    );
    assert_eq!((l, c), (6, 9));
    assert_eq!(
        m,
        "type 'z' function 2 of 2 (queues 3, operations crc32c) can never be placed: soft0 lacks crc32c; soft1 has 2 queue pairs (needs 3)"
    );
}

#[test]
fn the_allow_list_limits_who_may_host() {
    let (l, c, m) = one(
        "types:\n  - name: z\n    queues: 1\n    operations: [sha256]\n    qos: gold\n    placement: {accelerators: [soft0]}\n",
    );
    assert_eq!((l, c), (2, 11));
    assert_eq!(
        m,
        "type 'z' (queues 1, operations sha256) can never be placed: soft0 lacks sha256"
    );
}

#[test]
fn with_no_software_accelerator_types_wait_for_the_discovered_ones() {
    // No accelerator declared: the host's discovered software engines serve
    // the types, so the YAML alone cannot refuse them (the merged graph is
    // checked by `daemon::catalog::check_placeable`; tests/topology.rs:
    // a_type_never_placeable_on_the_merged_graph_is_refused_by_validate_and_the_daemon).
    let cfg = crate::config::load_str(
        "t.yaml",
        "qos_policies: [{name: g, weight: 1}]\ntypes: [{name: z, queues: 1, operations: [all], qos: g}]\n",
    )
    .unwrap();
    assert_eq!(cfg.types.len(), 1);
    assert!(cfg.accelerators.is_empty());
}

#[test]
fn shape_errors_both_or_neither_or_too_many_queues() {
    let (l, c, m) = one("types:\n  - name: z\n    qos: gold\n");
    assert_eq!((l, c), (2, 11));
    assert_eq!(
        m,
        "type 'z' has no function (expected `queues` + `operations`, or `functions`)"
    );
    let (_, _, m) = one(
        "types:\n  - name: z\n    qos: gold\n    queues: 1\n    functions: [{queues: 1, operations: [copy]}]\n",
    );
    assert!(m.contains("has both"), "{m}");
    let (l, c, m) = one(
        "types:\n  - name: z\n    qos: gold\n    functions:\n      - {queues: 40, operations: [copy]}\n      - {queues: 40, operations: [copy]}\n",
    );
    assert_eq!((l, c), (5, 7));
    assert_eq!(
        m,
        "type 'z' has 80 queues in all (expected at most 64: one device)"
    );
}

#[test]
fn operation_lists_all_alone_and_not_empty() {
    let (l, c, m) = one("types:\n  - name: z\n    queues: 1\n    operations: []\n    qos: gold\n");
    assert_eq!((l, c), (4, 17));
    assert!(m.starts_with("empty operation list"), "{m}");
    let (l, c, m) =
        one("types:\n  - name: z\n    queues: 1\n    operations: [copy, all]\n    qos: gold\n");
    assert_eq!((l, c), (4, 24));
    assert_eq!(m, "'all' cannot be combined with other operation names");
}

#[test]
fn numa_nodes_cpu_lists_and_distances() {
    let v = errs(
        "numa_nodes:\n  - id: 0\n    cpus: \"0-3,x\"\n    distances: {0: 10, 1: 21, 2: 0}\n  - id: 1\n    cpus: \"4-2\"\n  - id: 1\n",
    );
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                3,
                11,
                "invalid cpu list '0-3,x': 'x' is not a cpu number (expected e.g. \"0-3,8\")"
                    .to_string()
            ),
            (
                4,
                34,
                "distance 0 is out of range (expected 1..=255)".to_string()
            ),
            (4, 34, "unknown NUMA node 2 (defined: 0, 1)".to_string()),
            (
                6,
                11,
                "invalid cpu list '4-2': range 4-2 runs backwards (expected e.g. \"0-3,8\")"
                    .to_string()
            ),
            (
                7,
                9,
                "duplicate NUMA node '1' (first defined at t.yaml:5:9)".to_string()
            ),
        ]
    );
}

#[test]
fn cpu_lists_parse_like_linux() {
    assert_eq!(parse_cpu_list("0-2,7, 5").unwrap(), vec![0, 1, 2, 5, 7]);
    assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
    assert!(parse_cpu_list("").is_err());
    assert!(parse_cpu_list("1,,2").is_err());
    assert!(parse_cpu_list("9000").is_err());
}

#[test]
fn bad_names_and_reserved_node_names() {
    let v = errs(
        "accelerators:\n  - {name: node1, backend: soft, engines: 1, queue_pairs: 1, operations: [all], pasids: 1}\n  - {name: 'a b', backend: soft, engines: 1, queue_pairs: 1, operations: [all], pasids: 1}\n",
    );
    assert_eq!((v[0].place.line, v[0].place.column), (2, 12));
    assert!(
        v[0].error
            .to_string()
            .contains("reserved for NUMA node links")
    );
    assert_eq!((v[1].place.line, v[1].place.column), (3, 12));
    assert!(
        v[1].error
            .to_string()
            .starts_with("invalid accelerator name 'a b'")
    );
}

#[test]
fn the_rendering_has_place_line_and_caret() {
    let v = errs(&format!(
        "types:\n  - name: z\n    queues: 1\n    operations: [all]\n    qos: bogus\n{REST}"
    ));
    assert_eq!(
        v[0].to_string(),
        "t.yaml:5:10: error: unknown QoS policy 'bogus' (defined: gold, bronze)\n   |\n 5 |     qos: bogus\n   |          ^"
    );
}

#[test]
fn several_errors_are_collected_in_one_pass() {
    let v = errs(&format!(
        "types:\n  - {{name: a, queues: 0, operations: [all], qos: gold}}\n  - {{name: b, queues: 1, operations: [all], qos: nope}}\n{REST}"
    ));
    assert_eq!(v.len(), 2, "{}", ConfigErrors(v.clone()));
    assert_eq!((v[0].place.line, v[1].place.line), (2, 3));
}

#[test]
fn empty_and_comment_only_files_are_empty_configs() {
    assert_eq!(load_str("e.yaml", "").unwrap(), Config::default());
    assert_eq!(
        load_str("e.yaml", "# nothing\n").unwrap(),
        Config::default()
    );
    assert!(load_str("e.yaml", "[1, 2]\n").is_err());
}

fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

#[test]
fn the_shipped_default_has_its_types_and_policies() {
    let c = embedded_default().unwrap();
    assert_eq!(
        c,
        load_paths(&[policies_dir().join("default.yaml")])
            .map(|mut c| {
                c.accelerators
                    .iter_mut()
                    .for_each(|a| a.origin.file = "policies/default.yaml".into());
                c.qos_policies
                    .iter_mut()
                    .for_each(|a| a.origin.file = "policies/default.yaml".into());
                c.types
                    .iter_mut()
                    .for_each(|a| a.origin.file = "policies/default.yaml".into());
                c
            })
            .unwrap()
    );
    assert!(c.numa_nodes.is_empty());
    let a = &c.accelerators[..];
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].name.as_str(), a[0].backend, a[0].engines, a[0].ops),
        ("soft0", Backend::Soft, 2, ALL_OPS)
    );
    let names: Vec<_> = c.qos_policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["gold", "silver", "bronze"]);
    let names: Vec<_> = c.types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["zip", "hash", "mover", "all-4q"]);
    let zip = Format::ALL.iter().fold(0, |m, f| {
        m | f.compress_op().bit() | f.decompress_op().bit()
    });
    let ops: Vec<_> = c.types.iter().map(|t| (t.queues(), t.ops())).collect();
    assert_eq!(
        ops,
        [
            (2, zip),
            (1, Opcode::Sha256.bit() | Opcode::Crc32c.bit()),
            (
                2,
                Opcode::Copy.bit() | Opcode::Fill.bit() | Opcode::Compare.bit()
            ),
            (4, ALL_OPS),
        ]
    );
}

use wdvirt_abi::Format;

#[test]
fn the_two_node_example_combines_two_accelerators() {
    let c = load_paths(&[policies_dir().join("two-node.yaml")]).unwrap();
    assert_eq!(c.numa_nodes.len(), 2);
    assert_eq!(c.numa_nodes[0].distances.get(&1), Some(&21));
    let zip0 = c.accelerator("zip0").unwrap();
    let sec1 = c.accelerator("sec1").unwrap();
    assert_eq!((zip0.numa_node, sec1.numa_node), (Some(0), Some(1)));
    assert_eq!(
        zip0.links,
        vec![Link {
            to: Endpoint::Accelerator("sec1".into()),
            distance: 15
        }]
    );
    let t = c.instance_type("zip-hash").unwrap();
    assert_eq!(t.functions.len(), 2);
    let (f0, f1) = (&t.functions[0], &t.functions[1]);
    assert!(t.can_host(zip0, f0) && !t.can_host(sec1, f0));
    assert!(t.can_host(sec1, f1) && !t.can_host(zip0, f1));
    assert_eq!(t.placement.max_distance, Some(25));
    assert_eq!(t.placement.numa_node, Some(0));
    assert_eq!(t.queues(), 3);
    assert_eq!(t.qos, "latency");
    let h = c.instance_type("hash-node1").unwrap();
    assert_eq!(h.placement.numa_node, Some(1));
    assert_eq!(
        c.instance_type("zip-near").unwrap().placement.accelerators,
        Some(vec!["zip0".to_string()])
    );
}

#[test]
fn every_file_in_policies_loads_alone_and_together() {
    let mut n = 0;
    for e in std::fs::read_dir(policies_dir()).unwrap() {
        let p = e.unwrap().path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            let c = load_paths(std::slice::from_ref(&p)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.types.is_empty(), "{} has no types", p.display());
            n += 1;
        }
    }
    assert!(n >= 2);
    // And as one configuration, as `wdvirt daemon --config policies/` reads them.
    let all = load_paths(&[policies_dir()]).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<_> = all.accelerators.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["soft0", "zip0", "sec1"]);
    assert_eq!(all.qos_policies.len(), 5);
    assert_eq!(all.types.len(), 7);
}

#[test]
fn the_schema_names_every_section_and_refuses_unknown_keys() {
    let s = schema();
    let props = s["properties"].as_object().unwrap();
    for k in ["numa_nodes", "accelerators", "qos_policies", "types"] {
        assert!(props.contains_key(k), "{k}");
    }
    assert_eq!(s["additionalProperties"], serde_json::json!(false));
    let text = s.to_string();
    assert!(text.contains("\"maximum\":64"), "ranges are stated");
}

#[test]
fn control_characters_in_names_are_escaped_in_the_rendering() {
    let v = errs(&format!(
        "types:\n  - {{name: \"a\\e[31mb\", queues: 1, operations: [all], qos: gold}}\n{REST}"
    ));
    let shown = v[0].to_string();
    assert!(!shown.contains('\u{1b}'), "{shown:?}");
    assert!(shown.contains("a\\u{1b}[31mb"), "{shown}");
}

#[test]
fn line_text_follows_yaml_line_breaks() {
    use super::validate::line_of;
    assert_eq!(line_of("a\r\nb\rc\nd", 2), "b");
    assert_eq!(line_of("a\r\nb\rc\nd", 3), "c");
    assert_eq!(line_of("a\r\nb\rc\nd", 4), "d");
    assert_eq!(line_of("a", 9), "");
    // A CR-only file is placed on the right line.
    let v = errs("types:\r  - {name: z, queues: 1, operations: [all], qos: nope}\r");
    assert_eq!(v[0].place.line, 2);
    assert_eq!(
        v[0].source_line,
        "  - {name: z, queues: 1, operations: [all], qos: nope}"
    );
}

/// The CI version of `fuzz/fuzz_targets/config_yaml.rs`: seeded mutations of
/// the shipped examples (bytes flipped, lines dropped, duplicated or cut) must
/// give a config or placed errors, never a panic.
#[test]
fn mutated_examples_never_panic_and_errors_stay_inside_the_text() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let seeds = [DEFAULT_YAML, include_str!("../../policies/two-node.yaml")];
    let mut rng = StdRng::seed_from_u64(13);
    let (mut good, mut bad) = (0, 0);
    for i in 0..600 {
        let mut lines: Vec<String> = seeds[i % 2].lines().map(String::from).collect();
        for _ in 0..rng.random_range(1..4) {
            let n = rng.random_range(0..lines.len());
            match rng.random_range(0..4) {
                0 => {
                    lines.remove(n);
                }
                1 => {
                    let l = lines[n].clone();
                    lines.insert(n, l);
                }
                2 => {
                    let cut = lines[n].floor_char_boundary(lines[n].len() / 2);
                    lines[n].truncate(cut);
                }
                _ => {
                    let mut b = lines[n].clone().into_bytes();
                    if !b.is_empty() {
                        let k = rng.random_range(0..b.len());
                        b[k] = b" :-[]{},0123456789\tabz"[rng.random_range(0..22)];
                    }
                    lines[n] = String::from_utf8_lossy(&b).into_owned();
                }
            }
        }
        let text = lines.join("\n");
        match load_str("m.yaml", &text) {
            Ok(_) => good += 1,
            Err(ConfigErrors(v)) => {
                bad += 1;
                assert!(!v.is_empty());
                for e in &v {
                    assert!(e.place.line as usize <= lines.len() + 1, "{e}\n---\n{text}");
                    assert!(e.to_string().starts_with("m.yaml:"), "{e}");
                }
            }
        }
    }
    assert!(good > 0 && bad > 100, "good {good} bad {bad}");
}

#[test]
fn a_file_over_the_cap_is_refused_unread_and_every_bad_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "types: [\n").unwrap();
    let ConfigErrors(v) = load_paths(&[big.clone(), broken.clone()]).unwrap_err();
    assert_eq!(v.len(), 2, "{}", ConfigErrors(v.clone()));
    assert_eq!(
        v[0].to_string(),
        format!(
            "{}: error: cannot read: larger than 4 MiB: not a configuration file",
            big.display()
        )
    );
    assert_eq!(v[1].place.file, broken.display().to_string());
    // At the cap exactly, a file is read.
    std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize]).unwrap();
    assert_eq!(load_paths(&[big]).unwrap(), Config::default());
}

#[test]
fn deep_nesting_hits_the_parsers_recursion_limit() {
    let deep = format!("types: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let v = errs(&deep);
    assert_eq!(v[0].place.line, 1);
    assert_eq!(v[0].error.to_string(), "recursion limit exceeded");
}

#[test]
fn anchors_work_and_an_alias_error_points_at_the_alias() {
    let v = errs("qos_policies:\n  - {name: gold, weight: &w 0}\n  - {name: iron, weight: *w}\n");
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                2,
                29,
                "weight 0 is out of range (expected 1..=10000)".to_string()
            ),
            (
                3,
                26,
                "weight 0 is out of range (expected 1..=10000)".to_string()
            ),
        ]
    );
    let c = load_str(
        "t.yaml",
        "qos_policies:\n  - {name: gold, weight: &w 7}\n  - {name: iron, weight: *w}\n",
    )
    .unwrap();
    assert_eq!(c.qos_policy("iron").unwrap().weight, 7);
}

#[test]
fn a_shorthand_missing_half_says_which() {
    let (l, c, m) = one("types:\n  - name: z\n    queues: 1\n    qos: gold\n");
    assert_eq!((l, c), (2, 11));
    assert_eq!(m, "queues needs operations (what the queues may run)");
}

#[test]
fn a_long_line_is_shown_as_a_window_around_the_caret() {
    let pad = " ".repeat(300);
    let v = errs(&format!(
        "types: [{{name: z,{pad} queues: 1, operations: [all], qos: nope}}]\n"
    ));
    let shown = v[0].to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert!(
        lines[2].starts_with(" 1 | …") && lines[2].contains("qos: nope"),
        "{shown}"
    );
    assert!(lines[2].chars().count() < 140, "{}", lines[2].len());
    // The caret is under the `n` of `nope`.
    let caret = lines[3].chars().count() - 1;
    assert_eq!(lines[2].chars().nth(caret), Some('n'), "{shown}");
}

#[test]
fn a_pair_linked_twice_and_a_distance_that_differs_by_direction_are_placed() {
    let v = errs(
        "numa_nodes:\n  - {id: 0, distances: {1: 20}}\n  - {id: 1, distances: {0: 30}}\naccelerators:\n  - name: a\n    backend: soft\n    engines: 1\n    queue_pairs: 1\n    operations: [all]\n    pasids: 1\n    numa_node: 0\n    links:\n      - {to: node0, distance: 5}\n      - {to: b, distance: 4}\n  - name: b\n    backend: soft\n    engines: 1\n    queue_pairs: 1\n    operations: [all]\n    pasids: 1\n    links:\n      - {to: a, distance: 4}\n",
    );
    let got: Vec<_> = v
        .iter()
        .map(|e| (e.place.line, e.place.column, e.error.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                3,
                28,
                "node1–node0 distance 30, but node0 gives node1 20 (expected the same both ways)"
                    .to_string()
            ),
            (
                13,
                14,
                "a and node0 are already linked (a `numa_node` is a link too; expected one link per pair)"
                    .to_string()
            ),
            (
                22,
                14,
                "b and a are already linked (a `numa_node` is a link too; expected one link per pair)"
                    .to_string()
            ),
        ]
    );
    // The same distance from both ends is one edge, and so is one end alone.
    let c = load_str(
        "t.yaml",
        "numa_nodes:\n  - {id: 0, distances: {1: 20}}\n  - {id: 1, distances: {0: 20}}\n",
    )
    .unwrap();
    assert_eq!(c.numa_nodes.len(), 2);
}

#[test]
fn names_discovery_found_may_be_named_without_being_declared() {
    let host = crate::config::HostNames {
        accelerators: vec!["hisi_zip-0".into()],
        numa_nodes: vec![0, 2],
    };
    let text = "accelerators:\n  - {name: s, backend: soft, engines: 1, queue_pairs: 4, operations: [all], pasids: 4, numa_node: 2, links: [{to: hisi_zip-0, distance: 5}]}\n";
    let cfg = crate::config::load_str_on("t.yaml", text, &host).unwrap();
    assert_eq!(cfg.accelerators[0].numa_node, Some(2));
    // Without discovery they are unknown, and the message lists what is.
    let e = crate::config::load_str("t.yaml", text).unwrap_err();
    assert!(e.to_string().contains("unknown NUMA node 2"), "{e}");
    let e = crate::config::load_str_on("t.yaml", &text.replace("hisi_zip-0", "hisi_zip-9"), &host)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown accelerator 'hisi_zip-9' (defined: s; found on this host: hisi_zip-0; NUMA nodes as nodeN: 0, 2)"),
        "{e}"
    );
}

#[test]
fn the_daemon_section_is_read_checked_for_shape_and_said_once() {
    let c = ok("daemon:\n  api_group: wdvirt\n  instance_owner: '64055'\n");
    assert_eq!(c.daemon.api_group.as_deref(), Some("wdvirt"));
    assert_eq!(c.daemon.instance_owner.as_deref(), Some("64055"));
    assert_eq!(ok("").daemon, DaemonSettings::default());
    let (l, col, m) = one("daemon:\n  api_group: 'a b'\n");
    assert_eq!((l, col), (2, 14), "{m}");
    assert!(
        m.starts_with("invalid api_group 'a b' (expected a name of 1 to 32"),
        "{m}"
    );
    let (l, _, m) = one("daemon:\n  instance_owner: -x\n");
    assert_eq!(l, 2);
    assert!(m.starts_with("invalid instance_owner '-x'"), "{m}");
    let (_, _, m) = one("daemon:\n  owner: x\n");
    assert!(m.contains("owner"), "unknown keys are refused: {m}");
    // Two files each with a daemon section: the second is a duplicate.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, format!("daemon:\n  api_group: x\n{REST}")).unwrap();
    std::fs::write(&b, "daemon:\n  api_group: y\n").unwrap();
    let e = load_paths(&[a, b]).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(
        e.0[0]
            .error
            .to_string()
            .starts_with("duplicate section 'daemon'"),
        "{e}"
    );
}

#[test]
fn daemon_limits_are_read_checked_against_their_ranges_and_default_when_unset() {
    let c = ok("daemon:\n  limits:\n    max_dma_maps: 8\n    message_timeout_ms: 300\n");
    let l = c.daemon.limits.transport_limits();
    let d = crate::transport::Limits::default();
    assert_eq!((l.max_dma_maps, l.message_timeout_ms), (8, 300));
    assert_eq!(
        (l.max_msg_fds, l.max_message_size, l.log_lines_per_sec),
        (d.max_msg_fds, d.max_message_size, d.log_lines_per_sec)
    );
    assert_eq!(ok("").daemon.limits.transport_limits(), d);
    let all = ok(
        "daemon:\n  limits: {max_message_size: 4096, max_msg_fds: 252, max_dma_maps: 65535, \
                  message_timeout_ms: 600000, log_lines_per_sec: 0}\n",
    )
    .daemon
    .limits
    .transport_limits();
    assert_eq!(
        (
            all.max_message_size,
            all.max_msg_fds,
            all.max_dma_maps,
            all.message_timeout_ms,
            all.log_lines_per_sec
        ),
        (4096, 252, 65535, 600_000, 0)
    );
    // Each value outside its range: refused where it is written, the range named.
    for (yaml, col, want) in [
        (
            "max_msg_fds: 253",
            18,
            "max_msg_fds 253 is out of range (expected 1 to 252)",
        ),
        (
            "max_msg_fds: 0",
            18,
            "max_msg_fds 0 is out of range (expected 1 to 252)",
        ),
        (
            "max_dma_maps: 65536",
            19,
            "max_dma_maps 65536 is out of range (expected 1 to 65535)",
        ),
        (
            "max_message_size: 4095",
            23,
            "(expected 4096 to 1052672 bytes)",
        ),
        (
            "message_timeout_ms: 5",
            25,
            "(expected 10 to 600000 milliseconds)",
        ),
    ] {
        let (l, c, m) = one(&format!("daemon:\n  limits:\n    {yaml}\n"));
        assert_eq!((l, c), (3, col), "{yaml}: {m}");
        assert!(m.contains(want), "{yaml}: {m}");
    }
    let (_, _, m) = one("daemon:\n  limits:\n    max_fds: 3\n");
    assert!(m.contains("max_fds"), "unknown keys are refused: {m}");
    let (_, _, m) = one("daemon:\n  limits:\n    max_dma_maps: -1\n");
    assert!(!m.is_empty());
}

/// The schema's limits (their ranges and the words of their descriptions,
/// written by hand in `raw.rs`) say what `transport::Limits` enforces, and
/// so do the loader's messages.
#[test]
fn the_schemas_limit_ranges_are_the_transports() {
    use crate::transport::Limits as L;
    let schema = crate::config::schema();
    let defs = schema
        .get("$defs")
        .or_else(|| schema.get("definitions"))
        .unwrap();
    let props = &defs["Limits"]["properties"];
    let wide = |r: (usize, usize)| (r.0 as u64, r.1 as u64);
    for (name, (lo, hi)) in [
        (
            "max_message_size",
            (
                u64::from(*L::MESSAGE_SIZE_RANGE.start()),
                u64::from(*L::MESSAGE_SIZE_RANGE.end()),
            ),
        ),
        (
            "max_msg_fds",
            wide((*L::MSG_FDS_RANGE.start(), *L::MSG_FDS_RANGE.end())),
        ),
        (
            "max_dma_maps",
            wide((*L::DMA_MAPS_RANGE.start(), *L::DMA_MAPS_RANGE.end())),
        ),
        (
            "message_timeout_ms",
            (
                *L::MESSAGE_TIMEOUT_MS_RANGE.start(),
                *L::MESSAGE_TIMEOUT_MS_RANGE.end(),
            ),
        ),
    ] {
        let p = &props[name];
        assert_eq!(p["minimum"].as_u64(), Some(lo), "{name}: {p}");
        assert_eq!(p["maximum"].as_u64(), Some(hi), "{name}: {p}");
        let words = p["description"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(words.contains(&format!("{lo} to {hi}")), "{name}: {words}");
        // The loader refuses one past the end, naming the same range.
        let (_, _, m) = one(&format!("daemon:\n  limits:\n    {name}: {}\n", hi + 1));
        assert!(m.contains(&format!("{lo} to {hi}")), "{name}: {m}");
    }
}
