//! `wdvirt validate` and `wdvirt schema`, run as the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wdvirt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .args(args)
        .env_remove("WDVIRT_LOG")
        .output()
        .expect("run wdvirt")
}

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn validate_accepts_the_shipped_policies_and_counts_them() {
    let p = policies();
    let o = wdvirt(&["validate", p.join("default.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "ok: 1 accelerators, 4 types, 3 policies\n");
    let o = wdvirt(&["validate", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "ok: 3 accelerators, 7 types, 5 policies\n");
}

const BAD: &str = "\
qos_policies:
  - name: gold
    weight: 100
  - name: bronze
    weight: 10
types:
  - name: z
    queues: 1
    operations: [all]
    qos: bogus
";

#[test]
fn validate_prints_each_error_with_place_line_and_caret_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, BAD).unwrap();
    let o = wdvirt(&["validate", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let err = text(&o.stderr);
    let want = format!(
        "{}:10:10: error: unknown QoS policy 'bogus' (defined: gold, bronze)\n    |\n 10 |     qos: bogus\n    |          ^\n",
        f.display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(
        err.contains("wdvirt: 1 error in the configuration"),
        "{err}"
    );
}

#[test]
fn validate_json_reports_errors_and_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, BAD).unwrap();
    let o = wdvirt(&["validate", "--json", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(10), Some(10))
    );
    assert_eq!(
        e["message"],
        "unknown QoS policy 'bogus' (defined: gold, bronze)"
    );
    assert_eq!(e["file"], f.display().to_string());

    let p = policies().join("default.yaml");
    let o = wdvirt(&["validate", "--json", p.to_str().unwrap()]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["types"], 4);
    assert_eq!(v["config"]["accelerators"][0]["name"], "soft0");
    assert_eq!(v["config"]["accelerators"][0]["ops"], wdvirt_abi::ALL_OPS);
}

#[test]
fn validate_reports_a_missing_file_and_needs_an_argument() {
    let o = wdvirt(&["validate", "/nonexistent/wdvirt.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("/nonexistent/wdvirt.yaml: error: cannot read:"),
        "{}",
        text(&o.stderr)
    );
    let o = wdvirt(&["validate"]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");
}

#[test]
fn schema_is_json_and_describes_every_section() {
    let o = wdvirt(&["schema"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["$schema"].as_str().unwrap().contains("json-schema.org"));
    let props = v["properties"].as_object().unwrap();
    for k in ["numa_nodes", "accelerators", "qos_policies", "types"] {
        assert!(props.contains_key(k), "{k}");
    }
    assert_eq!(v["additionalProperties"], false);
    // Every key the shipped examples use is a property the schema knows.
    let defs = v["$defs"].as_object().unwrap();
    for (def, keys) in [
        (
            "Accelerator",
            &[
                "name",
                "backend",
                "engines",
                "queue_pairs",
                "operations",
                "pasids",
                "numa_node",
                "cpus",
                "links",
            ][..],
        ),
        (
            "Type",
            &[
                "name",
                "queues",
                "operations",
                "functions",
                "max_depth",
                "qos",
                "placement",
            ][..],
        ),
        (
            "Placement",
            &["max_distance", "accelerators", "numa_node"][..],
        ),
        (
            "QosPolicy",
            &["name", "weight", "rate", "max_in_flight"][..],
        ),
        ("NumaNode", &["id", "cpus", "distances"][..]),
    ] {
        let p = defs[def]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{def}"));
        for k in keys {
            assert!(p.contains_key(*k), "{def}.{k}");
        }
        assert_eq!(defs[def]["additionalProperties"], false, "{def}");
    }
    assert_eq!(defs["Accelerator"]["properties"]["engines"]["maximum"], 64);
}

#[test]
fn help_teaches_with_examples() {
    let o = wdvirt(&["validate", "--help"]);
    assert!(text(&o.stdout).contains("wdvirt validate policies/default.yaml"));
    let o = wdvirt(&["schema", "--help"]);
    assert!(text(&o.stdout).contains("wdvirt schema > wdvirt.schema.json"));
}

/// A small JSON Schema checker for what schemars emits here: `$ref`, `anyOf`,
/// `type` (one or a list), `properties` + `additionalProperties: false`,
/// `required`, `items`, `patternProperties` (digits only), `minimum`/`maximum`.
/// Returns the path of the first value the schema refuses.
fn check(
    root: &serde_json::Value,
    s: &serde_json::Value,
    v: &serde_json::Value,
    path: &str,
) -> Result<(), String> {
    use serde_json::Value as J;
    if let Some(r) = s["$ref"].as_str() {
        let name = r.strip_prefix("#/$defs/").expect("local ref");
        return check(root, &root["$defs"][name], v, path);
    }
    if let Some(alts) = s["anyOf"].as_array() {
        return alts
            .iter()
            .find_map(|a| check(root, a, v, path).ok())
            .ok_or_else(|| format!("{path}: matches no alternative"));
    }
    let kind = match v {
        J::Null => "null",
        J::Bool(_) => "boolean",
        J::Number(n) if n.is_u64() || n.is_i64() => "integer",
        J::Number(_) => "number",
        J::String(_) => "string",
        J::Array(_) => "array",
        J::Object(_) => "object",
    };
    let allowed: Vec<&str> = match &s["type"] {
        J::String(t) => vec![t.as_str()],
        J::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
        _ => vec![kind],
    };
    if !allowed.contains(&kind) {
        return Err(format!("{path}: {kind} where {allowed:?} expected"));
    }
    if let Some(n) = v.as_u64()
        && (s["minimum"].as_u64().is_some_and(|m| n < m)
            || s["maximum"].as_u64().is_some_and(|m| n > m))
    {
        return Err(format!("{path}: {n} out of range"));
    }
    if let J::Array(items) = v {
        for (i, item) in items.iter().enumerate() {
            check(root, &s["items"], item, &format!("{path}[{i}]"))?;
        }
    }
    if let J::Object(map) = v {
        for req in s["required"].as_array().into_iter().flatten() {
            if !map.contains_key(req.as_str().unwrap()) {
                return Err(format!("{path}: missing {req}"));
            }
        }
        for (k, val) in map {
            let sub = if let Some(p) = s["properties"].get(k) {
                p
            } else if let Some(p) = s["patternProperties"]
                .get("^\\d+$")
                .filter(|_| k.bytes().all(|b| b.is_ascii_digit()))
            {
                p
            } else if s["additionalProperties"] == false {
                return Err(format!("{path}: unknown key {k}"));
            } else {
                continue;
            };
            check(root, sub, val, &format!("{path}.{k}"))?;
        }
    }
    Ok(())
}

#[test]
fn the_schema_accepts_every_shipped_policy_file_and_refuses_a_bad_key() {
    let o = wdvirt(&["schema"]);
    let schema: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(policies()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let doc: serde_json::Value =
                serde_saphyr::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            check(&schema, &schema, &doc, "$").unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 2);
    let bad: serde_json::Value = serde_saphyr::from_str(
        "types:\n  - {name: z, qos: g, queues: 1, operations: [all], colour: red}\n",
    )
    .unwrap();
    assert_eq!(
        check(&schema, &schema, &bad, "$"),
        Err("$.types[0]: unknown key colour".into())
    );
    let bad: serde_json::Value = serde_saphyr::from_str("accelerators:\n  - {name: a, backend: soft, engines: 65, queue_pairs: 1, operations: [all], pasids: 1}\n").unwrap();
    assert_eq!(
        check(&schema, &schema, &bad, "$"),
        Err("$.accelerators[0].engines: 65 out of range".into())
    );
}

#[test]
fn daemon_refuses_a_metrics_address_that_is_neither_port_nor_ip_port() {
    let o = wdvirt(&["daemon", "--metrics-addr", "localhost:x"]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    let err = text(&o.stderr);
    assert!(
        err.contains(
            "'localhost:x' is neither a PORT nor an IP:PORT (e.g. 9808, 127.0.0.1:9808, [::1]:9808)"
        ),
        "{err}"
    );
}
