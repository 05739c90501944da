//! The one way into the daemon (Firecracker's `VmmAction`): the HTTP API,
//! the CLI and the libvirt hook all become an [`Action`], and every answer is
//! an [`Outcome`] or an [`ActionError`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::view::{AcceleratorView, InstanceView, TypeView};

/// An instance is named by its name or its UUID wherever one is expected.
pub type InstanceRef = String;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefineRequest {
    /// The instance type (see `wdvirt types`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Defaults to `TYPE-N`, the lowest free N.
    #[serde(default)]
    pub name: Option<String>,
    /// Defaults to a random (v4) UUID.
    #[serde(default)]
    pub uuid: Option<Uuid>,
    /// Start with the daemon.
    #[serde(default)]
    pub auto: bool,
    /// Place near this NUMA node (the VM's).
    #[serde(default)]
    pub numa: Option<u32>,
    /// A QoS policy overriding the type's.
    #[serde(default)]
    pub qos: Option<String>,
    /// The VM the instance is for (a libvirt domain's name).
    #[serde(default)]
    pub vm: Option<String>,
    /// The user the VMM runs as (a name or a uid): the instance's socket is
    /// 0600 and owned by this user. Defaults to the daemon's
    /// `--instance-owner`, else the daemon's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Changes to a definition; absent fields stay as they are. A running
/// instance's QoS policy changes at once (no job lost or repeated); the
/// rest takes effect at its next start, except `auto`, which only matters
/// at the daemon's start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModifyRequest {
    #[serde(default)]
    pub auto: Option<bool>,
    #[serde(default, rename = "type")]
    pub type_name: Option<String>,
    /// `Some(None)` clears the NUMA hint.
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub numa: Option<Option<u32>>,
    /// `Some(None)` goes back to the type's policy.
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub qos: Option<Option<String>>,
    /// The VM using the instance; `Some(None)` clears it. Takes effect at
    /// once (the libvirt hook records it when the domain has started).
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub vm: Option<Option<String>>,
    /// The user the VMM runs as, from the next start; `Some(None)` goes
    /// back to the daemon's instance owner.
    #[serde(
        default,
        with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub owner: Option<Option<String>>,
}

/// Distinguishes an absent field (no change) from `null` (clear it).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(inner) => inner.serialize(s),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Instance types with how many more of each fit now.
    ListTypes,
    /// Accelerators with their pools' usage and distances.
    ListAccelerators,
    /// Started instances, or with `defined` every definition.
    ListInstances {
        defined: bool,
    },
    GetInstance {
        id: InstanceRef,
    },
    Define(DefineRequest),
    Undefine {
        id: InstanceRef,
    },
    Start {
        id: InstanceRef,
    },
    Stop {
        id: InstanceRef,
    },
    Modify {
        id: InstanceRef,
        changes: ModifyRequest,
    },
    /// Statistics of started instances: all, one instance, or one VM's.
    Stats {
        #[serde(default)]
        vm: Option<String>,
        #[serde(default)]
        instance: Option<InstanceRef>,
    },
    /// Replace the daemon's program with `exe` (default: the file it was
    /// started from, as it is on disk now) without stopping any instance:
    /// the daemon execs it, and the new program takes every instance over
    /// from the fd holder, its VMM's jobs in flight.
    Upgrade(UpgradeRequest),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    #[serde(default)]
    pub exe: Option<std::path::PathBuf>,
}

/// What an accepted upgrade is about to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeView {
    /// The daemon's process: the same before and after.
    pub pid: u32,
    /// The program it is about to run, and that program's `--version`.
    pub exe: std::path::PathBuf,
    pub version: String,
    /// Instances it hands over, and how many of them have a VMM attached.
    pub instances: usize,
    pub attached: usize,
}

impl Action {
    /// Whether the action changes state (logged at info with the caller).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Action::ListTypes
                | Action::ListAccelerators
                | Action::ListInstances { .. }
                | Action::GetInstance { .. }
                | Action::Stats { .. }
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    Types(Vec<TypeView>),
    Accelerators(Vec<AcceleratorView>),
    Instances(Vec<InstanceView>),
    Instance(Box<InstanceView>),
    Stats(Box<crate::stats::report::StatsReport>),
    Upgrade(UpgradeView),
}

