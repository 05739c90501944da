//! `wdvirt daemon` driven as an operator drives it: a real daemon process,
//! the CLI as a process for every change, `--json` read back, a VMM on a
//! daemon-started instance, and the daemon killed and restarted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::Device;

mod common;

use common::daemon::{Daemon, wdvirt};

/// One small host: a soft accelerator of 8 queue pairs and 3 PASIDs, so
/// that running out is quick to reach.
const SMALL_HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 8
    operations: [all]
    pasids: 3
qos_policies:
  - name: silver
    weight: 100
    max_in_flight: 64
  - name: gold
    weight: 400
types:
  - name: quad
    queues: 4
    operations: [all]
    max_depth: 256
    qos: silver
  - name: hash
    queues: 1
    operations: [sha256, crc32c]
    qos: silver
"#;

/// The daemon with its stderr kept: `term()` reads what it logged.
fn daemon(config: &str) -> Daemon {
    Daemon::builder(config).capture_stderr().start()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn define_start_list_stop_undefine_through_the_cli() {
    let mut d = daemon(SMALL_HOST);
    // define prints the UUID alone on stdout.
    let out = d.cli(&["define", "--type", "quad", "--name", "vm1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uuid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(uuid::Uuid::parse_str(&uuid).is_ok(), "{uuid}");

    assert!(names(&d.json(&["list"])).is_empty(), "defined, not started");
    let defined = d.json(&["list", "--defined"]);
    assert_eq!(names(&defined), ["vm1"]);
    assert_eq!(defined[0]["state"], "defined");
    assert_eq!(defined[0]["uuid"], uuid);

    // start prints the socket path alone on stdout; by UUID works too.
    let out = d.cli(&["start", &uuid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(socket, d.run_dir().join("vm1.sock"));
    assert!(socket.exists());
    let list = d.json(&["list"]);
    assert_eq!(names(&list), ["vm1"]);
    assert_eq!(list[0]["state"], "started");
    assert_eq!(list[0]["qos"], "silver");
    assert!(list[0]["pasid"].as_u64().unwrap() >= 1);

    // What each wrong move gets.
    assert!(d.refused(&["start", "vm1"]).contains("already started"));
    assert!(
        d.refused(&["undefine", "vm1"])
            .contains("stop it before undefining")
    );
    assert!(
        d.refused(&["stop", "vm9"])
            .contains("no instance named or with UUID 'vm9'")
    );
    let e = d.refused(&["define", "--type", "bogus"]);
    assert!(
        e.contains("unknown instance type 'bogus'") && e.contains("quad"),
        "{e}"
    );
    let e = d.refused(&["define", "--type", "quad", "--name", "vm1"]);
    assert!(e.contains("already defined"), "{e}");
    let e = d.refused(&["define", "--type", "quad", "--name", "../etc"]);
    assert!(e.contains("must be 1-64 characters"), "{e}");
    let e = d.refused(&["define", "--type", "quad", "--qos", "platinum"]);
    assert!(e.contains("unknown QoS policy 'platinum'"), "{e}");
    assert!(d.refused(&["modify", "vm1"]).contains("nothing to change"));

    // modify: the QoS override shows at once; a type change needs a stop.
    let v = d.json(&["modify", "vm1", "--qos", "gold", "--auto"]);
    assert_eq!(
        (v["qos"].as_str(), v["auto"].as_bool()),
        (Some("gold"), Some(true))
    );
    assert!(
        d.refused(&["modify", "vm1", "--type", "hash"])
            .contains("stop it before changing its type")
    );

    let v = d.json(&["stop", "vm1"]);
    assert_eq!(v["state"], "stopped");
    assert!(!socket.exists(), "the socket goes with the instance");
    assert!(
        d.refused(&["stop", "vm1"])
            .contains("only a started instance")
    );
    d.json(&["undefine", "vm1"]);
    assert!(names(&d.json(&["list", "--defined"])).is_empty());
    let (status, _) = d.term();
    assert!(status.success());
}

#[test]
fn available_instances_fall_and_rise_and_exhaustion_names_the_resource() {
    let d = daemon(SMALL_HOST);
    // 8 queue pairs: two 4-queue instances, or eight 1-queue ones.
    assert_eq!(
        (d.available("quad"), d.available("hash")),
        (2, 3),
        "3 PASIDs cap hash"
    );
    for n in ["q1", "q2", "q3"] {
        d.json(&["define", "--type", "quad", "--name", n]);
    }
    d.json(&["start", "q1"]);
    assert_eq!((d.available("quad"), d.available("hash")), (1, 2));
    let types = d.json(&["types"]);
    assert_eq!(types[1]["available_by_accelerator"]["soft0"], 1, "{types}");
    d.json(&["start", "q2"]);
    assert_eq!((d.available("quad"), d.available("hash")), (0, 0));
    // The third does not fit: the message names the pool and the accelerator.
    let e = d.refused(&["start", "q3"]);
    assert!(
        e.contains("cannot place instance 'q3'")
            && e.contains("soft0: 0 of 8 queue pairs free, need 4"),
        "{e}"
    );
    assert_eq!(
        d.json(&["list", "--defined"])[2]["state"],
        "defined",
        "a refused start changes nothing"
    );
    d.json(&["stop", "q1"]);
    assert_eq!(
        d.available("quad"),
        1,
        "a stopped instance's queue pairs come back"
    );
    d.json(&["start", "q3"]);
    // PASIDs run out before queue pairs for small instances.
    d.json(&["stop", "q2"]);
    d.json(&["stop", "q3"]);
    for n in ["h1", "h2", "h3", "h4"] {
        d.json(&["define", "--type", "hash", "--name", n]);
    }
    for n in ["h1", "h2", "h3"] {
        d.json(&["start", n]);
    }
    assert_eq!(d.available("hash"), 0);
    let e = d.refused(&["start", "h4"]);
    assert!(e.contains("soft0: PASIDs exhausted (3)"), "{e}");
}

#[test]
fn a_daemon_started_instance_serves_a_vmm_and_shows_it_attached() {
    let mut d = daemon(SMALL_HOST);
    d.json(&["define", "--type", "quad", "--name", "vm1"]);
    let v = d.json(&["start", "vm1"]);
    let socket = PathBuf::from(v["socket"].as_str().unwrap());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    {
        let vmm = Arc::new(
            LoopbackVmm::connect(&socket, GuestRam::new(common::RAM_BASE, 8 << 20).unwrap())
                .unwrap(),
        );
        let dev = Device::probe(vmm.clone()).unwrap();
        assert_eq!(dev.info().num_queues, 4);
        assert_eq!(dev.info().max_depth, 256);
        dev.enable().unwrap();
        let pool = vmm.dma_pool().unwrap();
        let mut q = dev.queue(2, 8, dev.info().cap_ops, &pool).unwrap();
        assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
        let z = q.compress(wdvirt_abi::Format::Zlib, 0, &data).unwrap();
        let mut back = Vec::new();
        use std::io::Read;
        flate2::read::ZlibDecoder::new(&z[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data, "the device's zlib stream decodes to the input");
        let list = d.json(&["list"]);
        assert_eq!(list[0]["state"], "attached", "{list}");
        let queues = &list[0]["report"]["queues"];
        assert_eq!(queues[2]["jobs_ok"], 2, "{queues}");
        // The API reaches the live device between the VMM's messages: what
        // the guest set up shows as it is.
        assert_eq!(
            list[0]["report"]["live"],
            serde_json::json!({"bus_master": true, "enabled": true,
                               "queues_enabled": [false, false, true, false]}),
            "{list}"
        );
    }
    // The VMM went away: the instance is started again, waiting for one.
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.json(&["list"])[0]["state"] != "started" {
        assert!(
            Instant::now() < deadline,
            "still attached after the VMM left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM with a VMM attached names the instance it leaves without a device.
    let _vmm =
        LoopbackVmm::connect(&socket, GuestRam::new(common::RAM_BASE, 1 << 20).unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.json(&["list"])[0]["state"] != "attached" {
        assert!(
            Instant::now() < deadline,
            "the second VMM never showed as attached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, err) = d.term();
    assert!(status.success());
    assert!(
        err.contains("stopped with VMs still attached to: vm1"),
        "{err}"
    );
}

#[test]
fn bad_api_requests_get_typed_errors_and_change_nothing() {
    use std::io::{Read, Write};
    let d = daemon(SMALL_HOST);
    let raw = |req: String| -> (u16, Value) {
        let mut s = std::os::unix::net::UnixStream::connect(d.api()).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out[9..12].parse().unwrap();
        let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    };
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let (st, v) = raw(post("/v1/instances", r#"{"type": "quad", "bogus": 1}"#));
    assert_eq!((st, v["kind"].as_str()), (400, Some("invalid")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("bogus"), "{v}");
    let (st, v) = raw(post("/v1/instances", r#"{"type": "#));
    assert_eq!((st, v["kind"].as_str()), (400, Some("invalid")), "{v}");
    let (st, v) = raw(post("/v1/instances", r#"{"type": "quad", "numa": 7}"#));
    assert_eq!((st, v["kind"].as_str()), (400, Some("invalid")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("NUMA node 7"), "{v}");
    let (st, v) = raw(post("/v1/instances/nobody/start", ""));
    assert_eq!(
        (st, v["kind"].as_str()),
        (404, Some("no-such-instance")),
        "{v}"
    );
    let (st, v) = raw("GET /v2/everything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into());
    assert_eq!((st, v["kind"].as_str()), (404, Some("invalid")), "{v}");
    assert!(
        names(&d.json(&["list", "--defined"])).is_empty(),
        "nothing was defined"
    );
    // The status of each kind the CLI reports: 201, 409, 507.
    for n in ["q1", "q2", "q3"] {
        let (st, v) = raw(post(
            "/v1/instances",
            &format!(r#"{{"type": "quad", "name": "{n}"}}"#),
        ));
        assert_eq!((st, v["name"].as_str()), (201, Some(n)), "{v}");
    }
    let (st, v) = raw(post("/v1/instances", r#"{"type": "quad", "name": "q1"}"#));
    assert_eq!(
        (st, v["kind"].as_str()),
        (409, Some("already-exists")),
        "{v}"
    );
    for n in ["q1", "q2"] {
        assert_eq!(raw(post(&format!("/v1/instances/{n}/start"), "")).0, 200);
    }
    let (st, v) = raw(post("/v1/instances/q1/start", ""));
    assert_eq!((st, v["kind"].as_str()), (409, Some("wrong-state")), "{v}");
    let (st, v) = raw(post("/v1/instances/q3/start", ""));
    assert_eq!((st, v["kind"].as_str()), (507, Some("placement")), "{v}");
}

#[test]
fn definitions_and_auto_instances_survive_sigkill() {
    // Without the fd holder, a started instance dies with the daemon.
    let mut d = Daemon::builder(SMALL_HOST).arg("--no-holder").start();
    d.json(&["define", "--type", "quad", "--name", "auto1", "--auto"]);
    d.json(&["define", "--type", "hash", "--name", "manual1"]);
    d.json(&["start", "manual1"]);
    d.kill9();
    d.spawn();
    let list = d.json(&["list", "--defined"]);
    assert_eq!(names(&list), ["auto1", "manual1"]);
    assert_eq!(
        list[0]["state"], "started",
        "auto instances start with the daemon"
    );
    assert_eq!(list[1]["state"], "defined", "manual ones wait for a start");
    assert!(d.run_dir().join("auto1.sock").exists());
    assert!(!d.holder().exists(), "--no-holder starts no holder");
    // The killed daemon's socket file was stale; starting again replaces it.
    d.json(&["start", "manual1"]);
    let (status, _) = d.term();
    assert!(status.success());
}

#[test]
fn with_the_fd_holder_every_started_instance_is_back_after_sigkill_and_a_stop_lets_go() {
    let mut d = daemon(SMALL_HOST);
    d.json(&["define", "--type", "quad", "--name", "auto1", "--auto"]);
    d.json(&["define", "--type", "hash", "--name", "manual1"]);
    d.json(&["define", "--type", "hash", "--name", "idle"]);
    d.json(&["start", "manual1"]);
    d.kill9();
    d.spawn();
    let list = d.json(&["list", "--defined"]);
    assert_eq!(names(&list), ["auto1", "idle", "manual1"]);
    // The started one was taken over (no VMM: nothing to rebuild), the
    // one never started stays defined.
    assert_eq!(list[2]["state"], "started", "{}", list[2]);
    assert_eq!(list[1]["state"], "defined");
    // A stop lets the holder go of it: the next restart leaves it stopped.
    d.json(&["stop", "manual1"]);
    d.kill9();
    d.spawn();
    let list = d.json(&["list", "--defined"]);
    assert_eq!(list[2]["state"], "defined", "{}", list[2]);
    assert_eq!(list[0]["state"], "started");
    // A clean stop stops everything and ends the holder, which keeps
    // nothing then.
    let (status, _) = d.term();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(3);
    while wdvirt::restart::holder::HolderClient::connect(&d.holder()).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the holder outlived a clean stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Used by more than one test below.
#[allow(dead_code)]
fn uuids_on_disk(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Room for hundreds of instances, so a storm never runs out.
const ROOMY_HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 4096
    operations: [all]
    pasids: 4096
qos_policies:
  - name: silver
    weight: 100
types:
  - name: one
    queues: 1
    operations: [crc32c]
    qos: silver
"#;

/// The daemon is killed with SIGKILL at a random moment while two clients
/// define and start instances as fast as they can; after each restart every
/// definition the CLI saw acknowledged is there, every file on disk is whole,
/// and every `auto` instance is started. `WDVIRT_KILL_ROUNDS` (default 50)
/// sets the number of kills; `docs/daemon.md` records a longer run.
#[test]
fn sigkill_during_define_and_start_storms_loses_no_acknowledged_definition() {
    use rand::{Rng, SeedableRng};
    let rounds: u32 = std::env::var("WDVIRT_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = daemon(ROOMY_HOST);
    let mut acked: Vec<(String, bool)> = Vec::new();
    for round in 0..rounds {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients: Vec<_> = (0..2)
            .map(|t| {
                let (api, stop) = (d.api(), stop.clone());
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0.. {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let name = format!("r{round}-c{t}-{i}");
                        let auto = i % 2 == 0;
                        let mut args = vec!["define", "--type", "one", "--name", &name];
                        if auto {
                            args.push("--auto");
                        }
                        let ok = wdvirt()
                            .arg("--api")
                            .arg(&api)
                            .args(&args)
                            .output()
                            .unwrap();
                        if !ok.status.success() {
                            break;
                        }
                        mine.push((name.clone(), auto));
                        let _ = wdvirt()
                            .arg("--api")
                            .arg(&api)
                            .args(["start", &name])
                            .output();
                    }
                    mine
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
        d.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            acked.extend(c.join().unwrap());
        }
        d.spawn();
        // Nothing half-written: every file is a whole definition, and the
        // temp files of writes cut short are gone.
        for f in uuids_on_disk(&d.state_dir()) {
            assert!(!f.starts_with(".tmp"), "{f} left behind");
            let text = std::fs::read(d.state_dir().join("instances").join(&f)).unwrap();
            let v: Value = serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("round {round}: {f} is not whole: {e}"));
            assert_eq!(format!("{}.json", v["uuid"].as_str().unwrap()), f);
        }
        let list = d.json(&["list", "--defined"]);
        let by_name: std::collections::BTreeMap<String, &Value> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v))
            .collect();
        for (name, auto) in &acked {
            let v = by_name
                .get(name)
                .unwrap_or_else(|| panic!("round {round} (seed {seed}): acknowledged {name} lost"));
            assert_eq!(v["auto"].as_bool(), Some(*auto), "{name}");
        }
        for v in by_name.values() {
            if v["auto"] == true {
                assert_eq!(
                    v["state"], "started",
                    "round {round}: auto {} not back",
                    v["name"]
                );
            }
        }
    }
    assert!(
        acked.len() as u32 >= rounds / 2,
        "the storms defined too little: {}",
        acked.len()
    );
    let (status, _) = d.term();
    assert!(status.success());
}

/// Two NUMA nodes 21 apart; a compression and a hashing accelerator on
/// each. zip1 and sec1 share a switch (distance 4); zip0 and sec0 reach each
/// other only through node 0 (10 + 10).
const TWO_NODES: &str = r#"
numa_nodes:
  - {id: 0, cpus: "0", distances: {0: 10, 1: 21}}
  - {id: 1, cpus: "1", distances: {0: 21, 1: 10}}
accelerators:
  - {name: zip0, backend: soft, engines: 1, queue_pairs: 8, pasids: 16, numa_node: 0,
     operations: [deflate-compress, deflate-decompress]}
  - {name: sec0, backend: soft, engines: 1, queue_pairs: 8, pasids: 16, numa_node: 0,
     operations: [sha256, crc32c]}
  - {name: zip1, backend: soft, engines: 1, queue_pairs: 8, pasids: 16, numa_node: 1,
     operations: [deflate-compress, deflate-decompress], links: [{to: sec1, distance: 4}]}
  - {name: sec1, backend: soft, engines: 1, queue_pairs: 8, pasids: 16, numa_node: 1,
     operations: [sha256, crc32c]}
qos_policies:
  - {name: silver, weight: 100}
types:
  - name: zip-hash
    functions:
      - {queues: 2, operations: [deflate-compress, deflate-decompress]}
      - {queues: 1, operations: [sha256, crc32c]}
    qos: silver
    placement: {max_distance: 25}
  - name: zip-hash-near
    functions:
      - {queues: 1, operations: [deflate-compress]}
      - {queues: 1, operations: [sha256]}
    qos: silver
    placement: {max_distance: 12}
"#;

#[test]
fn a_two_function_type_is_placed_on_the_closest_pair_and_serves_both_functions() {
    let d = daemon(TWO_NODES);
    // No NUMA hint: the pair sharing a switch (4) beats the pair meeting at
    // node 0 (20).
    d.json(&["define", "--type", "zip-hash", "--name", "a"]);
    let v = d.json(&["start", "a"]);
    let placed: Vec<(&str, Vec<u64>)> = v["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let q = f["guest_queues"].as_array().unwrap();
            (
                f["accelerator"].as_str().unwrap(),
                q.iter().map(|x| x.as_u64().unwrap()).collect(),
            )
        })
        .collect();
    assert_eq!(placed, [("zip1", vec![0, 1]), ("sec1", vec![2])], "{v}");
    // Near node 0 the local pair wins: zip0 and sec0 are 10 from node 0 and
    // 20 from each other (total 40), zip1 and sec1 31 from node 0 (total 66).
    d.json(&["define", "--type", "zip-hash", "--name", "b", "--numa", "0"]);
    let v = d.json(&["start", "b"]);
    assert_eq!(v["placement"][0]["accelerator"], "zip0", "{v}");
    assert_eq!(v["placement"][1]["accelerator"], "sec0", "{v}");

    // The guest sees one device: queues 0-1 compress, queue 2 hashes, each
    // advertising only its own operations, and each runs on its accelerator.
    let socket = PathBuf::from(d.json(&["list"])[0]["socket"].as_str().unwrap());
    let vmm = Arc::new(
        LoopbackVmm::connect(&socket, GuestRam::new(common::RAM_BASE, 8 << 20).unwrap()).unwrap(),
    );
    let dev = Device::probe(vmm.clone()).unwrap();
    assert_eq!(dev.info().num_queues, 3);
    let deflate =
        wdvirt_abi::Opcode::DeflateCompress.bit() | wdvirt_abi::Opcode::DeflateDecompress.bit();
    let hash = wdvirt_abi::Opcode::Sha256.bit() | wdvirt_abi::Opcode::Crc32c.bit();
    assert_eq!(dev.queue_cap_ops(0).unwrap(), deflate);
    assert_eq!(dev.queue_cap_ops(1).unwrap(), deflate);
    assert_eq!(dev.queue_cap_ops(2).unwrap(), hash);
    assert_eq!(dev.info().cap_ops, deflate | hash);
    dev.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
    let mut zq = dev.queue(1, 8, deflate, &pool).unwrap();
    let packed = zq.compress(wdvirt_abi::Format::Deflate, 0, &data).unwrap();
    assert_eq!(
        zq.decompress(wdvirt_abi::Format::Deflate, &packed, data.len())
            .unwrap(),
        data
    );
    let mut hq = dev.queue(2, 8, hash, &pool).unwrap();
    assert_eq!(hq.crc32c(b"123456789").unwrap(), 0xe306_9283);
    // A queue cannot be given an operation outside its Q_CAP_OPS: the
    // write is refused and latched.
    dev.clear_register_error().unwrap();
    let q_ops = wdvirt_abi::regs::queue(0) + wdvirt_abi::regs::Q_OPS;
    vmm.region_write(0, q_ops.into(), &hash.to_le_bytes())
        .unwrap();
    let fault = dev.last_register_error().unwrap().expect("refused");
    assert_eq!(fault.offset, q_ops, "{fault:?}");
    let list = d.json(&["list"]);
    let q = &list[0]["report"]["queues"];
    assert_eq!(
        (q[1]["jobs_ok"].as_u64(), q[2]["jobs_ok"].as_u64()),
        (Some(2), Some(1)),
        "{q}"
    );

    // A constraint nothing meets is refused, naming it per accelerator:
    // within 12 of each other only zip1 and sec1 are (4), and they are 31
    // from node 0 (10 + 21); zip0 and sec0 are 20 apart.
    d.json(&[
        "define",
        "--type",
        "zip-hash-near",
        "--name",
        "t",
        "--numa",
        "0",
    ]);
    let e = d.refused(&["start", "t"]);
    assert!(e.contains("cannot place instance 't'"), "{e}");
    assert!(e.contains("zip1–node0 distance 31 > max 12"), "{e}");
    assert!(e.contains("sec1–node0 distance 31 > max 12"), "{e}");
    assert!(e.contains("zip0–sec0 distance 20 > max 12"), "{e}");
    // Without the hint it fits on the close pair.
    d.json(&["modify", "t", "--no-numa"]);
    let v = d.json(&["start", "t"]);
    assert_eq!(v["placement"][0]["accelerator"], "zip1", "{v}");
}

/// 8 PASIDs for 12 instances of 1 queue: starts race for them.
const PASID_HOST: &str = r#"
accelerators:
  - {name: soft0, backend: soft, engines: 1, queue_pairs: 64, operations: [all], pasids: 8}
qos_policies:
  - {name: silver, weight: 100}
types:
  - {name: one, queues: 1, operations: [crc32c], qos: silver}
"#;

/// About 1000 start/stop cycles interleaved at random from four threads through the
/// daemon's API: no PASID is ever held by two started instances, a refused
/// start names the exhausted PASIDs, and at the end every PASID is free again.
#[test]
fn pasids_stay_unique_over_1000_starts_and_stops_from_four_threads() {
    use hyper::Method;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use wdvirt::cli::client::ApiClient;
    use wdvirt::daemon::view::InstanceView;

    let d = daemon(PASID_HOST);
    for t in 0..4 {
        for i in 0..3 {
            d.json(&["define", "--type", "one", "--name", &format!("t{t}-{i}")]);
        }
    }
    let live: Arc<parking_lot::Mutex<HashMap<u64, String>>> = Arc::default();
    let seed: u64 = rand::random();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (api, live) = (d.api(), live.clone());
            std::thread::spawn(move || {
                let api = ApiClient::new(&api);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ t);
                let mut started: Vec<String> = Vec::new();
                let (mut starts, mut refused) = (0, 0);
                for _ in 0..500 {
                    let name = format!("t{t}-{}", rng.random_range(0..3));
                    if let Some(pos) = started.iter().position(|n| *n == name) {
                        // Forget the PASID before the daemon frees it.
                        live.lock().retain(|_, n| *n != name);
                        let _: InstanceView = api
                            .send(Method::POST, &format!("/v1/instances/{name}/stop"), None::<&()>)
                            .unwrap();
                        started.remove(pos);
                        continue;
                    }
                    let r: anyhow::Result<InstanceView> =
                        api.send(Method::POST, &format!("/v1/instances/{name}/start"), None::<&()>);
                    match r {
                        Ok(v) => {
                            let pasid = v.pasid.unwrap() as u64;
                            if let Some(other) = live.lock().insert(pasid, name.clone()) {
                                panic!("seed {seed}: PASID {pasid} given to {name} while {other} holds it");
                            }
                            started.push(name);
                            starts += 1;
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            assert!(msg.contains("PASIDs exhausted (8)"), "seed {seed}: {msg}");
                            refused += 1;
                        }
                    }
                }
                (starts, refused)
            })
        })
        .collect();
    let (mut starts, mut refused) = (0, 0);
    for t in threads {
        let (s, r) = t.join().unwrap();
        starts += s;
        refused += r;
    }
    eprintln!("seed {seed}: {starts} starts, {refused} refused for want of a PASID");
    assert!(starts > 500, "too few starts to mean anything: {starts}");
    for v in d.json(&["list"]).as_array().unwrap() {
        d.json(&["stop", v["name"].as_str().unwrap()]);
    }
    assert_eq!(d.available("one"), 8, "every PASID is free again");
}

/// `wdvirt daemon` that must refuse to start: its exit code and stderr.
fn daemon_refuses(dir: &Path, config: &str, api: &Path) -> (Option<i32>, String) {
    std::fs::write(dir.join("host.yaml"), config).unwrap();
    let out = wdvirt()
        .arg("daemon")
        .arg("--config")
        .arg(dir.join("host.yaml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--api")
        .arg(api)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_daemon_refuses_a_second_daemon_a_file_at_its_api_path_and_bad_yaml_and_says_so_once() {
    let d = daemon(SMALL_HOST);
    // The API socket is for the owner and the group only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.api()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A second daemon on the same state directory (another API path).
    let other_api = d.dir.path().join("api2.sock");
    let (code, err) = daemon_refuses(d.dir.path(), SMALL_HOST, &other_api);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("another wdvirt daemon holds the state directory"),
        "{err}"
    );
    // A regular file where the API socket should go is never replaced.
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let (code, err) = daemon_refuses(dir.path(), SMALL_HOST, &precious);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    // Bad YAML: each error once, with its place.
    let bad = SMALL_HOST.replace("weight: 400", "weight: 0");
    let (code, err) = daemon_refuses(dir.path(), &bad, &dir.path().join("api.sock"));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.matches("host.yaml:14:13").count(), 1, "{err}");
    assert!(err.contains("weight"), "{err}");
}

#[test]
fn definitions_edited_by_hand_are_held_to_the_rules_of_define() {
    let mut d = daemon(SMALL_HOST);
    d.json(&["define", "--type", "hash", "--name", "vm1", "--auto"]);
    d.kill9();
    let instances = d.state_dir().join("instances");
    for (name, auto) in [("../escaped", true), ("vm1", true), ("fine", true)] {
        let uuid = uuid::Uuid::new_v4();
        let def = serde_json::json!({"uuid": uuid, "name": name, "type": "hash", "auto": auto});
        std::fs::write(instances.join(format!("{uuid}.json")), def.to_string()).unwrap();
    }
    d.spawn();
    let list = d.json(&["list", "--defined"]);
    assert_eq!(
        names(&list),
        ["fine", "vm1"],
        "the bad name and the second vm1 are skipped"
    );
    assert!(!d.dir.path().join("escaped.sock").exists());
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] == "started")
    );
    // Names that would pass for a UUID or the API socket are refused.
    let u = uuid::Uuid::new_v4().to_string();
    assert!(
        d.refused(&["define", "--type", "hash", "--name", &u])
            .contains("reads as a UUID")
    );
    assert!(
        d.refused(&["define", "--type", "hash", "--name", "api"])
            .contains("reserved")
    );
}

#[test]
fn a_stalled_api_client_does_not_keep_sigterm_from_stopping_the_daemon() {
    use std::io::{Read, Write};
    let mut d = daemon(SMALL_HOST);
    d.json(&["define", "--type", "hash", "--name", "vm1"]);
    d.json(&["start", "vm1"]);
    // Half a request, never finished.
    let mut stalled = std::os::unix::net::UnixStream::connect(d.api()).unwrap();
    stalled
        .write_all(b"GET /v1/types HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (body405, body400) = {
        let raw = |req: &str| {
            let mut s = std::os::unix::net::UnixStream::connect(d.api()).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        (
            raw(
                "PUT /v1/instances HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            ),
            raw("GET /v1/instances?defined=yes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    };
    assert!(
        body405.starts_with("HTTP/1.1 405") && body405.contains(r#""kind":"invalid""#),
        "{body405}"
    );
    assert!(
        body400.starts_with("HTTP/1.1 400") && body400.contains("expected ?defined=true"),
        "{body400}"
    );
    let t = Instant::now();
    let (status, _) = d.term();
    assert!(status.success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        !d.run_dir().join("vm1.sock").exists(),
        "instances were stopped"
    );
    drop(stalled);
}

#[test]
fn relative_paths_work_on_the_first_start_and_sockets_are_given_absolute() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("host.yaml"), SMALL_HOST).unwrap();
    let mut child = wdvirt()
        .current_dir(dir.path())
        .args(["daemon", "--config", "host.yaml", "--state-dir", "state"])
        .args(["--run-dir", "run", "--api", "api.sock"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let api = dir.path().join("api.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&api).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the daemon exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cli = |args: &[&str]| wdvirt().arg("--api").arg(&api).args(args).output().unwrap();
    assert!(
        cli(&["define", "--type", "hash", "--name", "vm1"])
            .status
            .success()
    );
    let out = cli(&["start", "vm1"]);
    let socket = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        Path::new(socket.trim()),
        dir.path().canonicalize().unwrap().join("run/vm1.sock"),
        "a VMM anywhere can use the path"
    );
    assert!(dir.path().join("state/instances").is_dir());
    assert!(common::terminate(&mut child).success());
}

#[test]
fn accelerators_demo_connect_and_an_absent_daemon_as_an_operator_sees_them() {
    let d = daemon(SMALL_HOST);
    d.json(&["define", "--type", "quad", "--name", "vm1"]);
    let v = d.json(&["start", "vm1"]);
    // Pools as the partitioner counts them, in JSON and as bars.
    let a = d.json(&["accelerators"]);
    assert_eq!(a[0]["name"], "soft0");
    assert_eq!(a[0]["queue_pairs"]["used"], 4, "{a}");
    assert_eq!(a[0]["queue_pairs"]["free"], 4, "{a}");
    assert_eq!(a[0]["pasids"]["used"], 1, "{a}");
    let out = d.cli(&["accelerators"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("[##########..........] 4/8"), "{table}");
    // The in-process VMM drives a daemon-started instance and verifies
    // every result against a direct library call.
    let socket = v["socket"].as_str().unwrap();
    let out = wdvirt()
        .args([
            "demo",
            "--json",
            "--rounds",
            "1",
            "--size",
            "4096",
            "--connect",
            socket,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let guest = &r[0]["guest"];
    assert!(guest["jobs"].as_u64().unwrap() >= 8, "{r}");
    assert_eq!(guest["verified"], guest["jobs"], "{r}");
    let jobs: u64 = d.json(&["list"])[0]["report"]["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["jobs_ok"].as_u64().unwrap())
        .sum();
    assert_eq!(
        jobs,
        guest["jobs"].as_u64().unwrap(),
        "the daemon counted each job"
    );
    // No daemon at --api: the CLI says where it looked and what to do.
    let out = wdvirt()
        .args(["--api", "/nonexistent/wdvirt.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("cannot reach the wdvirt daemon at /nonexistent/wdvirt.sock")
            && e.contains("wdvirt daemon"),
        "{e}"
    );
}

#[test]
fn a_type_the_host_graph_can_never_place_is_refused_at_its_line() {
    let far = TWO_NODES.replace(
        "    placement: {max_distance: 12}",
        "    placement: {max_distance: 12}\n  - name: never\n    functions:\n      - {queues: 1, operations: [deflate-compress]}\n      - {queues: 1, operations: [sha256]}\n    qos: silver\n    placement: {max_distance: 3}",
    );
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = daemon_refuses(dir.path(), &far, &dir.path().join("api.sock"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("host.yaml:29:11: error: type 'never' can never be placed on this host")
            && err.contains("zip1–sec1 distance 4 > max 3"),
        "{err}"
    );
    let out = wdvirt()
        .arg("validate")
        .arg(dir.path().join("host.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host.yaml:29:11"));
}

/// Every change is logged with its caller (pid, uid, gid) and what came
/// of it, a refused one as much as one carried out; a read is not logged.
#[test]
fn each_change_is_logged_with_its_caller_and_its_outcome() {
    let mut d = Daemon::builder(SMALL_HOST)
        .arg("--log")
        .arg("info")
        .capture_stderr()
        .start();
    d.json(&["define", "--type", "hash", "--name", "h1"]);
    let e = d.refused(&["define", "--type", "hash", "--name", "h1"]);
    assert!(e.contains("h1"), "{e}");
    d.json(&["list"]);
    let (_, log) = d.term();
    // Without the terminal's colour codes between a field's name and value.
    let mut plain = String::new();
    let mut in_escape = false;
    for c in log.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (false, c) => plain.push(c),
            (true, _) => {}
        }
    }
    let log = plain;
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("Define")).collect();
    assert_eq!(lines.len(), 2, "{log}");
    for l in &lines {
        assert!(
            l.contains("pid=") && l.contains("uid=") && l.contains("gid="),
            "{l}"
        );
    }
    assert!(lines[0].contains(": ok"), "{}", lines[0]);
    assert!(lines[1].contains(": refused:"), "{}", lines[1]);
    assert!(
        !log.contains("ListInstances"),
        "reads are not logged: {log}"
    );
}
