//! What a libvirt domain asks of wdvirt, read from its XML: the instances
//! in wdvirt's namespace under `<metadata>`, whether guest RAM is shared
//! (the device reaches it through the fds QEMU passes), and the vfio-user
//! sockets its `<qemu:commandline>` names.
//!
//! ```xml
//! <metadata>
//!   <wdvirt:instances xmlns:wdvirt="http://wdvirt.org/xmlns/libvirt/1">
//!     <wdvirt:instance type="zip" count="2" qos="gold" numa="0"/>
//!     <wdvirt:instance type="hash"/>
//!   </wdvirt:instances>
//! </metadata>
//! ```
//!
//! Instances are numbered in document order across the elements
//! (`NAME-wd0`, `NAME-wd1`, ...; [`instance_names`]), so their socket paths
//! are known before the daemon runs and a domain can name them.

use std::path::PathBuf;

use crate::daemon::registry::{name_char, plain_name};
use sha2::{Digest, Sha256};

/// wdvirt's XML namespace for domain metadata.
pub const NAMESPACE: &str = "http://wdvirt.org/xmlns/libvirt/1";
/// libvirt's namespace for `<qemu:commandline>`.
pub const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The most instances one domain may ask for (a bound on what one hook call
/// allocates and on the names' length).
pub const MAX_INSTANCES: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("the domain XML is not well-formed: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("the XML's root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("the domain has no <name>")]
    NoName,
    #[error("the domain has {0} <wdvirt:instances> elements in its <metadata>; give one")]
    Repeated(usize),
    #[error("<wdvirt:{0}> is not a wdvirt metadata element (expected <wdvirt:instance>)")]
    UnknownElement(String),
    #[error("<wdvirt:instance> has an unknown attribute '{0}' (known: type, count, qos, numa)")]
    UnknownAttribute(String),
    #[error("<wdvirt:instance> (number {0} in the metadata) has no type=\"...\" attribute")]
    NoType(usize),
    #[error("<wdvirt:instance type=\"{ty}\"> has {attr}=\"{value}\": {why}")]
    BadValue {
        ty: String,
        attr: &'static str,
        value: String,
        why: String,
    },
    #[error("the domain asks for {0} wdvirt instances; at most {MAX_INSTANCES} per domain")]
    TooMany(u32),
}

/// One `<wdvirt:instance>` element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub type_name: String,
    pub count: u32,
    pub qos: Option<String>,
    pub numa: Option<u32>,
}

/// One instance the domain needs, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub type_name: String,
    pub qos: Option<String>,
    pub numa: Option<u32>,
}

/// What the hook needs from a domain's XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    /// Every instance asked for, in document order; empty when the domain
    /// asks for nothing.
    pub asks: Vec<Ask>,
    /// `<memoryBacking><access mode='shared'/>` (or shared NUMA cells).
    pub shared_memory: bool,
    /// Socket paths of the `vfio-user-pci` devices its `<qemu:commandline>`
    /// adds.
    pub vfio_user_sockets: Vec<PathBuf>,
    /// The user QEMU runs as, when the XML says it: the user half of
    /// `<seclabel model='dac'><label>USER:GROUP</label>` (`+UID` as a
    /// number). Its instances' sockets are owned by this user.
    pub qemu_user: Option<String>,
}

