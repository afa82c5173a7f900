//! The README's recipes, run for real through the kernel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use std::process::Command;

use common::KernelEnv;

fn sh(script: &str) -> (bool, String) {
    let out = Command::new("keyctl")
        .args(["session", "-", "bash", "-c", script])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn encrypted_key_with_a_derived_master_survives_sessions_not_rotation() {
    let env = KernelEnv::new("");
    let blob = env.dir.path().join("app-key.blob");
    let master = env.desc("master");
    let (ok, out) = sh(&format!(
        "set -e; keyctl request2 user {master} '32 machine' @s >/dev/null
         keyctl add encrypted app-key 'new default user:{master} 32' @s >/dev/null
         keyctl pipe %encrypted:app-key > {b}",
        b = blob.display()
    ));
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&blob).unwrap();
    assert!(
        text.starts_with(&format!("default user:{master} 32 ")),
        "{text}"
    );
    // A new session (a re-imaged host looks the same): re-derive, load.
    let load = |callout: &str| {
        sh(&format!(
            "set -e; keyctl request2 user {master} '{callout}' @s >/dev/null
             keyctl add encrypted app-key \"load $(cat {b})\" @s",
            b = blob.display()
        ))
    };
    let (ok, out) = load("32 machine");
    assert!(ok, "{out}");
    // Another master (a rotated epoch) cannot open the blob.
    let (ok, _) = load("32 machine epoch=1");
    assert!(!ok);
}

// ---------------------------------------------------------------------------
// docs/RECIPES.md, run as written: each `<!-- test: NAME -->` block there is
// read from the file and executed here, with `dkey` and `fscrypt-derived`
// on PATH as small wrappers (the test's description prefix, the helper from
// scripts/), and `derived:` in keyctl descriptions replaced by the test's
// prefix. A simulated reboot stops the broker and restarts the TPM on its
// state; everything else (loop device, mount, keyrings) is re-created.

use std::path::{Path, PathBuf};
use std::process::Output;

const DKEY: &str = env!("CARGO_BIN_EXE_dkey");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The shell block marked `<!-- test: NAME -->` in docs/RECIPES.md.
fn recipe(name: &str) -> String {
    let doc = std::fs::read_to_string(Path::new(REPO).join("docs/RECIPES.md")).unwrap();
    let marker = format!("<!-- test: {name} -->");
    let mut lines = doc
        .lines()
        .skip_while(|l| l.trim() != marker)
        .skip(1)
        .skip_while(|l| !l.starts_with("```"));
    assert!(lines.next().is_some(), "no block {name} in docs/RECIPES.md");
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    assert!(!body.is_empty(), "empty block {name}");
    body.join("\n") + "\n"
}

