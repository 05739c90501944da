//! `libvirt::metadata::Domain::parse` — what the libvirt hook reads from
//! every domain's XML — on arbitrary text: never panics, and what it
//! returns keeps its promises.
//!
//! * A refusal is a `MetadataError` with a message.
//! * An accepted domain has a trimmed, non-empty name; each ask a trimmed,
//!   non-empty type, a count of 1..=MAX_INSTANCES, a non-empty QoS when it
//!   names one, and at most MAX_INSTANCES instances in all; a DAC user, when
//!   read, of user-name shape.
//! * Its instances are named one per instance, all different, each a name
//!   the daemon takes (`plain_name`, at most 64), and each socket lies
//!   directly in the run directory (no domain name reaches outside it).
//! * Parsing is deterministic, and each ask round-trips through what an
//!   operator pastes (`snippet::fragments`): the fragments for the domain's
//!   name and that ask, in a domain, parse back to exactly that ask, shared
//!   memory, and the sockets of the instances it names.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wdvirt::daemon::registry::plain_name;
use wdvirt::libvirt::metadata::{Domain, MAX_INSTANCES, QEMU_NAMESPACE, instance_names, socket_path};
use wdvirt::libvirt::snippet;

const RUN: &str = "/run/wdvirt";

/// XML text content.
fn text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn check(d: &Domain) {
    assert!(!d.name.is_empty() && d.name.trim() == d.name, "name {:?}", d.name);
    let mut total = 0;
    for a in &d.asks {
        assert!(!a.type_name.is_empty() && a.type_name.trim() == a.type_name, "{a:?}");
        assert!((1..=MAX_INSTANCES).contains(&a.count), "{a:?}");
        if let Some(q) = &a.qos {
            assert!(!q.is_empty() && q.trim() == q, "{a:?}");
        }
        total += a.count;
    }
    assert!(total <= MAX_INSTANCES);
    if let Some(u) = &d.qemu_user {
        // The shape written out here, not `config::is_account_name`: an
        // oracle that called the parser's own rule could not catch it.
        assert!(
            !u.is_empty()
                && u.len() <= 32
                && !u.starts_with('-')
                && u.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "{u:?}"
        );
        assert!(!u.contains(['/', ':', ' ']), "{u:?}");
    }

    let planned = d.planned();
    assert_eq!(planned.len(), total as usize);
    let names: HashSet<_> = planned.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), planned.len(), "two instances share a name");
    for p in &planned {
        assert!(plain_name(&p.name, 64), "instance name {:?}", p.name);
        let sock = socket_path(Path::new(RUN), &p.name);
        assert_eq!(sock.parent(), Some(Path::new(RUN)), "{sock:?}");
    }
    assert_eq!(
        planned.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
        instance_names(&d.name, total)
    );

    for ask in &d.asks {
        let frag = snippet::fragments(&d.name, ask, Path::new(RUN));
        let xml = format!(
            "<domain type='kvm' xmlns:qemu='{QEMU_NAMESPACE}'><name>{}</name>{frag}</domain>",
            text(&d.name)
        );
        let back = Domain::parse(&xml)
            .unwrap_or_else(|e| panic!("the fragments for {ask:?} do not parse: {e}\n{xml}"));
        assert_eq!(back.name, d.name);
        assert_eq!(back.asks, [ask.clone()], "{xml}");
        assert!(back.shared_memory);
        let want: Vec<_> = instance_names(&d.name, ask.count)
            .iter()
            .map(|n| socket_path(Path::new(RUN), n))
            .collect();
        assert_eq!(back.vfio_user_sockets, want, "{xml}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let first = Domain::parse(xml);
    let again = Domain::parse(xml);
    match (&first, &again) {
        (Ok(d), Ok(e)) => {
            assert_eq!(d, e);
            check(d);
        }
        (Err(e), Err(f)) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            assert_eq!(msg, f.to_string());
        }
        _ => panic!("two parses disagree: {first:?} / {again:?}"),
    }
});
