//! Reading a sysfs tree that may be the real `/sys` or a recorded copy of
//! another machine's, and may be broken: every read is bounded in size, only
//! regular files are opened (a FIFO planted in a recorded tree must not block
//! discovery), links are resolved with the kernel's own loop detection and
//! must stay inside the root, and directory listings are capped. Every
//! failure is a [`ProblemKind`] the caller files under the path it concerns.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

/// Largest attribute read (a sysfs attribute is at most a page; `config` is
/// 4 KiB; a cpu list of 8192 CPUs fits easily).
pub const MAX_ATTR_BYTES: u64 = 64 * 1024;

/// Most entries read from one directory; the rest are reported and skipped.
pub const MAX_ENTRIES: usize = 4096;

/// Why one entry of the tree could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "problem", content = "detail", rename_all = "snake_case")]
pub enum ProblemKind {
    #[error("missing")]
    Missing,
    #[error("cannot read: {0}")]
    Unreadable(String),
    #[error("not a regular file")]
    NotAFile,
    #[error("larger than {max} bytes: not a sysfs attribute", max = MAX_ATTR_BYTES)]
    TooLarge,
    #[error("not UTF-8 text")]
    NotText,
    #[error("expected {expected}, found {found:?}")]
    Garbage {
        expected: &'static str,
        found: String,
    },
    #[error("{value} is out of range (expected {expected})")]
    OutOfRange {
        value: String,
        expected: &'static str,
    },
    #[error("a symlink loop")]
    LinkLoop,
    #[error("a link that leads outside the sysfs root ({0})")]
    OutsideRoot(String),
    #[error("more than {max} entries; the rest are skipped", max = MAX_ENTRIES)]
    TooManyEntries,
    /// Read fine, but not usable: the message says why.
    #[error("{0}")]
    Skipped(String),
}

/// A sysfs root. [`Sysfs::real`] is `/sys`; any other directory is a
/// recorded tree (the process's own CPU affinity then does not apply).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    /// The root with links resolved, to check that links stay inside it.
    canonical: Option<PathBuf>,
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        let root = root.into();
        let canonical = std::fs::canonicalize(&root).ok();
        Sysfs { root, canonical }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this is the running machine's own `/sys`.
    pub fn is_live(&self) -> bool {
        self.canonical.as_deref() == Some(Path::new("/sys"))
    }

    /// Whether the root exists and is a directory.
    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// `rel` under the root (`rel` is relative: `devices/system/node`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `p` relative to the root, for messages that read the same whatever the
    /// root (`class/uacce/hisi_zip-0/flags`).
    pub fn show(&self, p: &Path) -> String {
        p.strip_prefix(&self.root)
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    }

    /// The bytes of the regular file `p`, at most `max`.
    pub fn read_bytes(&self, p: &Path, max: u64) -> Result<Vec<u8>, ProblemKind> {
        let meta = std::fs::metadata(p).map_err(io_problem)?;
        if !meta.is_file() {
            return Err(ProblemKind::NotAFile);
        }
        let f = std::fs::File::open(p).map_err(io_problem)?;
        let mut out = Vec::new();
        f.take(max + 1).read_to_end(&mut out).map_err(io_problem)?;
        if out.len() as u64 > max {
            return Err(ProblemKind::TooLarge);
        }
        Ok(out)
    }

    /// The text of attribute `p`, trimmed.
    pub fn read_text(&self, p: &Path) -> Result<String, ProblemKind> {
        let bytes = self.read_bytes(p, MAX_ATTR_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|_| ProblemKind::NotText)?;
        Ok(text.trim().to_string())
    }

    /// An unsigned decimal (or `0x` hex) attribute no larger than `max`.
    pub fn read_uint(
        &self,
        p: &Path,
        max: u64,
        expected: &'static str,
    ) -> Result<u64, ProblemKind> {
        parse_uint(&self.read_text(p)?, max, expected)
    }

    /// A signed decimal attribute (`numa_node` is -1 when unknown).
    pub fn read_int(&self, p: &Path) -> Result<i64, ProblemKind> {
        let t = self.read_text(p)?;
        t.parse::<i64>().map_err(|_| ProblemKind::Garbage {
            expected: "a whole number",
            found: clip(&t),
        })
    }

    /// A Linux cpu list attribute (`0-3,8`), possibly empty.
    pub fn read_cpulist(&self, p: &Path) -> Result<Vec<u32>, ProblemKind> {
        parse_cpulist(&self.read_text(p)?)
    }

    /// The entries of directory `p` (names and paths), sorted by name;
    /// `Missing` if it does not exist.
    pub fn list(&self, p: &Path) -> Result<(Vec<(String, PathBuf)>, bool), ProblemKind> {
        let rd = std::fs::read_dir(p).map_err(io_problem)?;
        let mut out = Vec::new();
        let mut truncated = false;
        for entry in rd {
            let Ok(entry) = entry else { continue };
            if out.len() >= MAX_ENTRIES {
                truncated = true;
                break;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push((name, entry.path()));
        }
        out.sort();
        Ok((out, truncated))
    }

    /// Where link (or directory) `p` really is, inside the root.
    pub fn resolve(&self, p: &Path) -> Result<PathBuf, ProblemKind> {
        let real = std::fs::canonicalize(p).map_err(io_problem)?;
        match &self.canonical {
            Some(root) if real.starts_with(root) => Ok(real),
            Some(_) => Err(ProblemKind::OutsideRoot(real.display().to_string())),
            None => Err(ProblemKind::Missing),
        }
    }

    /// The last path component of where link `p` points (`iommu_group` →
    /// `17`), without following it further.
    pub fn link_name(&self, p: &Path) -> Result<String, ProblemKind> {
        let target = std::fs::read_link(p).map_err(io_problem)?;
        match target.components().next_back() {
            Some(Component::Normal(n)) => Ok(n.to_string_lossy().into_owned()),
            _ => Err(ProblemKind::Garbage {
                expected: "a link to a named entry",
                found: target.display().to_string(),
            }),
        }
    }
}

