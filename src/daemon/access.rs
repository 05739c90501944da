//! Who may use the daemon and its instances.
//!
//! * **The API socket** is mode 0660, its group the API group (`--api-group`,
//!   or `daemon: api_group` in the configuration; by default the daemon's
//!   own group). The kernel refuses `connect(2)` to anyone else; the daemon
//!   checks again by the caller's credentials (`SO_PEERCRED`, and
//!   `SO_PEERGROUPS` for supplementary groups), so a socket made reachable
//!   some other way (a `chmod`, a bind mount into a container, a copy of
//!   the fd) still refuses callers outside the group: HTTP 403 with
//!   `kind: forbidden` and the rule in the message, counted in
//!   [`ApiAccess::refused`]. Root and the daemon's own user always pass.
//! * **Instance sockets** are mode 0600, owned by the user the VMM runs as:
//!   the definition's `owner`, else the daemon's `--instance-owner`
//!   (`daemon: instance_owner`), else the daemon's own user. A VMM running
//!   as anyone else is refused by the filesystem (EACCES at `connect(2)`).
//!
//! Names are resolved on the host the daemon runs on (`nix`'s
//! `getpwnam_r`/`getgrnam_r`); a number is taken as a uid or gid as it is.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::transport::LogBudget;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("no user named '{0}' on this host (give a user name or a numeric uid)")]
    NoSuchUser(String),
    #[error("no group named '{0}' on this host (give a group name or a numeric gid)")]
    NoSuchGroup(String),
    #[error("cannot look up '{name}' in the host's user or group database: {source}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// A user, resolved: what owns an instance socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserId {
    pub uid: u32,
    /// The name as the host's user database has it (the number when the
    /// uid has no entry).
    pub name: String,
}

/// A group, resolved: the API socket's group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupId {
    pub gid: u32,
    pub name: String,
}

/// `s` as a user: a name the host knows, or a numeric uid (which need not
/// have an entry: a VMM may run as a bare uid).
pub fn resolve_user(s: &str) -> Result<UserId, AccessError> {
    use nix::unistd::{Uid, User};
    let lookup = |source| AccessError::Lookup {
        name: s.to_string(),
        source,
    };
    if let Ok(uid) = s.parse::<u32>() {
        let name = User::from_uid(Uid::from_raw(uid))
            .map_err(lookup)?
            .map_or_else(|| uid.to_string(), |u| u.name);
        return Ok(UserId { uid, name });
    }
    match User::from_name(s).map_err(lookup)? {
        Some(u) => Ok(UserId {
            uid: u.uid.as_raw(),
            name: u.name,
        }),
        None => Err(AccessError::NoSuchUser(s.to_string())),
    }
}

/// `s` as a group: a name the host knows, or a numeric gid.
pub fn resolve_group(s: &str) -> Result<GroupId, AccessError> {
    use nix::unistd::{Gid, Group};
    let lookup = |source| AccessError::Lookup {
        name: s.to_string(),
        source,
    };
    if let Ok(gid) = s.parse::<u32>() {
        let name = Group::from_gid(Gid::from_raw(gid))
            .map_err(lookup)?
            .map_or_else(|| gid.to_string(), |g| g.name);
        return Ok(GroupId { gid, name });
    }
    match Group::from_name(s).map_err(lookup)? {
        Some(g) => Ok(GroupId {
            gid: g.gid.as_raw(),
            name: g.name,
        }),
        None => Err(AccessError::NoSuchGroup(s.to_string())),
    }
}

/// The daemon's own user (its effective uid), named.
pub fn own_user() -> UserId {
    let uid = rustix::process::geteuid().as_raw();
    resolve_user(&uid.to_string()).unwrap_or(UserId {
        uid,
        name: uid.to_string(),
    })
}

/// The daemon's own group (its effective gid), named.
pub fn own_group() -> GroupId {
    let gid = rustix::process::getegid().as_raw();
    resolve_group(&gid.to_string()).unwrap_or(GroupId {
        gid,
        name: gid.to_string(),
    })
}

/// Who is calling, as the kernel recorded it when the caller connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCreds {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`SO_PEERGROUPS`); empty when the kernel would
    /// not say.
    pub groups: Vec<u32>,
}

impl PeerCreds {
    /// Credentials no kernel gives: refused by every rule.
    pub const UNKNOWN: PeerCreds = PeerCreds {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
        groups: Vec::new(),
    };

    /// The credentials of the process at the other end of `sock`.
    pub fn of(sock: BorrowedFd<'_>) -> PeerCreds {
        match rustix::net::sockopt::socket_peercred(sock) {
            Ok(c) => PeerCreds {
                pid: c.pid.as_raw_nonzero().get(),
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
                groups: peer_groups(sock).unwrap_or_default(),
            },
            Err(_) => PeerCreds::UNKNOWN,
        }
    }
}

