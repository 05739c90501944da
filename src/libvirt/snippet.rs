//! The domain XML an operator pastes in so a domain gets instances: shared
//! guest RAM, the `<metadata>` asking for them, and the `<qemu:commandline>`
//! naming their sockets, which follow from the domain's name
//! ([`super::metadata::instance_names`]) so nobody writes a path by hand.

use std::fmt::Write;
use std::path::Path;

use super::metadata::{Ask, NAMESPACE, QEMU_NAMESPACE, instance_names, socket_path};

/// XML attribute text (single-quoted attributes). Tab, newline and
/// carriage return go as character references: a parser turns them into
/// spaces when they are written raw (attribute-value normalisation).
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
        .replace('\t', "&#9;")
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
}

/// Text for inside an XML comment, which may not hold `--` (and in which
/// references are not read): each `--` is broken as `- -`.
fn comment(s: &str) -> String {
    let mut out = s.to_string();
    while out.contains("--") {
        out = out.replace("--", "- -");
    }
    out
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
        comment(&ask.type_name),
        comment(domain)
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

    /// Found by the `libvirt_metadata` fuzz target: a domain named with
    /// `--` made the comment at the top malformed XML, and a tab in a type
    /// came back as a space.
    #[test]
    fn names_with_dashes_and_types_with_tabs_read_back_as_they_were() {
        for (domain, ty) in [
            ("a--b", "zip"),
            ("x-", "a\tb"),
            ("--", "z\r\n--y-"),
            ("&<'\"", "&<'\""),
        ] {
            let ask = Ask {
                type_name: ty.into(),
                count: 1,
                qos: Some("q\tq".into()),
                numa: None,
            };
            let text = fragments(domain, &ask, Path::new("/run/wdvirt"));
            let name = domain.replace('&', "&amp;").replace('<', "&lt;");
            let xml = format!(
                "<domain type='qemu' xmlns:qemu='{QEMU_NAMESPACE}'><name>{name}</name>{text}</domain>"
            );
            let d = Domain::parse(&xml).unwrap_or_else(|e| panic!("{domain:?}: {e}\n{xml}"));
            assert_eq!(d.name, domain);
            assert_eq!(d.asks, [ask]);
        }
    }
}