/// A directory with `dkey` and `fscrypt-derived` as the recipes call them.
fn tools(env: &KernelEnv) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let scripts = [
        (
            "dkey",
            format!(
                "#!/bin/sh\ncase \"$1\" in derive|pub|sign) exec {DKEY} \"$@\" --prefix {p};; \
                 *) exec {DKEY} \"$@\";; esac\n",
                p = env.prefix
            ),
        ),
        (
            "fscrypt-derived",
            format!("#!/bin/sh\nexec /usr/bin/python3 {REPO}/scripts/fscrypt-derived.py \"$@\"\n"),
        ),
    ];
    for (name, text) in scripts {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// Runs `script` with bash (`set -euo pipefail`) in a new session keyring,
/// in `cwd`, with the recipe tools first on PATH and `vars` set.
fn run(env: &KernelEnv, cwd: &Path, script: &str, vars: &[(&str, &str)]) -> Output {
    let path = format!(
        "{}:{}",
        tools(env).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("keyctl");
    cmd.args(["session", "-", "bash", "-c"])
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(cwd)
        .env("PATH", path);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// Like `run`, and the script must succeed; returns its stdout.
fn ok(env: &KernelEnv, cwd: &Path, script: &str, vars: &[(&str, &str)]) -> String {
    let out = run(env, cwd, script, vars);
    assert!(out.status.success(), "{script}\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The keyctl recipes with the test's description prefix.
fn keyctl_recipe(env: &KernelEnv, name: &str) -> String {
    recipe(name).replace("derived:", &format!("{}:", env.prefix))
}

/// A simulated reboot: the broker and the TPM go away, the TPM comes back
/// with the same state (its seed), nothing else survives.
fn reboot(env: &mut KernelEnv) {
    let before = env.swtpm.pid();
    env.stop_broker();
    env.swtpm.restart();
    assert_ne!(before, env.swtpm.pid(), "swtpm did not restart");
}

/// A loop device on an image file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {}", text(&out));
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mounted filesystem, unmounted on drop (lazily if it is busy).
struct Mount(PathBuf);

impl Mount {
    fn new(dev: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").arg(dev).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.0).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn sparse_file(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
}

#[test]
fn luks2_keyslot_from_a_derived_key_opens_after_a_reboot() {
    let mut env = KernelEnv::new("");
    let img = env.dir.path().join("luks.img");
    sparse_file(&img, 32);
    let vars = [("IMG", img.to_str().unwrap())];
    let cwd = env.dir.path().to_path_buf();
    ok(&env, &cwd, &recipe("luks-format"), &vars);
    let header = std::fs::read(&img).unwrap();
    assert!(header.starts_with(b"LUKS\xba\xbe"), "no LUKS header");
    ok(&env, &cwd, &recipe("luks-check"), &vars);

    reboot(&mut env);
    ok(&env, &cwd, &recipe("luks-check"), &vars);
    // Another key (another name, or a rotated epoch) is refused.
    for other in ["luks-other", "--epoch 1 luks-data"] {
        let script = recipe("luks-check").replace("luks-data", other);
        let out = run(&env, &cwd, &script, &vars);
        assert!(!out.status.success(), "{other} opened the volume");
        assert!(text(&out).contains("No key available"), "{}", text(&out));
    }
    // The keyscript, as cryptdisks calls it (key file field as $1).
    let ks = env.dir.path().join("dkey-keyscript");
    let bin = tools(&env);
    std::fs::write(
        &ks,
        recipe("luks-keyscript").replace("/usr/local/bin/dkey", bin.join("dkey").to_str().unwrap()),
    )
    .unwrap();
    ok(
        &env,
        &cwd,
        "sh \"$KS\" luks-data | cryptsetup open --test-passphrase --key-file=- \"$IMG\"",
        &[("KS", ks.to_str().unwrap()), vars[0]],
    );
}

#[test]
fn fscrypt_directory_keyed_by_a_derived_key_reads_back_after_a_reboot() {
    let mut env = KernelEnv::new("");
    let img = env.dir.path().join("fs.img");
    sparse_file(&img, 16);
    let mnt = env.dir.path().join("mnt");
    let cwd = env.dir.path().to_path_buf();
    let m = mnt.to_str().unwrap();

    let dev = Loop::attach(&img);
    ok(&env, &cwd, &recipe("fscrypt-mkfs"), &[("DEV", &dev.0)]);
    let mount = Mount::new(&dev.0, &mnt);
    let id = ok(
        &env,
        &cwd,
        &(recipe("fscrypt-unlock")
            + &recipe("fscrypt-create")
            + "echo 'a secret note' > \"$MNT/private/note.txt\"
               mkdir \"$MNT/private/sub\"; echo deeper > \"$MNT/private/sub/more.txt\"
               echo \"$ID\""),
        &[("MNT", m)],
    );
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 32, "{id}");
    // The provisioning key was dropped: nothing of it in any keyring.
    assert!(!common::proc_keys().contains("fscrypt-srv"));
    // The raw key on stdin gives the same identifier.
    let raw = ok(
        &env,
        &cwd,
        "dkey derive --binding machine --len 64 --stdout fscrypt-srv | fscrypt-derived add-key \"$MNT\"",
        &[("MNT", m)],
    );
    assert_eq!(raw.trim(), id);
    let vars = [("MNT", m), ("ID", id.as_str())];
    // remove-key takes away one claim per add: both adds were root's (one user),
    // so one removal removes the key.
    ok(&env, &cwd, &recipe("fscrypt-lock"), &vars);
    let names = std::fs::read_dir(mnt.join("private"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| n != "note.txt" && n != "sub"),
        "names are not ciphertext: {names:?}"
    );
    let ls = ok(&env, &cwd, "ls \"$MNT/private\"", &vars);
    assert!(!ls.contains("note.txt"), "{ls}");
    let locked = run(&env, &cwd, "cat \"$MNT\"/private/*", &vars);
    assert!(!locked.status.success());
    assert!(
        text(&locked).contains("Required key not available"),
        "{}",
        text(&locked)
    );
    let st = ok(&env, &cwd, "fscrypt-derived status \"$MNT\" \"$ID\"", &vars);
    assert_eq!(st.trim(), "absent");

    // Reboot: unmount, detach, TPM and broker restarted, all attached anew.
    drop(mount);
    drop(dev);
    reboot(&mut env);
    let dev = Loop::attach(&img);
    let _mount = Mount::new(&dev.0, &mnt);
    let again = ok(
        &env,
        &cwd,
        &(recipe("fscrypt-unlock") + "echo \"$ID\""),
        &[("MNT", m)],
    );
    assert_eq!(again.trim(), id);
    assert_eq!(
        std::fs::read_to_string(mnt.join("private/note.txt")).unwrap(),
        "a secret note\n"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("private/sub/more.txt")).unwrap(),
        "deeper\n"
    );
    // Another derived key is another identifier, and cannot be used to
    // read this directory (its policy names the first one).
    let other = ok(
        &env,
        &cwd,
        &(recipe("fscrypt-unlock").replace("fscrypt-srv", "fscrypt-other") + "echo \"$ID\""),
        &[("MNT", m)],
    );
    assert_ne!(other.trim(), id);
    ok(&env, &cwd, &recipe("fscrypt-lock"), &vars);
}

#[test]
fn wireguard_public_key_is_the_same_after_a_reboot() {
    let mut env = KernelEnv::new("");
    let cwd = env.dir.path().to_path_buf();
    let before = ok(&env, &cwd, &recipe("wg-pubkey"), &[]);
    assert_eq!(before.trim().len(), 44, "{before}");
    let private = ok(
        &env,
        &cwd,
        "dkey derive --binding machine --len 32 --stdout wg0 | base64",
        &[],
    );
    assert_ne!(private.trim(), before.trim());
    reboot(&mut env);
    let after = ok(&env, &cwd, &recipe("wg-pubkey"), &[]);
    assert_eq!(before, after);
    let other = ok(&env, &cwd, &recipe("wg-pubkey").replace("wg0", "wg1"), &[]);
    assert_ne!(before, other);
}

#[test]
fn encrypted_key_recipe_as_documented_loads_after_a_reboot() {
    let mut env = KernelEnv::new("");
    let cwd = env.dir.path().to_path_buf();
    let master = env.desc("master");
    ok(&env, &cwd, &keyctl_recipe(&env, "enc-new"), &[]);
    let blob = std::fs::read_to_string(cwd.join("app-key.blob")).unwrap();
    assert!(
        blob.starts_with(&format!("default user:{master} 32 ")),
        "{blob}"
    );
    reboot(&mut env);
    let loaded = ok(
        &env,
        &cwd,
        &(keyctl_recipe(&env, "enc-load")
            + "keyctl describe %encrypted:app-key
               ! keyctl search @s user "
            + &master
            + " 2>/dev/null"),
        &[],
    );
    assert!(loaded.contains("encrypted: app-key"), "{loaded}");
    // A rotated master does not open the blob.
    let rotated = keyctl_recipe(&env, "enc-load").replace("32 machine", "32 machine epoch=1");
    assert!(!run(&env, &cwd, &rotated, &[]).status.success());
}

#[test]
fn keyctl_recipe_uses_a_fresh_tag_and_leaves_nothing_behind() {
    let env = KernelEnv::new("");
    let cwd = env.dir.path().to_path_buf();
    let script = keyctl_recipe(&env, "keyctl-tagged");
    assert!(script.contains(&format!("{}:db#$tag", env.prefix)));
    let first = ok(&env, &cwd, &script, &[]);
    let second = ok(&env, &cwd, &script, &[]);
    // Same key each time, the one dkey derives.
    assert_eq!(first, second);
    let expected = ok(
        &env,
        &cwd,
        "dkey derive --binding user --len 32 --stdout db | sha256sum",
        &[],
    );
    assert_eq!(first, expected);
    // Invalidated: every key of this prefix is gone or marked `i` (waiting
    // for the kernel's garbage collector), and each request had its own tag.
    let keys = common::proc_keys();
    let ours: Vec<&str> = keys
        .lines()
        .filter(|l| l.contains(&format!("{}:db", env.prefix)))
        .collect();
    for line in &ours {
        let flags = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(flags.ends_with('i'), "left valid: {line}");
        assert!(line.contains(":db#"), "untagged: {line}");
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: units not verified");
        return;
    }
    let dir = common::scratch_dir();
    // As src/setup/embedded.rs writes it, quoted in docs/RECIPES.md.
    let swtpm = "[Unit]\nDescription=derived-keys embedded software TPM (swtpm): no hardware \
                 protection\n\n[Service]\nExecStart=/usr/local/bin/dkey swtpm-run\n\
                 ExecStartPost=/usr/local/bin/dkey swtpm-lockdown\nRestart=on-failure\n\n\
                 [Install]\nWantedBy=multi-user.target\n";
    let doc = std::fs::read_to_string(Path::new(REPO).join("docs/RECIPES.md")).unwrap();
    let quoted: Vec<String> = swtpm
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("   {l}")
            }
        })
        .collect();
    assert!(
        doc.contains(&quoted.join("\n")),
        "RECIPES.md quotes another swtpm unit"
    );
    let mut units = vec![("derived-keys-swtpm.service".to_owned(), swtpm.to_owned())];
    for e in std::fs::read_dir(Path::new(REPO).join("docs/units")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        units.push((name, std::fs::read_to_string(e.path()).unwrap()));
    }
    assert!(units.len() >= 3, "{units:?}");
    for (name, body) in &units {
        // The build's dkey where the unit names the installed one.
        std::fs::write(
            dir.path().join(name),
            body.replace("/usr/local/bin/dkey", DKEY),
        )
        .unwrap();
    }
    for (name, _) in &units {
        let unit = name.replace("@.", "@data.");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(&unit))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}",
            text(&out)
        );
    }
}
