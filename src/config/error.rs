//! Configuration errors, each placed at `file:line:column` and rendered the
//! way compilers do: the message, the offending line, a caret under the
//! column, and (for duplicates) a note pointing at the first definition.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// What is wrong, without where. Every message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("{path}: no *.yaml or *.yml files in this directory")]
    EmptyDirectory { path: PathBuf },
    /// YAML syntax, an unknown key, a wrong type or a missing key: what the
    /// YAML parser reported.
    #[error("{0}")]
    Yaml(String),
    #[error("{what} {value} is out of range (expected {expected})")]
    OutOfRange {
        what: &'static str,
        value: u64,
        expected: std::borrow::Cow<'static, str>,
    },
    #[error(
        "invalid {what} name '{name}' (expected 1 to 63 characters: letters, digits, '-', '_', '.', starting with a letter or digit)"
    )]
    BadName { what: &'static str, name: String },
    #[error(
        "invalid {what} '{name}' (expected a name of 1 to 32 characters: letters, digits, '-', '_', '.', not starting with '-'; or a number)"
    )]
    BadAccount { what: &'static str, name: String },
    #[error("'{name}' is reserved for NUMA node links (`nodeN`); name the accelerator otherwise")]
    ReservedName { name: String },
    #[error("duplicate {what} '{name}' (first defined at {first})")]
    Duplicate {
        what: &'static str,
        name: String,
        first: String,
    },
    #[error("unknown backend '{0}' (known: soft, uacce, idxd)")]
    UnknownBackend(String),
    #[error("unknown operation '{name}' (known: all, {known})")]
    UnknownOperation { name: String, known: String },
    #[error("empty operation list (expected `all` or operation names such as deflate-compress)")]
    NoOperations,
    #[error("'all' cannot be combined with other operation names")]
    AllWithOthers,
    #[error("invalid cpu list '{list}': {why} (expected e.g. \"0-3,8\")")]
    BadCpuList { list: String, why: String },
    #[error("unknown QoS policy '{name}' (defined: {defined})")]
    UnknownPolicy { name: String, defined: String },
    #[error("unknown accelerator '{name}' (defined: {defined})")]
    UnknownAccelerator { name: String, defined: String },
    #[error("unknown NUMA node {id} (defined: {defined})")]
    UnknownNumaNode { id: u32, defined: String },
    #[error("a link to itself")]
    SelfLink,
    #[error(
        "{a} and {b} are already linked (a `numa_node` is a link too; expected one link per pair)"
    )]
    DuplicateLink { a: String, b: String },
    #[error(
        "node{a}–node{b} distance {here}, but node{b} gives node{a} {there} (expected the same both ways)"
    )]
    AsymmetricDistance {
        a: u32,
        b: u32,
        here: u32,
        there: u32,
    },
    #[error("{field} needs {needs}")]
    Needs {
        field: &'static str,
        needs: &'static str,
    },
    #[error("type '{name}' has no function (expected `queues` + `operations`, or `functions`)")]
    NoFunction { name: String },
    #[error(
        "type '{name}' has both the one-function shorthand (`queues`, `operations`) and `functions` (expected one of them)"
    )]
    BothShapes { name: String },
    #[error("type '{name}' has {queues} queues in all (expected at most 64: one device)")]
    TooManyQueues { name: String, queues: u32 },
    #[error("empty accelerator list (expected accelerator names, or no `accelerators` key)")]
    EmptyAllowList,
    /// The host graph rules out every combination (distances, or functions
    /// that fit alone but not together), even with nothing else placed.
    #[error("type '{name}' can never be placed on this host: {reason}")]
    NeverPlaceable { name: String, reason: String },
    /// What the YAML declares contradicts what discovery found on the host
    /// (`docs/topology.md`, merge rules).
    #[error("conflicts with this host: {message}")]
    HostConflict { message: String },
    #[error("the host graph the configuration declares is inconsistent: {reason}")]
    Topology { reason: String },
    /// Per accelerator, why it cannot host the function.
    #[error("type '{name}' {function} can never be placed: {}", reasons.join("; "))]
    Unhostable {
        name: String,
        function: String,
        reasons: Vec<String>,
    },
}

/// A place in a file: 1-based line and column (in characters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Place {
    pub file: String,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // A whole file or directory (cannot read it, nothing in it).
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}:{}", self.file, self.line, self.column)
        }
    }
}

/// An error at a place, with the text of the offending line so it can be
/// shown without the file at hand, and optionally a second place (the first
/// definition of a duplicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub place: Place,
    pub source_line: String,
    pub error: ConfigError,
    pub note: Option<Box<Note>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub place: Place,
    pub source_line: String,
    pub message: String,
}

/// Longest source line shown whole; a longer one is shown as a window of
/// this many characters around the column.
const SNIPPET_WIDTH: usize = 120;

fn snippet(f: &mut fmt::Formatter<'_>, line: u32, column: u32, text: &str) -> fmt::Result {
    if line == 0 {
        return Ok(());
    }
    let num = line.to_string();
    let pad = " ".repeat(num.len());
    let chars: Vec<char> = text.chars().collect();
    let col = (column.max(1) - 1) as usize;
    let (start, end) = if chars.len() <= SNIPPET_WIDTH {
        (0, chars.len())
    } else {
        let start = col.saturating_sub(SNIPPET_WIDTH / 2).min(chars.len());
        (start, (start + SNIPPET_WIDTH).min(chars.len()))
    };
    let mut shown = String::new();
    let mut lead = String::new();
    if start > 0 {
        shown.push('…');
        lead.push(' ');
    }
    for (i, &c) in chars[start..end].iter().enumerate() {
        // Keep tabs so the caret lines up under a tab-indented column.
        let c = if c.is_control() && c != '\t' { '?' } else { c };
        shown.push(c);
        if start + i < col {
            lead.push(if c == '\t' { '\t' } else { ' ' });
        }
    }
    if end < chars.len() {
        shown.push('…');
    }
    write!(f, "\n {pad} |\n {num} | {shown}\n {pad} | {lead}^")
}

/// Names and values come from the file: escape control characters so that a
/// hostile file cannot drive the terminal that shows its errors.
pub(crate) fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: error: {}",
            self.place,
            printable(&self.error.to_string())
        )?;
        snippet(f, self.place.line, self.place.column, &self.source_line)?;
        if let Some(n) = &self.note {
            write!(f, "\n{}: note: {}", n.place, n.message)?;
            snippet(f, n.place.line, n.place.column, &n.source_line)?;
        }
        Ok(())
    }
}

/// Every error found in one load, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Located>);

impl std::error::Error for Located {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// No `source`: the Display already renders every error in full, and a
/// chain would print each one again (`{:#}` in the CLI).
impl std::error::Error for ConfigErrors {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The JSON form `wdvirt validate --json` prints for each error.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorRecord {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
    pub rendered: String,
}

impl Located {
    /// An error found after loading (by a layer that knows more than YAML,
    /// such as the host graph's distances), placed at `place` with its line
    /// read back from the file.
    pub fn at(place: Place, error: ConfigError) -> Located {
        let source_line = std::fs::read_to_string(&place.file)
            .map(|text| super::validate::line_of(&text, place.line))
            .unwrap_or_default();
        Located {
            place,
            source_line,
            error,
            note: None,
        }
    }

    pub fn record(&self) -> ErrorRecord {
        ErrorRecord {
            file: self.place.file.clone(),
            line: self.place.line,
            column: self.place.column,
            message: self.error.to_string(),
            rendered: self.to_string(),
        }
    }
}
