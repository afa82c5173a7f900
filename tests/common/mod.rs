//! Test harness: a private swtpm per test, and helpers for tpm2-tools.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A swtpm process with its own ports and state directory, stopped on drop.
pub struct Swtpm {
    child: Option<Child>,
    pub port: u16,
    pub ctrl_port: u16,
    state: tempfile::TempDir,
}

/// The swtpm TCTI expects the control port right after the server port.
fn free_port_pair() -> (u16, u16) {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let mut x = seed;
    loop {
        // xorshift: no rand dependency needed for picking a port.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 40000) as u16;
        let a = TcpListener::bind(("127.0.0.1", port));
        let b = TcpListener::bind(("127.0.0.1", port + 1));
        if a.is_ok() && b.is_ok() {
            return (port, port + 1);
        }
    }
}

impl Swtpm {
    pub fn start() -> Swtpm {
        let mut last = String::new();
        // Ports are picked free, then released; retry if another test won the race.
        for _ in 0..5 {
            let (port, ctrl_port) = free_port_pair();
            let mut s = Swtpm {
                child: None,
                port,
                ctrl_port,
                state: tempfile::Builder::new()
                    .prefix("dk-swtpm-")
                    .tempdir()
                    .unwrap(),
            };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("swtpm did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2"])
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.ctrl_port
            ))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.path().display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run swtpm: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("swtpm exited with {status}"));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // A probe connection counts as a client; give swtpm a moment.
                std::thread::sleep(Duration::from_millis(20));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err("swtpm did not listen within 10 s".into())
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Kills swtpm; its state directory stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts swtpm again on the same ports and state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().unwrap();
    }

    /// Runs a tpm2-tools command against this TPM.
    pub fn tool(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// TPM2_Clear with the (empty) platform authorization.
    pub fn clear(&self) {
        self.tool(&["tpm2_clear", "-c", "p"]);
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dk-test-")
        .tempdir()
        .unwrap()
}

pub fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}
