//! A `wdvirt daemon` process on a temporary directory (its YAML, state,
//! run directory and API socket all inside it), driven through the CLI as an
//! operator drives it. Shared by `tests/daemon.rs`, `tests/stats.rs`,
//! `tests/qos.rs` and `tests/libvirt.rs`.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The wdvirt binary Cargo built for these tests.
pub fn wdvirt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wdvirt"))
}

/// How a [`Daemon`] is started, beyond its YAML.
pub struct Builder {
    config: String,
    args: Vec<String>,
    capture_stderr: bool,
    terminate_on_drop: bool,
}

impl Builder {
    /// One more argument for `wdvirt daemon` (`--metrics-addr`, ...).
    pub fn arg(mut self, a: impl Into<String>) -> Builder {
        self.args.push(a.into());
        self
    }

    /// Keep the daemon's stderr for [`Daemon::term`] and for the panic of
    /// a daemon that exits before answering (else it goes nowhere). Only
    /// for daemons that log little: nothing reads the pipe meanwhile.
    pub fn capture_stderr(mut self) -> Builder {
        self.capture_stderr = true;
        self
    }

    /// Stop it with SIGTERM when dropped, failing a test whose daemon
    /// hangs on the way out (else SIGKILL).
    pub fn terminate_on_drop(mut self) -> Builder {
        self.terminate_on_drop = true;
        self
    }

    pub fn start(self) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("host.yaml"), &self.config).unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            args: self.args,
            capture_stderr: self.capture_stderr,
            terminate_on_drop: self.terminate_on_drop,
        };
        d.spawn();
        d
    }
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    args: Vec<String>,
    capture_stderr: bool,
    terminate_on_drop: bool,
}

impl Daemon {
    /// A daemon on a fresh directory with `config` as its only YAML.
    pub fn start(config: &str) -> Daemon {
        Daemon::builder(config).start()
    }

    pub fn builder(config: &str) -> Builder {
        Builder {
            config: config.to_string(),
            args: Vec::new(),
            capture_stderr: false,
            terminate_on_drop: false,
        }
    }

    pub fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    /// Where instance `name` serves.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{name}.sock"))
    }

    /// Starts the daemon process (again, after [`Daemon::kill9`]) and
    /// waits until its API answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let child = wdvirt()
            .arg("daemon")
            .arg("--config")
            .arg(self.dir.path().join("host.yaml"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--api")
            .arg(self.api())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(if self.capture_stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(self.api()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let err = self.stderr();
                panic!("the daemon exited ({status}) before answering: {err}");
            }
            assert!(Instant::now() < deadline, "the daemon never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// The CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        wdvirt()
            .arg("--api")
            .arg(self.api())
            .args(args)
            .output()
            .unwrap()
    }

    /// The CLI with `--json`, which must succeed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "wdvirt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The CLI, which must fail with exit 1; returns its message.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "wdvirt {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Every definition, as `list --defined --json` gives them.
    pub fn defined(&self) -> Vec<Value> {
        self.json(&["list", "--defined"])
            .as_array()
            .unwrap()
            .clone()
    }

    /// How many more instances of `ty` fit now.
    pub fn available(&self, ty: &str) -> u64 {
        let types = self.json(&["types"]);
        types
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == ty)
            .unwrap_or_else(|| panic!("no type {ty} in {types}"))["available_instances"]
            .as_u64()
            .unwrap()
    }

    /// Lets other users reach the daemon's directory (a temp directory is
    /// 0700), so that what the sockets' own modes and owners allow is what
    /// decides: for tests that run clients as other users.
    pub fn open_to_other_users(&self) {
        use std::os::unix::fs::PermissionsExt;
        for dir in [self.dir.path().to_path_buf(), self.run_dir()] {
            if dir.exists() {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    /// The CLI against this daemon, run as another user and group through
    /// `setpriv` (util-linux), e.g. `&["--reuid=nobody", "--regid=nogroup",
    /// "--clear-groups"]`.
    pub fn cli_as(&self, who: &[&str], args: &[&str]) -> Output {
        Command::new("setpriv")
            .args(who)
            .arg(env!("CARGO_BIN_EXE_wdvirt"))
            .arg("--api")
            .arg(self.api())
            .args(args)
            .output()
            .unwrap()
    }

    /// The daemon's fd holder socket (`--holder` is left at its default).
    pub fn holder(&self) -> PathBuf {
        self.run_dir().join("holder.sock")
    }

    /// Ends the fd holder, if one runs, closing everything it keeps.
    pub fn quit_holder(&self) {
        if let Ok(c) = wdvirt::restart::holder::HolderClient::connect(&self.holder()) {
            let _ = c.quit();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the daemon's exit status and stderr (empty unless
    /// captured).
    pub fn term(&mut self) -> (std::process::ExitStatus, String) {
        let mut c = self.child.take().expect("running");
        let status = super::terminate(&mut c);
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            use std::io::Read;
            e.read_to_string(&mut err).unwrap();
        }
        (status, err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.terminate_on_drop
            && let Some(c) = self.child.as_mut()
        {
            super::terminate(c);
        }
        self.kill9();
        // A daemon killed leaves its fd holder keeping its instances (as
        // it should): this test is over, so is the holder.
        self.quit_holder();
    }
}