impl Domain {
    /// Reads a domain's XML (one parse; a domain without wdvirt metadata
    /// comes back with no asks).
    pub fn parse(xml: &str) -> Result<Domain, MetadataError> {
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
            return Err(MetadataError::NotADomain(root.tag_name().name().into()));
        }
        let name = child(root, "name")
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .ok_or(MetadataError::NoName)?
            .to_string();
        let ours: Vec<_> = child(root, "metadata")
            .map(|m| {
                m.children()
                    .filter(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))
                    .collect()
            })
            .unwrap_or_default();
        if ours.len() > 1 {
            return Err(MetadataError::Repeated(ours.len()));
        }
        let mut asks = Vec::new();
        if let Some(top) = ours.first() {
            if top.tag_name().name() != "instances" {
                return Err(MetadataError::UnknownElement(top.tag_name().name().into()));
            }
            for (i, el) in top.children().filter(|c| c.is_element()).enumerate() {
                if el.tag_name().namespace() != Some(NAMESPACE)
                    || el.tag_name().name() != "instance"
                {
                    return Err(MetadataError::UnknownElement(el.tag_name().name().into()));
                }
                asks.push(parse_ask(el, i + 1)?);
            }
        }
        let total: u32 = asks.iter().map(|a| a.count).sum();
        if total > MAX_INSTANCES {
            return Err(MetadataError::TooMany(total));
        }
        let shared_memory = child(root, "memoryBacking")
            .and_then(|m| child(m, "access"))
            .is_some_and(|a| a.attribute("mode") == Some("shared"))
            || root
                .descendants()
                .any(|n| n.has_tag_name("cell") && n.attribute("memAccess") == Some("shared"));
        Ok(Domain {
            name,
            asks,
            shared_memory,
            vfio_user_sockets: vfio_user_sockets(root),
            qemu_user: qemu_user(root),
        })
    }

    pub fn asks_for_instances(&self) -> bool {
        !self.asks.is_empty()
    }

    /// Every instance with its name, in document order.
    pub fn planned(&self) -> Vec<Planned> {
        let total = self.asks.iter().map(|a| a.count).sum();
        let names = instance_names(&self.name, total);
        let mut names = names.into_iter();
        self.asks
            .iter()
            .flat_map(|a| std::iter::repeat_n(a, a.count as usize))
            .map(|a| Planned {
                name: names.next().expect("one name per instance"),
                type_name: a.type_name.clone(),
                qos: a.qos.clone(),
                numa: a.numa,
            })
            .collect()
    }
}

/// The user of the domain's DAC label (`+64055:+64055` or
/// `libvirt-qemu:kvm`), when it has one of plausible shape.
fn qemu_user(root: roxmltree::Node) -> Option<String> {
    let label = root
        .children()
        .filter(|c| c.has_tag_name("seclabel") && c.attribute("model") == Some("dac"))
        .find_map(|s| child(s, "label")?.text())?;
    let user = label.trim().split(':').next()?;
    let user = user.strip_prefix('+').unwrap_or(user);
    crate::config::is_account_name(user).then(|| user.to_string())
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn parse_ask(el: roxmltree::Node, index: usize) -> Result<Ask, MetadataError> {
    for a in el.attributes() {
        if a.namespace().is_some() || !matches!(a.name(), "type" | "count" | "qos" | "numa") {
            return Err(MetadataError::UnknownAttribute(a.name().into()));
        }
    }
    let type_name = el
        .attribute("type")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(MetadataError::NoType(index))?
        .to_string();
    let bad = |attr: &'static str, value: &str, why: String| MetadataError::BadValue {
        ty: type_name.clone(),
        attr,
        value: value.into(),
        why,
    };
    let count = match el.attribute("count") {
        None => 1,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_INSTANCES).contains(&n) => n,
            _ => {
                return Err(bad(
                    "count",
                    v,
                    format!("a whole number from 1 to {MAX_INSTANCES}"),
                ));
            }
        },
    };
    let numa = match el.attribute("numa") {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<u32>()
                .map_err(|_| bad("numa", v, "a NUMA node number".into()))?,
        ),
    };
    let qos = match el.attribute("qos").map(str::trim) {
        None => None,
        Some("") => return Err(bad("qos", "", "a QoS policy's name".into())),
        Some(q) => Some(q.to_string()),
    };
    Ok(Ask {
        type_name,
        count,
        qos,
        numa,
    })
}

/// The socket paths of `-device` arguments whose JSON is a `vfio-user-pci`
/// device (`<qemu:arg value='-device'/><qemu:arg value='{...}'/>`).
fn vfio_user_sockets(root: roxmltree::Node) -> Vec<PathBuf> {
    let args: Vec<&str> = root
        .children()
        .filter(|c| c.is_element() && c.tag_name().namespace() == Some(QEMU_NAMESPACE))
        .filter(|c| c.tag_name().name() == "commandline")
        .flat_map(|c| c.children())
        .filter(|a| {
            a.is_element()
                && a.tag_name().name() == "arg"
                && a.tag_name().namespace() == Some(QEMU_NAMESPACE)
        })
        .filter_map(|a| a.attribute("value"))
        .collect();
    args.windows(2)
        .filter(|w| w[0] == "-device")
        .filter_map(|w| serde_json::from_str::<serde_json::Value>(w[1]).ok())
        .filter(|v| v["driver"] == "vfio-user-pci")
        .filter_map(|v| v["socket"]["path"].as_str().map(PathBuf::from))
        .collect()
}

