//! The fd limit the transport lives under. Every served connection keeps
//! the VMM's DMA fds, eventfds and their mmaps open in this one process,
//! for every instance at once, so the default soft RLIMIT_NOFILE (often
//! 1024) is reached long before the hard limit: the daemon raises the soft
//! limit to the hard one at startup.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Where Linux caps RLIMIT_NOFILE when the hard limit is "unlimited"
/// (RLIM_INFINITY is refused for NOFILE: `setrlimit` checks `fs.nr_open`).
const NR_OPEN: &str = "/proc/sys/fs/nr_open";

/// Raises the soft RLIMIT_NOFILE to the hard limit (or, when the hard limit
/// is unlimited, to `fs.nr_open`). Returns `(soft, hard)` as they are after
/// the call; unlimited reads as `u64::MAX`.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let target = match lim.maximum {
        Some(h) => h,
        None => std::fs::read_to_string(NR_OPEN)?
            .trim()
            .parse::<u64>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
    };
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= target {
        return Ok((soft, hard));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: lim.maximum,
        },
    )?;
    tracing::debug!("RLIMIT_NOFILE soft limit raised from {soft} to {target}");
    Ok((target, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_ends_at_the_hard_limit() {
        let before = getrlimit(Resource::Nofile);
        // Start one below the hard limit, so the call has work to do even
        // where soft == hard already. Lowering by one is harmless to the
        // tests running beside this one.
        if let Some(h) = before.maximum {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(h - 1),
                    maximum: Some(h),
                },
            )
            .unwrap();
        }
        let (soft, hard) = raise_fd_limit().unwrap();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current, Some(soft));
        assert_eq!(after.maximum.unwrap_or(u64::MAX), hard);
        if let Some(h) = after.maximum {
            assert_eq!(soft, h, "soft == hard");
        }
        // Idempotent.
        assert_eq!(raise_fd_limit().unwrap(), (soft, hard));
    }
}