fn io_problem(e: std::io::Error) -> ProblemKind {
    match e.kind() {
        std::io::ErrorKind::NotFound => ProblemKind::Missing,
        _ if e.raw_os_error() == Some(libc::ELOOP) => ProblemKind::LinkLoop,
        _ => ProblemKind::Unreadable(e.to_string()),
    }
}

/// At most 40 characters of `s`, for messages about garbage.
pub(crate) fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// A whole number in decimal or `0x` hex, at most `max`.
pub fn parse_uint(t: &str, max: u64, expected: &'static str) -> Result<u64, ProblemKind> {
    let t = t.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    match v {
        Ok(v) if v <= max => Ok(v),
        Ok(_) => Err(ProblemKind::OutOfRange {
            value: clip(t),
            expected,
        }),
        // All digits but too long for u64: absurd, not garbage.
        Err(_) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            Err(ProblemKind::OutOfRange {
                value: clip(t),
                expected,
            })
        }
        Err(_) => Err(ProblemKind::Garbage {
            expected,
            found: clip(t),
        }),
    }
}

/// Linux cpu-list syntax (`0-3,8`; empty for no CPU), sorted, deduplicated.
pub fn parse_cpulist(t: &str) -> Result<Vec<u32>, ProblemKind> {
    let t = t.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    crate::config::parse_cpu_list(t).map_err(|why| ProblemKind::Garbage {
        expected: "a cpu list such as 0-3,8",
        found: format!("{} ({why})", clip(t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_bounded_and_garbage_is_named() {
        assert_eq!(parse_uint("42\n", 100, "0..=100"), Ok(42));
        assert_eq!(parse_uint("0x1f", 100, "0..=100"), Ok(31));
        assert!(matches!(
            parse_uint("101", 100, "0..=100"),
            Err(ProblemKind::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_uint("99999999999999999999999999", u64::MAX, "a number"),
            Err(ProblemKind::OutOfRange { .. })
        ));
        assert_eq!(
            parse_uint("zz", 100, "0..=100").unwrap_err().to_string(),
            "expected 0..=100, found \"zz\""
        );
        assert_eq!(parse_cpulist(""), Ok(vec![]));
        assert_eq!(parse_cpulist("0-2,5\n"), Ok(vec![0, 1, 2, 5]));
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("0-99999").is_err());
    }

    #[test]
    fn fifos_and_loops_are_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Sysfs::new(dir.path());
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(sys.read_text(&fifo), Err(ProblemKind::NotAFile));
        let a = dir.path().join("a");
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("b")).unwrap();
        assert_eq!(sys.read_text(&a), Err(ProblemKind::LinkLoop));
        assert_eq!(sys.resolve(&a), Err(ProblemKind::LinkLoop));
        let out = dir.path().join("out");
        std::os::unix::fs::symlink("/", &out).unwrap();
        assert!(matches!(
            sys.resolve(&out),
            Err(ProblemKind::OutsideRoot(_))
        ));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'1'; MAX_ATTR_BYTES as usize + 1]).unwrap();
        assert_eq!(sys.read_text(&big), Err(ProblemKind::TooLarge));
        std::fs::write(dir.path().join("bin"), [0xff, 0xfe]).unwrap();
        assert_eq!(
            sys.read_text(&dir.path().join("bin")),
            Err(ProblemKind::NotText)
        );
        assert_eq!(
            sys.read_text(&dir.path().join("nope")),
            Err(ProblemKind::Missing)
        );
    }
}
