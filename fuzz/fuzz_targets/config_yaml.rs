//! `config::load_str(name, text)` on arbitrary text: never panics, never
//! hangs on hostile YAML (serde-saphyr's budgets), and what it returns keeps
//! its promises. An `Err` holds at least one error, each placed inside the
//! text (or at line 0 when the parser cannot say where) with its rendering
//! starting `name:line:column: error:`. An `Ok` config holds
//! only checked values: names resolved, ranges met, and, when it declares a
//! software accelerator, every type's functions hostable by some accelerator
//! (without one, the daemon checks types against the accelerators discovery
//! finds, not the YAML alone: `daemon::catalog::check_placeable`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wdvirt::config::{self, ConfigErrors};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::load_str("f.yaml", text) {
        Err(ConfigErrors(errors)) => {
            assert!(!errors.is_empty());
            // Lines as YAML counts them: `\r\n`, `\n` or a lone `\r` ends one.
            let lines = text.replace("\r\n", "\n").replace('\r', "\n").split('\n').count() as u32;
            for e in &errors {
                assert_eq!(e.place.file, "f.yaml");
                let shown = e.to_string();
                if e.place.line == 0 {
                    // The parser could not say where (a budget, say).
                    assert!(shown.starts_with("f.yaml: error: "), "{shown}");
                } else {
                    assert!(e.place.line <= lines, "{e} (text has {lines} lines)");
                    assert!(e.place.column >= 1, "{e}");
                    assert!(
                        shown.starts_with(&format!(
                            "f.yaml:{}:{}: error: ",
                            e.place.line, e.place.column
                        )),
                        "{shown}"
                    );
                }
                assert!(!shown.contains('\u{1b}'), "{shown:?}");
            }
        }
        Ok(c) => {
            for a in &c.accelerators {
                assert!((1..=64).contains(&a.engines));
                assert!((1..=4096).contains(&a.queue_pairs));
                assert!(a.ops != 0 && a.ops & !wdvirt_abi::ALL_OPS == 0);
                assert!((1..(1 << 20)).contains(&a.pasids));
                if let Some(n) = a.numa_node {
                    assert!(c.numa_node(n).is_some());
                }
            }
            let declares_soft = c
                .accelerators
                .iter()
                .any(|a| a.backend == config::Backend::Soft);
            for t in &c.types {
                assert!((1..=64).contains(&t.queues()));
                assert!(t.max_depth.is_power_of_two() && (2..=65536).contains(&t.max_depth));
                assert!(c.qos_policy(&t.qos).is_some());
                for f in &t.functions {
                    assert!(f.ops != 0);
                    assert!(
                        !declares_soft || c.accelerators.iter().any(|a| t.can_host(a, f)),
                        "type {} accepted with an unhostable function",
                        t.name
                    );
                }
            }
        }
    }
});