/// The supplementary groups of the process at the other end of `sock`, as
/// they were when it connected (`SO_PEERGROUPS`, Linux 4.13+).
pub fn peer_groups(sock: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    const GID: usize = size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `groups` owns `len` writable bytes of `gid_t`s, the
        // kernel writes at most `len` bytes there and the new length into
        // `len`; `sock` is a live fd borrowed for the call.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / GID);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // Too small: the kernel said how much is needed (at most
        // NGROUPS_MAX, 65536 groups).
        let need = len as usize / GID;
        if e.raw_os_error() == Some(libc::ERANGE) && need > groups.len() && need <= 65536 {
            groups.resize(need, 0);
            continue;
        }
        return Err(e);
    }
}

/// What the API answers a caller it refuses (HTTP 403, `kind: forbidden`).
pub const FORBIDDEN: &str = "forbidden";

/// The API's rule: root, the daemon's own user, and members of the API
/// group pass; everyone else is refused and counted.
#[derive(Debug)]
pub struct ApiAccess {
    pub group: GroupId,
    pub daemon_uid: u32,
    refused: AtomicU64,
    /// Refusals logged per second (a local user could call in a loop).
    log: LogBudget,
}

/// What `GET /v1/access` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessView {
    /// The API socket's group: its members may call.
    pub api_group: GroupId,
    /// Callers refused by their credentials since the daemon started.
    pub refused_callers: u64,
    /// Who owns an instance socket when its definition names nobody.
    pub instance_owner: UserId,
}

impl ApiAccess {
    /// The rule for `group`, or the daemon's own group.
    pub fn new(group: Option<GroupId>) -> ApiAccess {
        ApiAccess {
            group: group.unwrap_or_else(own_group),
            daemon_uid: rustix::process::geteuid().as_raw(),
            refused: AtomicU64::new(0),
            log: LogBudget::new(10),
        }
    }

    /// Callers refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether `c` may call; a refusal is counted and its message names
    /// the rule.
    pub fn check(&self, c: &PeerCreds) -> Result<(), String> {
        let g = self.group.gid;
        if c.uid == 0 || c.uid == self.daemon_uid || c.gid == g || c.groups.contains(&g) {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        let msg = format!(
            "uid {} (gid {}) may not use the wdvirt API: callers must be root, the daemon's user (uid {}) or in its API group '{}' (gid {}); the daemon's --api-group or `daemon: api_group` sets the group",
            c.uid, c.gid, self.daemon_uid, self.group.name, g
        );
        if self.log.take() {
            tracing::warn!(
                pid = c.pid,
                uid = c.uid,
                gid = c.gid,
                "API call refused: {msg}"
            );
        }
        Err(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(uid: u32, gid: u32, groups: &[u32]) -> PeerCreds {
        PeerCreds {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_the_daemons_user_and_the_group_pass_and_others_are_refused_and_counted() {
        let a = ApiAccess {
            group: GroupId {
                gid: 4242,
                name: "wdvirt".into(),
            },
            daemon_uid: 999,
            refused: AtomicU64::new(0),
            log: LogBudget::new(10),
        };
        assert!(a.check(&creds(0, 1, &[])).is_ok(), "root");
        assert!(a.check(&creds(999, 1, &[])).is_ok(), "the daemon's user");
        assert!(a.check(&creds(1000, 4242, &[])).is_ok(), "primary group");
        assert!(
            a.check(&creds(1000, 100, &[7, 4242])).is_ok(),
            "supplementary"
        );
        assert_eq!(a.refused(), 0);
        let e = a.check(&creds(1000, 100, &[7])).unwrap_err();
        assert!(
            e.contains("'wdvirt' (gid 4242)") && e.contains("uid 1000"),
            "{e}"
        );
        assert!(
            a.check(&PeerCreds::UNKNOWN).is_err(),
            "unknown fails closed"
        );
        assert_eq!(a.refused(), 2);
    }

    #[test]
    fn names_and_numbers_resolve_and_unknown_names_are_typed_errors() {
        assert_eq!(resolve_user("root").unwrap().uid, 0);
        assert_eq!(resolve_user("0").unwrap().name, "root");
        // A bare uid with no entry is a valid owner.
        assert_eq!(resolve_user("3999999").unwrap().name, "3999999");
        assert_eq!(resolve_group("root").unwrap().gid, 0);
        assert!(matches!(
            resolve_user("no-such-user-wdvirt"),
            Err(AccessError::NoSuchUser(_))
        ));
        assert!(matches!(
            resolve_group("no-such-group-wdvirt"),
            Err(AccessError::NoSuchGroup(_))
        ));
    }

    #[test]
    fn a_socket_pair_reports_our_own_credentials_and_groups() {
        use std::os::fd::AsFd;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = PeerCreds::of(a.as_fd());
        assert_eq!(c.uid, rustix::process::geteuid().as_raw());
        assert_eq!(c.gid, rustix::process::getegid().as_raw());
        assert_eq!(c.pid, std::process::id() as i32);
        let mut ours: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = c.groups.clone();
        ours.sort();
        got.sort();
        assert_eq!(got, ours);
    }
}
