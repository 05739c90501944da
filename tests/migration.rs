//! A running "VM" migrated between two real `wdvirt daemon`s by the
//! in-process VMM (`wdvirt::vmm::migrate`): the guest is the real driver
//! (`wdvirt_guest`) over the VMM's memfd RAM, keeping several queues full
//! of compress / hash / copy jobs and checking every result, while the VMM
//! moves its RAM (dirty rounds) and its device (the vfio-user migration
//! commands through each instance's socket) back and forth.
//!
//! `WDVIRT_MIGRATIONS=100 cargo test --test migration` for the recorded
//! long run (20 by default).

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use wdvirt::vmm::link::{self, Kind};
use wdvirt::vmm::load::{Load, LoadOptions, LoadSummary};
use wdvirt::vmm::migrate::{self, Figures, MigrateError, MigrateOptions, Phase, Progress, Vm};
use wdvirt::vmm::{GuestRam, LoopbackVmm};

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 16 << 20;
const QUEUES: u32 = 4;
const DEPTH: u32 = 32;

/// One engine (the tests share two cores); a QoS cap, so that the
/// scheduler holds jobs back at the stops (they move as pending); a second
/// type of another shape.
const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 16
    operations: [all]
    pasids: 4
qos_policies:
  - name: capped
    weight: 100
    max_in_flight: 16
types:
  - name: quad
    queues: 4
    operations: [all]
    max_depth: 256
    qos: capped
  - name: pair
    queues: 2
    operations: [all]
    max_depth: 256
    qos: capped
"#;

/// A daemon with one started instance `vm` of `ty`; its socket.
fn host(ty: &str) -> (Daemon, PathBuf) {
    let d = Daemon::start(HOST);
    d.json(&["define", "--type", ty, "--name", "vm"]);
    d.json(&["start", "vm"]);
    let s = d.socket("vm");
    (d, s)
}

fn boot(socket: &std::path::Path) -> Arc<Vm> {
    let ram = GuestRam::new(RAM_BASE, RAM_SIZE).unwrap();
    Vm::new(LoopbackVmm::connect_migratable(socket, ram).unwrap())
}

/// The guest: the library's verified load (`wdvirt::vmm::load`), also
/// what `wdvirt vm` runs.
struct Guest(Option<Load>);

impl Guest {
    fn start(vm: &Arc<Vm>, queues: u32) -> Guest {
        let opts = LoadOptions {
            queues,
            depth: DEPTH,
        };
        Guest(Some(Load::start(vm, opts).unwrap()))
    }

    /// The load, to pause for a migration between processes.
    fn load(&mut self) -> &mut Load {
        self.0.as_mut().unwrap()
    }

