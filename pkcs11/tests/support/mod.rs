//! What the module's real-program tests (and the benchmark) share: the
//! root crate's harness (a private request-key rule, swtpm and
//! configuration per test), the root binaries built once, the cdylib, and
//! running programs with the module's test-only environment.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/common/mod.rs"]
pub mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use common::KernelEnv;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// The root binaries' profile: release for the benchmark (see build.rs).
const PROFILE: &str = env!("DK_ROOT_PROFILE");

/// Builds the root crate's handler, broker and dkey once (where the
/// harness's `CARGO_BIN_EXE_derived-key-helper` points, see build.rs).
pub fn root_binaries() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if *built {
        return;
    }
    let root = Path::new(MANIFEST).join("..");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.arg("build");
    if PROFILE == "release" {
        cargo.arg("--release");
    }
    let out = cargo
        .args([
            "--quiet",
            "--locked",
            "--bin",
            "derived-key-helper",
            "--bin",
            "derived-keys-broker",
            "--bin",
            "dkey",
        ])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(Path::new(MANIFEST).join("target/root"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the handler: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    *built = true;
}

/// The root crate's dkey, built by [`root_binaries`].
pub fn dkey_exe() -> PathBuf {
    Path::new(MANIFEST).join(format!("target/root/{PROFILE}/dkey"))
}

/// The cdylib this cargo run built: beside the test (or bench) binary in
/// deps/, which `cargo test` and `cargo bench` rebuild (the copy one level
/// up is `cargo build`'s and may be stale), else that copy.
pub fn module() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let so = [deps, deps.parent().unwrap()]
        .iter()
        .map(|d| d.join("libderived_keys_pkcs11.so"))
        .find(|p| p.is_file());
    so.unwrap_or_else(|| {
        panic!(
            "libderived_keys_pkcs11.so not built near {}",
            deps.display()
        )
    })
}

/// CKA_ID of a canonical selector (its bytes), in hex as OpenSC wants it.
pub fn id(selector: &str) -> String {
    hex::encode(selector.as_bytes())
}

/// A test's kernel environment whose configuration lists `keys` in
/// `[pkcs11]`, for the module to read.
pub struct Env {
    pub kernel: KernelEnv,
}

impl Env {
    pub fn new(keys: &[&str]) -> Env {
        Env::with_conf(keys, "")
    }

    /// `tpm_extra`: more `[tpm]` lines (e.g. `hot_key_s = 60`).
    pub fn with_conf(keys: &[&str], tpm_extra: &str) -> Env {
        root_binaries();
        let list: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
        Env {
            kernel: KernelEnv::new(&format!(
                "{tpm_extra}\n[pkcs11]\nkeys = [{}]\n",
                list.join(", ")
            )),
        }
    }

    /// A command with the module's test-only environment: this test's
    /// description prefix and configuration.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("DERIVED_KEYS_PKCS11_PREFIX", &self.kernel.prefix)
            .env("DERIVED_KEYS_PKCS11_CONFIG", &self.kernel.conf);
        c
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self.command(program).args(args).output().unwrap();
        eprintln!(
            "$ {program} {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(out.status.success(), "{program} {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// dkey with this test's description prefix.
    pub fn dkey(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--prefix", &self.kernel.prefix]);
        self.ok(dkey_exe().to_str().unwrap(), &all)
    }

    pub fn path(&self, name: &str) -> String {
        self.kernel.dir.path().join(name).display().to_string()
    }

    /// The public key (DER SPKI) straight from the kernel, with keyctl.
    pub fn spki(&self, name: &str, callout: &str) -> Vec<u8> {
        self.kernel
            .request("user", &format!("{name}:pub"), callout)
            .payload()
    }

    /// A "reboot": the broker stops (its primary flushed) and the TPM
    /// restarts on the same state.
    pub fn reboot(&mut self) {
        self.kernel.stop_broker();
        self.kernel.swtpm.restart();
    }
}

/// A P-256 key in a PEM file and a self-signed certificate of it for
/// `localhost`, both made by openssl: the key-file side of a comparison.
#[allow(dead_code)]
pub fn pem_key_and_cert(env: &Env, key: &str, cert: &str) {
    env.ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-addext",
            "keyUsage=digitalSignature",
            "-days",
            "2",
        ],
    );
}

/// A free loopback TCP port for a server (the harness's: below the
/// ephemeral range).
#[allow(unused_imports)]
pub use common::free_port;

/// A server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Starts `cmd` (its output to `log`) and waits until `port` accepts.
    pub fn start(mut cmd: Command, port: u16, log: PathBuf) -> Server {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let mut s = Server { child, log };
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("server exited with {st}: {}", s.output());
            }
            assert!(
                Instant::now() < end,
                "server did not listen: {}",
                s.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