/// The names of a domain's instances: `BASE-wdI`. BASE is the domain's
/// name when it is made of what instance names allow (A-Z a-z 0-9 - _ .,
/// not starting with '.' or '-') and at most 48 characters; otherwise a
/// sanitised prefix of it and 8 hex digits of its SHA-256, so two domains
/// never share a name and the same domain always gets the same ones.
pub fn instance_names(domain: &str, count: u32) -> Vec<String> {
    let base = instance_base(domain);
    (0..count).map(|i| format!("{base}-wd{i}")).collect()
}

fn instance_base(domain: &str) -> String {
    if plain_name(domain, 48) {
        return domain.to_string();
    }
    let cleaned: String = domain
        .chars()
        .map(|c| if name_char(c) { c } else { '_' })
        .take(40)
        .collect();
    let digest = Sha256::digest(domain.as_bytes());
    let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("vm{cleaned}-{tag}")
        .trim_start_matches(['.', '-'])
        .to_string()
}

/// Where an instance's socket is in `run_dir`: what the daemon serves, and
/// what `<qemu:commandline>` names.
pub use crate::daemon::registry::socket_path;

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(metadata: &str) -> String {
        format!(
            "<domain type='qemu' xmlns:qemu='{QEMU_NAMESPACE}'><name>vm1</name>\
             <metadata>{metadata}</metadata></domain>"
        )
    }

    #[test]
    fn asks_are_read_in_order_and_named_in_order() {
        let d = Domain::parse(&domain(&format!(
            "<wdvirt:instances xmlns:wdvirt='{NAMESPACE}'>\
               <wdvirt:instance type='zip' count='2' qos='gold' numa='1'/>\
               <wdvirt:instance type=' hash '/>\
             </wdvirt:instances>"
        )))
        .unwrap();
        assert_eq!(d.name, "vm1");
        let p = d.planned();
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["vm1-wd0", "vm1-wd1", "vm1-wd2"]);
        assert_eq!(p[1].qos.as_deref(), Some("gold"));
        assert_eq!(p[1].numa, Some(1));
        assert_eq!(p[2].type_name, "hash");
        assert_eq!((p[2].qos.clone(), p[2].numa), (None, None));
        assert!(!d.shared_memory);
    }

    #[test]
    fn a_domain_without_our_namespace_asks_for_nothing() {
        for xml in [
            "<domain><name>a</name></domain>".to_string(),
            domain("<other:x xmlns:other='urn:x'><instance type='zip'/></other:x>"),
            // Our element name in no namespace is someone else's.
            domain("<instances><instance type='zip'/></instances>"),
            domain(&format!("<wdvirt:instances xmlns:wdvirt='{NAMESPACE}'/>")),
        ] {
            let d = Domain::parse(&xml).unwrap();
            assert!(!d.asks_for_instances(), "{xml}");
            assert!(d.planned().is_empty());
        }
    }

    #[test]
    fn every_bad_input_gets_its_own_error() {
        let ns = |inner: &str| {
            domain(&format!(
                "<wdvirt:instances xmlns:wdvirt='{NAMESPACE}'>{inner}</wdvirt:instances>"
            ))
        };
        let cases: Vec<(String, &str)> = vec![
            ("<domain><name>x</name>".into(), "not well-formed"),
            ("<network><name>x</name></network>".into(), "not <domain>"),
            ("<domain><name> </name></domain>".into(), "no <name>"),
            (
                ns("<wdvirt:instance/>"),
                "number 1 in the metadata) has no type",
            ),
            (
                ns("<wdvirt:instance type='zip' cout='2'/>"),
                "unknown attribute 'cout'",
            ),
            (ns("<wdvirt:instance type='zip' count='0'/>"), "count=\"0\""),
            (ns("<wdvirt:instance type='zip' count='two'/>"), "1 to 16"),
            (
                ns("<wdvirt:instance type='zip' numa='-1'/>"),
                "NUMA node number",
            ),
            (ns("<wdvirt:instance type='zip' qos=''/>"), "QoS policy"),
            (ns("<wdvirt:device type='zip'/>"), "<wdvirt:device>"),
            (
                ns("<wdvirt:instance type='zip' count='9'/><wdvirt:instance type='a' count='8'/>"),
                "asks for 17",
            ),
            (
                domain(&format!(
                    "<wdvirt:instances xmlns:wdvirt='{NAMESPACE}'/><w:instances xmlns:w='{NAMESPACE}'/>"
                )),
                "2 <wdvirt:instances>",
            ),
            (
                domain(&format!(
                    "<wdvirt:instance xmlns:wdvirt='{NAMESPACE}' type='zip'/>"
                )),
                "<wdvirt:instance> is not",
            ),
        ];
        for (xml, want) in cases {
            let e = Domain::parse(&xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }

    #[test]
    fn shared_memory_and_commandline_sockets_are_found() {
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='{QEMU_NAMESPACE}'><name>vm1</name>\
             <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\
             <qemu:commandline>\
               <qemu:arg value='-device'/>\
               <qemu:arg value='{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"/run/wdvirt/vm1-wd0.sock\"}}}}'/>\
               <qemu:arg value='-device'/><qemu:arg value='{{\"driver\":\"virtio-rng-pci\"}}'/>\
               <qemu:arg value='-device'/><qemu:arg value='not json'/>\
             </qemu:commandline></domain>"
        );
        let d = Domain::parse(&xml).unwrap();
        assert!(d.shared_memory);
        assert_eq!(
            d.vfio_user_sockets,
            [PathBuf::from("/run/wdvirt/vm1-wd0.sock")]
        );
        assert_eq!(d.qemu_user, None, "no DAC label: the daemon's default");
    }

    #[test]
    fn the_dac_label_names_the_user_qemu_runs_as() {
        for (label, want) in [
            ("+64055:+64055", Some("64055")),
            ("libvirt-qemu:kvm", Some("libvirt-qemu")),
            ("qemu", Some("qemu")),
            ("../x:y", None),
            (":kvm", None),
        ] {
            let xml = format!(
                "<domain type='qemu'><name>vm1</name>\
                 <seclabel type='dynamic' model='selinux'><label>system_u:x</label></seclabel>\
                 <seclabel type='static' model='dac' relabel='yes'><label>{label}</label></seclabel>\
                 </domain>"
            );
            let d = Domain::parse(&xml).unwrap();
            assert_eq!(d.qemu_user.as_deref(), want, "{label}");
        }
    }

    /// The XML libvirt 11.3 passed to a hook here, mangled a few thousand
    /// ways (seeded): never a panic, and whatever parses keeps the bounds.
    #[test]
    fn mangled_domain_xml_never_panics_and_parses_only_within_bounds() {
        use rand::{Rng, SeedableRng};
        let xml = include_str!("../../tests/libvirt/prepare-begin.xml");
        let pieces = [
            "<",
            ">",
            "/>",
            "'",
            "\"",
            "&amp;",
            "&#0;",
            "count='16'",
            "count='99999999999'",
            "numa='-1'",
            "xmlns:wdvirt='http://wdvirt.org/xmlns/libvirt/1'",
            "<wdvirt:instance type='a' count='16'/>",
            "]]>",
            "<!--",
            "\u{0}",
            "\u{1F600}",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let (mut parsed, mut refused) = (0, 0);
        for _ in 0..3000 {
            let mut s = xml.to_string();
            for _ in 0..rng.random_range(1..4) {
                let mut at = rng.random_range(0..=s.len());
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                let mut end = (at + rng.random_range(0..8)).min(s.len());
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                let with = if rng.random_bool(0.5) {
                    pieces[rng.random_range(0..pieces.len())]
                } else {
                    ""
                };
                s.replace_range(at..end, with);
            }
            match Domain::parse(&s) {
                Ok(d) => {
                    parsed += 1;
                    let planned = d.planned();
                    assert!(planned.len() <= MAX_INSTANCES as usize);
                    for p in planned {
                        assert!(p.name.len() <= 64 && !p.type_name.is_empty(), "{p:?}");
                    }
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        assert!(
            parsed > 0 && refused > 0,
            "{parsed} parsed, {refused} refused"
        );
    }

    #[test]
    fn names_are_stable_valid_and_distinct() {
        assert_eq!(instance_names("web-1", 2), ["web-1-wd0", "web-1-wd1"]);
        let odd = ["my vm", "über", "-x", ".hidden", &"a".repeat(200), "api"];
        let mut seen = std::collections::BTreeSet::new();
        for d in odd {
            let n = &instance_names(d, 1)[0];
            assert_eq!(n, &instance_names(d, 1)[0], "stable");
            assert!(n.len() <= 64, "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                "{n}"
            );
            assert!(!n.starts_with(['.', '-']), "{n}");
            assert!(seen.insert(n.clone()), "{d} -> {n} is not distinct");
        }
        // Two names that clean up the same still differ.
        assert_ne!(instance_names("a b", 1), instance_names("a_b", 1));
        assert_ne!(instance_names("a b", 1), instance_names("a/b", 1));
    }
}