/// Why an action failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no instance named or with UUID '{0}' (see `wdvirt list --defined`)")]
    NoSuchInstance(String),
    #[error(
        "no VM named '{0}' (an instance names its VM with `wdvirt define --vm` or `wdvirt modify --vm`; see `wdvirt list --defined`)"
    )]
    NoSuchVm(String),
    #[error("unknown instance type '{name}' (known: {known})")]
    NoSuchType { name: String, known: String },
    #[error("unknown QoS policy '{name}' (known: {known})")]
    NoSuchPolicy { name: String, known: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot upgrade: {0}")]
    Upgrade(String),
    #[error("instance '{name}' is {state}; {what}")]
    WrongState {
        name: String,
        state: &'static str,
        what: String,
    },
    #[error("cannot place instance '{name}': {reason}")]
    Placement { name: String, reason: String },
    #[error("instance '{name}' cannot start: {reason}")]
    Start { name: String, reason: String },
    #[error(transparent)]
    Persist(#[from] super::store::PersistError),
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl ActionError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            ActionError::NoSuchInstance(_) | ActionError::NoSuchVm(_) => 404,
            ActionError::NoSuchType { .. } | ActionError::NoSuchPolicy { .. } => 400,
            ActionError::Invalid(_) | ActionError::Upgrade(_) => 400,
            ActionError::AlreadyExists(_) | ActionError::WrongState { .. } => 409,
            // Insufficient Storage: the resource an instance needs is used up.
            ActionError::Placement { .. } => 507,
            ActionError::Start { .. } | ActionError::Persist(_) => 500,
            ActionError::ShuttingDown => 503,
        }
    }

    /// A stable machine-readable kind for scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionError::NoSuchInstance(_) => "no-such-instance",
            ActionError::NoSuchVm(_) => "no-such-vm",
            ActionError::NoSuchType { .. } => "no-such-type",
            ActionError::NoSuchPolicy { .. } => "no-such-policy",
            ActionError::AlreadyExists(_) => "already-exists",
            ActionError::Invalid(_) => "invalid",
            ActionError::Upgrade(_) => "upgrade",
            ActionError::WrongState { .. } => "wrong-state",
            ActionError::Placement { .. } => "placement",
            ActionError::Start { .. } => "start-failed",
            ActionError::Persist(_) => "persist",
            ActionError::ShuttingDown => "shutting-down",
        }
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
}

impl From<&ActionError> for ErrorBody {
    fn from(e: &ActionError) -> Self {
        ErrorBody {
            error: e.to_string(),
            kind: e.kind().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modify_tells_absent_from_null() {
        let m: ModifyRequest = serde_json::from_str(r#"{"numa": null, "auto": true}"#).unwrap();
        assert_eq!(m.numa, Some(None));
        assert_eq!(m.qos, None);
        assert_eq!(m.auto, Some(true));
        let m: ModifyRequest = serde_json::from_str(r#"{"qos": "gold"}"#).unwrap();
        assert_eq!(m.qos, Some(Some("gold".into())));
        assert!(serde_json::from_str::<ModifyRequest>(r#"{"bogus": 1}"#).is_err());
        // What the CLI sends reads back as the same change: an untouched
        // field must not turn into "clear it".
        let only_auto = ModifyRequest {
            auto: Some(false),
            ..Default::default()
        };
        let text = serde_json::to_string(&only_auto).unwrap();
        assert_eq!(
            serde_json::from_str::<ModifyRequest>(&text).unwrap(),
            only_auto,
            "{text}"
        );
    }

    #[test]
    fn actions_round_trip_through_json() {
        let a = Action::Modify {
            id: "zip-0".into(),
            changes: ModifyRequest {
                auto: Some(false),
                ..Default::default()
            },
        };
        let text = serde_json::to_string(&a).unwrap();
        assert!(text.contains(r#""action":"modify""#), "{text}");
        assert_eq!(serde_json::from_str::<Action>(&text).unwrap(), a);
    }
}
