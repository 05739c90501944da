//! The domain XML an operator pastes in so a domain gets instances: shared
//! guest RAM, the `<metadata>` asking for them, and the `<qemu:commandline>`
//! naming their sockets, which follow from the domain's name
//! ([`super::metadata::instance_names`]) so nobody writes a path by hand.

use std::fmt::Write;
use std::path::Path;

use super::metadata::{Ask, NAMESPACE, QEMU_NAMESPACE, instance_names, socket_path};

/// XML attribute text (single-quoted attributes).
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The fragments for `domain`'s instances, sockets in `run_dir` (as QEMU
/// sees it).
pub fn fragments(domain: &str, ask: &Ask, run_dir: &Path) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- wdvirt: {} instance(s) of type {} for domain {}.\n     \
         The <domain> element needs xmlns:qemu='{QEMU_NAMESPACE}'. -->",
        ask.count,
        attr(&ask.type_name),
        attr(domain)
    );
    out.push_str(
        "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>\n",
    );
    let mut el = format!("<wdvirt:instance type='{}'", attr(&ask.type_name));
    if ask.count != 1 {
        let _ = write!(el, " count='{}'", ask.count);
    }
    if let Some(q) = &ask.qos {
        let _ = write!(el, " qos='{}'", attr(q));
    }
    if let Some(n) = ask.numa {
        let _ = write!(el, " numa='{n}'");
    }
    let _ = writeln!(
        out,
        "<metadata>\n  <wdvirt:instances xmlns:wdvirt='{NAMESPACE}'>\n    {el}/>\n  </wdvirt:instances>\n</metadata>"
    );
    out.push_str("<qemu:commandline>\n");
    for name in instance_names(domain, ask.count) {
        let json = serde_json::json!({
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": socket_path(run_dir, &name)},
        });
        let _ = writeln!(
            out,
            "  <qemu:arg value='-device'/>\n  <qemu:arg value='{}'/>",
            attr(&json.to_string())
        );
    }
    out.push_str("</qemu:commandline>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::metadata::Domain;
    use super::*;

    #[test]
    fn the_fragments_read_back_as_what_they_ask_for() {
        let ask = Ask {
            type_name: "zip".into(),
            count: 2,
            qos: Some("gold".into()),
            numa: Some(0),
        };
        let text = fragments("web 1", &ask, Path::new("/run/wdvirt"));
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='{QEMU_NAMESPACE}'><name>web 1</name>{text}</domain>"
        );
        let d = Domain::parse(&xml).unwrap();
        assert_eq!(d.asks, [ask]);
        assert!(d.shared_memory);
        let want: Vec<_> = d
            .planned()
            .iter()
            .map(|p| socket_path(Path::new("/run/wdvirt"), &p.name))
            .collect();
        assert_eq!(d.vfio_user_sockets, want);
    }
}
