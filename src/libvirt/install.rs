//! Installing the hook script (`libvirt-hooks/wdvirt`, with the wdvirt
//! binary's and the API socket's paths written in: libvirt runs hooks with
//! a minimal environment). Idempotent: an identical script is left as it
//! is; a different one is replaced atomically.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The script as shipped, with `@WDVIRT@` and `@API@` to fill in.
pub const TEMPLATE: &str = include_str!("../../libvirt-hooks/wdvirt");

/// Where libvirt's QEMU driver looks for hook scripts (one directory per
/// driver, every executable file in it run in turn).
pub const DEFAULT_HOOKS_DIR: &str = "/etc/libvirt/hooks";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "{what} path {path} must be absolute and free of quotes and newlines (it is written into a shell script)"
    )]
    BadPath { what: &'static str, path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The script for these paths.
pub fn script(wdvirt: &Path, api: &Path) -> Result<String, InstallError> {
    let check = |what, p: &Path| {
        let s = p.to_str().unwrap_or("'");
        if !p.is_absolute() || s.contains(['\'', '\n', '\\']) {
            return Err(InstallError::BadPath {
                what,
                path: p.to_owned(),
            });
        }
        Ok(s.to_string())
    };
    let wdvirt = check("the wdvirt binary's", wdvirt)?;
    let api = check("the API socket's", api)?;
    Ok(TEMPLATE.replace("@WDVIRT@", &wdvirt).replace("@API@", &api))
}

/// Where the script goes under a hooks directory.
pub fn hook_path(hooks_dir: &Path) -> PathBuf {
    hooks_dir.join("qemu.d").join("wdvirt")
}

/// Writes the script (mode 0755) unless an identical one is there. Returns
/// whether anything changed.
pub fn install(hooks_dir: &Path, script: &str) -> Result<bool, InstallError> {
    let path = hook_path(hooks_dir);
    let dir = path.parent().expect("hook_path has a parent");
    let werr = |source| InstallError::Write {
        path: path.clone(),
        source,
    };
    if let Ok(old) = std::fs::read_to_string(&path)
        && old == script
        && std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o111 == 0o111)
    {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(werr)?;
    crate::daemon::store::write_atomically(&path, ".wdvirt-hook", script.as_bytes(), Some(0o755))
        .map_err(werr)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_both_paths_and_install_is_idempotent() {
        let s = script(
            Path::new("/usr/bin/wdvirt"),
            Path::new("/run/wdvirt/api.sock"),
        )
        .unwrap();
        assert!(
            s.contains("exec '/usr/bin/wdvirt' --api '/run/wdvirt/api.sock' hook qemu \"$@\""),
            "{s}"
        );
        assert!(!s.contains("@WDVIRT@") && !s.contains("@API@"));
        let dir = tempfile::tempdir().unwrap();
        assert!(install(dir.path(), &s).unwrap());
        assert!(
            !install(dir.path(), &s).unwrap(),
            "second install changes nothing"
        );
        let p = hook_path(dir.path());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), s);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let other = script(Path::new("/opt/wdvirt"), Path::new("/run/x.sock")).unwrap();
        assert!(
            install(dir.path(), &other).unwrap(),
            "a different script replaces it"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), other);
        for bad in ["relative/wdvirt", "/it's", "/a\nb"] {
            let e = script(Path::new(bad), Path::new("/run/a.sock")).unwrap_err();
            assert!(e.to_string().contains("must be absolute"), "{bad}: {e}");
        }
    }
}