    /// Waits until `more` further jobs have been verified.
    fn progress(&self, more: u64) {
        let load = self.0.as_ref().unwrap();
        let want = load.stats().verified + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.stats().verified < want {
            assert!(load.is_running(), "the guest failed: {:?}", load.failure());
            assert!(
                load.stats().failed == 0 && load.stats().repeated == 0,
                "{:?}",
                load.failure()
            );
            assert!(Instant::now() < deadline, "the guest made no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops, drains and sums up; every job submitted completed once with
    /// the right result (a gap in the ring stalls the driver, whose
    /// phase-bit reading stops at it, and fails the drain), and every
    /// completion the device counted (Q_COMPLETED travels with the state)
    /// is one the driver read: no ring slot skipped or read twice.
    fn finish(mut self) -> LoadSummary {
        let s = self.0.take().unwrap().finish();
        assert_eq!(s.failure, None);
        assert_eq!(
            (s.stats.failed, s.stats.repeated, s.never_completed),
            (0, 0, 0)
        );
        assert_eq!(s.stats.verified, s.stats.jobs);
        assert_eq!(s.device_completed, Some(s.completed), "Q_COMPLETED went on");
        assert!(s.all_verified());
        s
    }
}

fn go(vm: &Vm, to: &std::path::Path) -> Result<Figures, MigrateError> {
    migrate::migrate(vm, to, &MigrateOptions::default(), &mut |_| {
        ControlFlow::Continue(())
    })
}

#[test]
fn a_loaded_vm_migrates_back_and_forth_between_two_daemons_every_job_once_and_right() {
    let n: u32 = std::env::var("WDVIRT_MIGRATIONS")
        .ok()
        .map(|v| v.parse().expect("WDVIRT_MIGRATIONS is a number"))
        .unwrap_or(20);
    let (_a, sa) = host("quad");
    let (_b, sb) = host("quad");
    let vm = boot(&sa);
    let guest = Guest::start(&vm, QUEUES);
    let sockets = [&sa, &sb];
    let (mut downtime, mut worst, mut rounds, mut stream, mut ram) =
        (Duration::ZERO, Duration::ZERO, 0, 0, 0);
    for i in 0..n {
        // Work in flight on every queue at each stop.
        guest.progress(40);
        let mut phases = Vec::new();
        let f = migrate::migrate(
            &vm,
            sockets[(i as usize + 1) % 2],
            &MigrateOptions::default(),
            &mut |p: &Progress| {
                phases.push(p.phase);
                ControlFlow::Continue(())
            },
        )
        .unwrap_or_else(|e| panic!("migration {i}: {e}"));
        assert_eq!(phases.first(), Some(&Phase::Connected));
        assert_eq!(phases.last(), Some(&Phase::Done));
        assert!(phases.contains(&Phase::PreCopy) && phases.contains(&Phase::StopCopy));
        assert!(f.ram_bytes >= RAM_SIZE, "all of RAM at least once");
        assert!(f.stream_bytes > 0 && f.pre_copy_rounds >= 1);
        downtime += f.downtime;
        worst = worst.max(f.downtime);
        rounds += f.pre_copy_rounds;
        stream += f.stream_bytes;
        ram += f.ram_bytes;
    }
    guest.progress(40);
    let s = guest.finish();
    let (total, reordered) = (s.stats.jobs, s.stats.reordered);
    assert!(
        total > u64::from(2 * n * QUEUES),
        "only {total} jobs on {QUEUES} queues"
    );
    eprintln!(
        "{n} migrations, {total} jobs checked ({reordered} completed before an older job): downtime mean {:?} worst {worst:?}, \
         {:.1} rounds, {} B stream, {} KiB RAM per migration",
        downtime / n.max(1),
        f64::from(rounds) / f64::from(n.max(1)),
        stream / u64::from(n.max(1)),
        ram / u64::from(n.max(1)) / 1024
    );
    // One engine: a queue's jobs complete in the order it submitted them,
    // across every migration too (docs/migration.md, "Completion order").
    assert_eq!(
        reordered, 0,
        "completions before an older job of their queue"
    );
}

#[test]
fn a_destination_of_another_type_refuses_at_pre_copy_and_the_guest_runs_on() {
    let (_a, sa) = host("quad");
    let (_b, sb) = host("pair");
    let (_c, sc) = host("quad");
    let vm = boot(&sa);
    let guest = Guest::start(&vm, QUEUES);
    guest.progress(40);
    let mut phases = Vec::new();
    let e = migrate::migrate(&vm, &sb, &MigrateOptions::default(), &mut |p| {
        phases.push(p.phase);
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(e, MigrateError::Refused(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("refused") && msg.contains("source runs on"),
        "{msg}"
    );
    assert_eq!(phases, [Phase::Connected], "nothing copied");
    // The source still serves the guest, whose jobs go on verifying.
    guest.progress(100);
    // And it can still move to a destination that fits.
    go(&vm, &sc).unwrap();
    guest.progress(100);
    guest.finish();
}

#[test]
fn a_failure_or_a_cancel_before_the_destination_runs_leaves_the_source_running() {
    let (_a, sa) = host("quad");
    let (mut b, sb) = host("quad");
    let (_c, sc) = host("quad");
    let vm = boot(&sa);
    let guest = Guest::start(&vm, QUEUES);
    let on_a = vm.vmm();

    // Cancelled at each phase up to STOP_COPY (the source already stopped
    // there): the source runs again, the guest never notices.
    for at in [
        Phase::Connected,
        Phase::PreCopy,
        Phase::RamRound,
        Phase::StopCopy,
    ] {
        guest.progress(40);
        let e = migrate::migrate(&vm, &sb, &MigrateOptions::default(), &mut |p| {
            if p.phase == at {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, MigrateError::Cancelled(p) if p == at), "{e:?}");
        assert!(Arc::ptr_eq(&vm.vmm(), &on_a), "still on the source");
        assert_eq!(
            on_a.migration().unwrap().mig_state().unwrap(),
            wdvirt::migration::MigState::Running
        );
    }
    guest.progress(100);

    // The destination's daemon dies while RAM is copied, with its fd holder
    // (a daemon alone would be taken over by its successor): the source
    // runs on.
    let e = migrate::migrate(&vm, &sb, &MigrateOptions::default(), &mut |p| {
        if p.phase == Phase::RamRound {
            b.kill9();
            b.quit_holder();
        }
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(e, MigrateError::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("source runs on"), "{e}");
    assert!(Arc::ptr_eq(&vm.vmm(), &on_a));
    assert_eq!(
        on_a.migration().unwrap().mig_state().unwrap(),
        wdvirt::migration::MigState::Running
    );
    guest.progress(100);

    // A destination that is not there at all.
    let gone = sb.with_file_name("nobody.sock");
    let e = go(&vm, &gone).unwrap_err();
    assert!(matches!(e, MigrateError::Destination { .. }), "{e:?}");
    assert!(Arc::ptr_eq(&vm.vmm(), &on_a));
    assert_eq!(
        on_a.migration().unwrap().mig_state().unwrap(),
        wdvirt::migration::MigState::Running
    );
    guest.progress(40);

    // And then a good one; the source, still connected through the handle
    // kept here, is left in STOP with its dirty log stopped.
    go(&vm, &sc).unwrap();
    assert!(!Arc::ptr_eq(&vm.vmm(), &on_a));
    let mut c = on_a.migration().unwrap();
    assert_eq!(c.mig_state().unwrap(), wdvirt::migration::MigState::Stop);
    let r = c.dirty_report(RAM_BASE, RAM_SIZE, migrate::PAGE);
    assert!(
        matches!(r, Err(wdvirt::vmm::VmmError::Refused { errno, .. }) if errno == libc::EINVAL),
        "{r:?}"
    );
    drop(c);
    guest.progress(100);
    guest.finish();
}

/// Reads the destination half's answer to what was written to it.
fn answer(s: &mut std::os::unix::net::UnixStream) -> (Kind, String) {
    let (k, b) = link::read_frame(s).unwrap();
    (k, String::from_utf8_lossy(&b).into_owned())
}

#[test]
fn the_halves_over_a_socket_move_a_loaded_vm_and_refuse_or_survive_what_goes_wrong() {
    use std::os::unix::net::UnixStream;
    let (_a, sa) = host("quad");
    let (_b, sb) = host("quad");

    // The destination half refuses streams that are not a migration, with
    // its reason, and takes nothing from them.
    let hello = link::Hello {
        version: link::VERSION,
        ram_base: RAM_BASE,
        ram_size: RAM_SIZE,
        page: migrate::PAGE as u32,
    };
    let mut bad_magic = hello.encode();
    bad_magic[0] = b'X';
    let v2 = link::Hello {
        version: 2,
        ..hello
    }
    .encode();
    let odd_page = link::Hello { page: 512, ..hello }.encode();
    // A guest larger than any destination makes a memfd for.
    let huge_ram = link::Hello {
        ram_size: migrate::MAX_RAM + migrate::PAGE,
        ..hello
    }
    .encode();
    type Frames = Vec<(Kind, Vec<u8>)>;
    let cases: Vec<(Frames, &str)> = vec![
        (
            vec![(Kind::Hello, bad_magic)],
            "not a wdvirt migration stream",
        ),
        (
            vec![(Kind::Hello, v2)],
            "stream version 2 (this destination speaks 1)",
        ),
        (vec![(Kind::Hello, odd_page)], "pages of 512"),
        (vec![(Kind::Hello, huge_ram)], "up to 68719476736 bytes"),
        (
            vec![(Kind::Compat, vec![1, 2, 3])],
            "a Compat frame before HELLO",
        ),
        (
            vec![(Kind::Hello, hello.encode()), (Kind::Pages, vec![0; 20])],
            "a Pages frame while connecting to the destination",
        ),
        (
            vec![
                (Kind::Hello, hello.encode()),
                (Kind::Compat, b"garbage".to_vec()),
            ],
            "cut short",
        ),
        (
            vec![(Kind::Hello, hello.encode()), (Kind::Compat, vec![0; 64])],
            "MigDataWrite refused",
        ),
    ];
    for (frames, want) in cases {
        let (mut s, d) = UnixStream::pair().unwrap();
        let dest = sb.clone();
        let t = std::thread::spawn(move || migrate::incoming(d, &dest).map(|_| ()));
        for (k, b) in &frames {
            link::write_frame(&mut s, *k, b).unwrap();
            if *k == Kind::Hello && frames.len() > 1 {
                assert_eq!(answer(&mut s).0, Kind::Ready);
            }
        }
        let (k, reason) = answer(&mut s);
        assert_eq!(k, Kind::Refused, "{want}");
        assert!(reason.contains(want), "{want}: {reason}");
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }

    let vm = boot(&sa);
    // A real compatibility block (the source's PRE_COPY data, the source
    // back to RUNNING), accepted, then pages that are not in guest RAM or
    // are cut short.
    let block = {
        let src = vm.vmm();
        let mut c = src.migration().unwrap();
        c.set_mig_state(wdvirt::migration::MigState::PreCopy)
            .unwrap();
        let piece = c.max_xfer();
        let b = c.mig_read_all(piece).unwrap();
        c.set_mig_state(wdvirt::migration::MigState::Running)
            .unwrap();
        b
    };
    let mut below = Vec::new();
    link::push_pages(&mut below, RAM_BASE - 4096, &[7; 4096]);
    let mut past = Vec::new();
    link::push_pages(&mut past, RAM_BASE + RAM_SIZE - 4096, &[7; 8192]);
    let mut cut = Vec::new();
    link::push_pages(&mut cut, RAM_BASE, &[7; 4096]);
    cut.truncate(100);
    for (pages, want) in [
        (below, "outside guest RAM"),
        (past, "outside guest RAM"),
        (cut, "cut short"),
    ] {
        let (mut s, d) = UnixStream::pair().unwrap();
        let dest = sb.clone();
        let t = std::thread::spawn(move || migrate::incoming(d, &dest).map(|_| ()));
        link::write_frame(&mut s, Kind::Hello, &hello.encode()).unwrap();
        assert_eq!(answer(&mut s).0, Kind::Ready);
        link::write_frame(&mut s, Kind::Compat, &block).unwrap();
        assert_eq!(answer(&mut s).0, Kind::Accepted);
        link::write_frame(&mut s, Kind::Pages, &pages).unwrap();
        let (k, reason) = answer(&mut s);
        assert_eq!(k, Kind::Refused);
        assert!(reason.contains(want), "{want}: {reason}");
        assert!(t.join().unwrap().is_err());
    }

    let mut guest = Guest::start(&vm, QUEUES);
    let on_a = vm.vmm();
    let running = |vmm: &LoopbackVmm| vmm.migration().unwrap().mig_state().unwrap();
    let opts = MigrateOptions::default();

    // The stream breaks while RAM is copied, then a cancel after the
    // guest's CPUs paused: each time the source runs, the guest goes on.
    for at in [Phase::RamRound, Phase::StopCopy] {
        guest.progress(40);
        let (s, d) = UnixStream::pair().unwrap();
        let cut = s.try_clone().unwrap();
        let dest = sb.clone();
        let t = std::thread::spawn(move || migrate::incoming(d, &dest).map(|_| ()));
        let e = migrate::send(
            &vm,
            s,
            &opts,
            &mut |p| {
                if p.phase == at && at == Phase::RamRound {
                    let _ = cut.shutdown(std::net::Shutdown::Both);
                }
                if p.phase == at && at == Phase::StopCopy {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            },
            guest.load(),
        )
        .unwrap_err();
        match at {
            Phase::RamRound => assert!(matches!(e, MigrateError::Link { .. }), "{e:?}"),
            _ => assert!(
                matches!(e, MigrateError::Cancelled(Phase::StopCopy)),
                "{e:?}"
            ),
        }
        assert!(e.to_string().contains("the source runs on"), "{e}");
        assert!(t.join().unwrap().is_err(), "the destination did not resume");
        assert!(Arc::ptr_eq(&vm.vmm(), &on_a));
        assert_eq!(running(&on_a), wdvirt::migration::MigState::Running);
        guest.progress(100);
    }

    // A destination that cannot take the guest's state refuses at COMMIT,
    // after the source stopped: the source runs again, the guest resumes.
    guest.progress(40);
    let (s, d) = UnixStream::pair().unwrap();
    let dest = sb.clone();
    let t = std::thread::spawn(move || {
        migrate::incoming_checked(d, &dest, &|image| {
            assert!(wdvirt::vmm::load::Load::check_image(image).is_ok());
            Err("no room for this guest".into())
        })
        .map(|_| ())
    });
    let e = migrate::send(
        &vm,
        s,
        &opts,
        &mut |_| ControlFlow::Continue(()),
        guest.load(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, MigrateError::Remote { phase: Phase::StopCopy, reason }
            if reason == "the guest's state is unusable here: no room for this guest"),
        "{e:?}"
    );
    assert!(t.join().unwrap().is_err());
    assert!(Arc::ptr_eq(&vm.vmm(), &on_a));
    assert_eq!(running(&on_a), wdvirt::migration::MigState::Running);
    guest.progress(100);

    // And through: the guest's state goes with the VM and its load goes on
    // there from the migrated rings.
    guest.progress(40);
    let (s, d) = UnixStream::pair().unwrap();
    let dest = sb.clone();
    let t = std::thread::spawn(move || migrate::incoming(d, &dest));
    let mut phases = Vec::new();
    let f = migrate::send(
        &vm,
        s,
        &opts,
        &mut |p| {
            phases.push(p.phase);
            ControlFlow::Continue(())
        },
        guest.load(),
    )
    .unwrap();
    assert_eq!(phases.last(), Some(&Phase::Done));
    assert!(f.ram_bytes >= RAM_SIZE && f.stream_bytes > 0);
    let got = t.join().unwrap().unwrap();
    assert!(got.ram_bytes >= RAM_SIZE && !got.guest.is_empty());
    let left = guest.0.take().unwrap().detach();
    assert!(left.detached && left.all_verified(), "{left:?}");
    assert_eq!(running(&on_a), wdvirt::migration::MigState::Stop);
    let there = Guest(Some(Load::adopt(&got.vm, &got.guest).unwrap()));
    assert_eq!(
        there.0.as_ref().unwrap().stats(),
        left.stats,
        "the counters moved"
    );
    there.progress(100);
    let s = there.finish();
    assert!(s.stats.jobs > left.stats.jobs);

    // An image that does not fit the device is refused, not trusted.
    let e = Load::adopt(&got.vm, b"{\"version\":1,\"depth\":32,\"stats\":{\"jobs\":0,\"verified\":0,\"failed\":0,\"repeated\":0,\"reordered\":0},\"queues\":[{\"index\":0,\"ops\":1,\"sq_tail\":5,\"cq_head\":0,\"src\":0,\"dst\":0,\"next\":5,\"expect\":0,\"completed\":0,\"out\":[[1,40]]}]}")
        .err()
        .unwrap();
    assert!(e.to_string().contains("slot 40 out of range"), "{e}");
    let e = Load::adopt(&got.vm, b"not json").err().unwrap();
    assert!(matches!(e, wdvirt::vmm::load::LoadError::Image(_)), "{e}");
    // Two slots under one tag: refused by the check a destination runs
    // before it resumes (adopting it would lose one of the two jobs).
    let twice = b"{\"version\":1,\"depth\":32,\"stats\":{\"jobs\":0,\"verified\":0,\"failed\":0,\"repeated\":0,\"reordered\":0},\"queues\":[{\"index\":0,\"ops\":1,\"sq_tail\":2,\"cq_head\":0,\"src\":0,\"dst\":0,\"next\":5,\"expect\":0,\"completed\":0,\"out\":[[1,3],[1,4]]}]}";
    let e = Load::check_image(twice).err().unwrap();
    assert!(e.to_string().contains("tag 1 in flight twice"), "{e}");
}

/// A source whose instance cannot answer is that failure, not "does not
/// offer migration"; a VMM whose client speaks no migration is.
#[test]
fn a_source_that_cannot_answer_is_a_failure_not_a_missing_feature() {
    let (mut a, sa) = host("quad");
    let (_b, sb) = host("quad");
    let plain =
        Vm::new(LoopbackVmm::connect(&sa, GuestRam::new(RAM_BASE, RAM_SIZE).unwrap()).unwrap());
    let e = go(&plain, &sb).unwrap_err();
    assert!(
        matches!(e, MigrateError::NotMigratable { side: "source", .. }),
        "{e:?}"
    );
    drop(plain);

    let vm = boot(&sa);
    a.kill9();
    let e = go(&vm, &sb).unwrap_err();
    assert!(
        matches!(
            e,
            MigrateError::Failed {
                phase: Phase::Connected,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().contains("does not offer"), "{e}");
}
