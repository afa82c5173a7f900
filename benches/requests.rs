//! Request latency through the real kernel, on a private swtpm:
//! derived-keys (symmetric, :pub, :sign: with P-256 and with Ed25519), the
//! floor (a do-nothing Rust
//! request-key handler), the incumbent (tpm2-tools signing with a stored key
//! blob), and 8 parallel clients. The rows the goals compare (the static
//! floor, a signature with a hot key and with the TPM, a refused request)
//! are measured side by side, one request of each in turn. Run as root:
//! `cargo bench --bench requests`.
//! Options (environment): DK_BENCH_N (requests per row, default 300),
//! DK_BENCH_INCUMBENT_N (default 30), DK_BENCH_GOALS=1 (only the rows
//! measured side by side, and their ratios: a quick check of the goal),
//! DK_BENCH_HELPER_B=<path> (one more side-by-side row: the hot-key
//! signature through another build of derived-key-helper, with the
//! derived-keys-broker beside it, its own configuration and swtpm, to
//! compare two builds of the handler or the broker in one run rather than
//! across the host's drift), DK_BENCH_ONLY_HOT=1
//! (with DK_BENCH_GOALS=1: only the hot-key rows and the static floor,
//! for profiling that path alone).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "measure.rs"]
mod measure;

use std::process::Command;
use std::time::{Duration, Instant};

use common::KernelEnv;
use derived_keys::client::KeyRequest;
use derived_keys::request::Binding;
use measure::Row;

const SIGN_P256: &str = "derived-keys :sign: (p256 machine)";
const REFUSED: &str = "derived-keys refused at parsing (EINVAL)";
const SIGN_HOT: &str = "derived-keys :sign: (p256 machine), hot key";
const SIGN_ED25519: &str = "derived-keys :sign: (ed25519 machine, 32-byte msg)";
const SIGN_HOT_B: &str = "derived-keys :sign: (p256 machine), hot key, helper B";
const STATIC_FLOOR: &str = "floor, static: do-nothing no_std handler (musl)";
const INCUMBENT: &str = "incumbent: tpm2-tools createprimary+load+sign";

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn raw_request(desc: &str, callout: &str) -> Result<Duration, i32> {
    measure::raw_request("user", desc, callout)
}

fn measure(name: &str, n: usize, mut f: impl FnMut(usize) -> Result<Duration, i32>) -> Row {
    // Warm up page cache and TPM state.
    for i in 0..5 {
        let _ = f(1_000_000 + i);
    }
    let mut row = Row {
        name: name.into(),
        samples: Vec::new(),
        errors: 0,
    };
    for i in 0..n {
        match f(i) {
            Ok(d) => row.samples.push(d),
            Err(_) => row.errors += 1,
        }
    }
    row
}

/// The rows whose ratios are the goals, measured side by side: one request
/// of each in turn, n times over, in a rotating order, so that the host's
/// drift (this VM's latency moves by 20 to 40% within an hour) weighs on
/// all of them alike.
type Probe<'a> = Box<dyn FnMut(usize) -> Result<Duration, i32> + 'a>;

fn side_by_side(n: usize, mut probes: Vec<(&str, Probe<'_>)>) -> Vec<Row> {
    for i in 0..5 {
        for (_, f) in probes.iter_mut() {
            let _ = f(1_000_000 + i);
        }
    }
    let mut rows: Vec<Row> = probes.iter().map(|(name, _)| Row::new(name)).collect();
    let count = probes.len();
    for i in 0..n {
        // Each round starts at the next row, so that no row always follows
        // the same other one (the key garbage collection a refused
        // request's clean-up starts, a TPM request's caches).
        for j in 0..count {
            let at = (i + j) % count;
            let got = (probes[at].1)(i);
            if let Err(e) = got {
                eprintln!("{}: request {i}: errno {e}", probes[at].0);
            }
            rows[at].add(got);
        }
    }
    rows
}

/// Builds a do-nothing handler with rustc and routes `prefix:*` to it.
fn floor_rule(dir: &std::path::Path, prefix: &str, src: &str, link: &[&str]) -> std::path::PathBuf {
    let bin = dir.join(format!("floor-{prefix}"));
    let st = Command::new("rustc")
        .args(["-O", "-C", "panic=abort", "--edition", "2021", "-o"])
        .arg(&bin)
        .arg(src)
        .args(link.iter().map(|a| format!("-Clink-arg={a}")))
        .status()
        .unwrap();
    assert!(st.success(), "cannot build the floor handler {src}");
    let rule = std::path::PathBuf::from(format!("/etc/request-key.d/{prefix}.conf"));
    std::fs::write(
        &rule,
        format!("create user {prefix}:* * {} %k\n", bin.display()),
    )
    .unwrap();
    rule
}

const MUSL: &str = "/usr/lib/x86_64-linux-musl";

/// The static floor's link arguments, as build.rs gives derived-key-helper.
fn musl_link() -> Option<Vec<String>> {
    std::path::Path::new(MUSL)
        .join("libc.a")
        .is_file()
        .then(|| {
            ["-nostartfiles", "-static", "-no-pie"]
                .iter()
                .map(|s| s.to_string())
                .chain(
                    ["crt1.o", "crti.o", "libc.a", "crtn.o"]
                        .iter()
                        .map(|o| format!("{MUSL}/{o}")),
                )
                .collect()
        })
}

fn incumbent(env: &KernelEnv, n: usize) -> Row {
    // The blob-keeping flow: an ECC key created once under an ECC primary
    // and stored as files; each signature re-creates the primary, loads the
    // blob, signs, and flushes, as a TPM key store does per operation.
    let d = env.dir.path();
    let p = |s: &str| d.join(s).to_str().unwrap().to_owned();
    env.swtpm.tool(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "ecc256",
        "-c",
        &p("prim.ctx"),
        "-Q",
    ]);
    env.swtpm.tool(&[
        "tpm2_create",
        "-C",
        &p("prim.ctx"),
        "-G",
        "ecc256",
        "-u",
        &p("key.pub"),
        "-r",
        &p("key.priv"),
        "-Q",
    ]);
    env.swtpm.tool(&["tpm2_flushcontext", "-t"]);
    std::fs::write(d.join("digest"), [7u8; 32]).unwrap();
    let tcti = env.swtpm.tcti();
    let run = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", &tcti)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    measure(INCUMBENT, n, |_| {
        let start = Instant::now();
        // swtpm has no resource manager: tpm2-tools' context files fill its
        // three slots unless flushed between steps.
        let ok = run(&[
            "tpm2_createprimary",
            "-C",
            "o",
            "-G",
            "ecc256",
            "-c",
            &p("prim.ctx"),
            "-Q",
        ]) && run(&["tpm2_flushcontext", "-t"])
            && run(&[
                "tpm2_load",
                "-C",
                &p("prim.ctx"),
                "-u",
                &p("key.pub"),
                "-r",
                &p("key.priv"),
                "-c",
                &p("key.ctx"),
                "-Q",
            ])
            && run(&["tpm2_flushcontext", "-t"])
            && run(&[
                "tpm2_sign",
                "-c",
                &p("key.ctx"),
                "-g",
                "sha256",
                "-d",
                "-o",
                &p("sig"),
                &p("digest"),
            ])
            && run(&["tpm2_flushcontext", "-t"]);
        if !ok {
            run(&["tpm2_flushcontext", "-t"]);
        }
        let took = start.elapsed();
        if ok {
            Ok(took)
        } else {
            Err(-1)
        }
    })
}

fn parallel(env: &KernelEnv, clients: usize, per_client: usize) -> Row {
    let digest = "ab".repeat(32);
    let prefix = env.prefix.clone();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (prefix, digest) = (prefix.clone(), digest.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..per_client {
                    out.push(raw_request(
                        &format!("{prefix}:par:sign:{digest}#c{c}i{i}"),
                        "p256 machine",
                    ));
                }
                out
            })
        })
        .collect();
    let mut row = Row {
        name: format!("{clients} parallel clients, :sign:"),
        samples: Vec::new(),
        errors: 0,
    };
    for h in handles {
        for r in h.join().unwrap() {
            match r {
                Ok(d) => row.samples.push(d),
                Err(_) => row.errors += 1,
            }
        }
    }
    row
}

/// The goals' ratios, from the rows measured side by side.
fn print_ratios(rows: &[Row]) {
    let p50 = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.pct(0.5));
    let Some(s) = p50(STATIC_FLOOR) else {
        return;
    };
    let ratio = |name: &str| p50(name).map_or(f64::NAN, |v| v / s);
    println!("side by side (one request of each in turn):");
    println!(
        "hot-key sign p50 / static floor p50: {:.3}x (goal <= 1.3x)",
        ratio(SIGN_HOT)
    );
    println!(
        "sign p50 / static floor p50: {:.2}x (every request on the TPM: hot_key_s = 0)",
        ratio(SIGN_P256)
    );
    println!(
        "refused at parsing p50 / static floor p50: {:.2}x",
        ratio(REFUSED)
    );
    if p50(SIGN_HOT_B).is_some() {
        println!(
            "hot-key sign through helper B p50 / static floor p50: {:.2}x; this helper / helper B: {:.3}",
            ratio(SIGN_HOT_B),
            ratio(SIGN_HOT) / ratio(SIGN_HOT_B)
        );
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("requests bench: run as root (it installs a request-key rule)");
        std::process::exit(1);
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not:
    // then this is a quick smoke run of the same code.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n = if smoke { 8 } else { env_n("DK_BENCH_N", 300) };
    let env = KernelEnv::new("[log]\ntarget = \"kmsg\"\n");
    let floor_prefix = format!("{}f", env.prefix);
    let static_prefix = format!("{}s", env.prefix);
    let benches = concat!(env!("CARGO_MANIFEST_DIR"), "/benches");
    let mut rules = vec![floor_rule(
        env.dir.path(),
        &floor_prefix,
        &format!("{benches}/floor_handler.rs"),
        &[],
    )];
    let musl = musl_link();
    if let Some(link) = &musl {
        let link: Vec<&str> = link.iter().map(String::as_str).collect();
        rules.push(floor_rule(
            env.dir.path(),
            &static_prefix,
            &format!("{benches}/floor_static.rs"),
            &link,
        ));
    }
    let pre = env.prefix.clone();
    let digest = "cd".repeat(32);
    // An Ed25519 signature carries its message (here 32 bytes, a digest's
    // size, so that the two signature rows move the same callout bytes
    // give or take) and names its SHA-256.
    let ed_msg = [0xcd_u8; 32];
    let ed_callout = format!("ed25519 machine msg={}", hex::encode(ed_msg));
    let ed_digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(ed_msg))
    };

    // The same signatures with the default configuration's hot keys: after
    // the first, the key's PRK is kept for a minute and no request waits
    // for the TPM.
    let hot_env = KernelEnv::new("hot_key_s = 60\n[log]\ntarget = \"kmsg\"\n");
    let hot_pre = hot_env.prefix.clone();
    let helper_b = std::env::var_os("DK_BENCH_HELPER_B").map(std::path::PathBuf::from);
    let b_pre = format!("{hot_pre}b");
    // The B row's own configuration (so its own broker: the one beside
    // the B helper), the same settings as the hot-key row's.
    let b_env = helper_b
        .as_ref()
        .map(|_| KernelEnv::new("hot_key_s = 60\n[log]\ntarget = \"kmsg\"\n"));
    let mut probes: Vec<(&str, Probe<'_>)> = vec![
        (
            SIGN_HOT,
            Box::new(|i| {
                raw_request(
                    &format!("{hot_pre}:host:sign:{digest}#i{i}"),
                    "p256 machine",
                )
            }),
        ),
        (
            SIGN_P256,
            Box::new(|i| raw_request(&format!("{pre}:host:sign:{digest}#i{i}"), "p256 machine")),
        ),
        // The handler's and the broker's round trip without the pipeline's
        // work: the callout fails to parse, before /proc, TPM or P-256.
        (
            REFUSED,
            Box::new(|i| {
                let t = Instant::now();
                let got = raw_request(&format!("{pre}:host:sign:{digest}#r{i}"), "p256 nonsense");
                let took = t.elapsed();
                // The refusal left a negative key in our process keyring
                // for a second; a few hundred of them would make every
                // other row's /proc/keys read longer.
                measure::clear_process_keyring();
                match got {
                    Err(libc::EINVAL) => Ok(took),
                    Err(e) => Err(e),
                    Ok(_) => Err(0),
                }
            }),
        ),
    ];
    if let (Some(b), Some(b_env)) = (&helper_b, &b_env) {
        let rule = std::path::PathBuf::from(format!("/etc/request-key.d/{b_pre}.conf"));
        std::fs::write(
            &rule,
            format!(
                "create user {b_pre}:* * {} --config {} --prefix {b_pre} %k %u %g\n",
                b.display(),
                b_env.conf.display()
            ),
        )
        .unwrap();
        rules.push(rule);
        probes.push((
            SIGN_HOT_B,
            Box::new(|i| raw_request(&format!("{b_pre}:host:sign:{digest}#i{i}"), "p256 machine")),
        ));
    }
    if musl.is_some() {
        probes.push((
            STATIC_FLOOR,
            Box::new(|i| raw_request(&format!("{static_prefix}:x#i{i}"), "1 user")),
        ));
    }
    if std::env::var_os("DK_BENCH_ONLY_HOT").is_some() {
        probes
            .retain(|(name, _)| *name == SIGN_HOT || *name == SIGN_HOT_B || *name == STATIC_FLOOR);
    }
    let paired = side_by_side(n, probes);
    drop(hot_env);
    drop(b_env);
    if std::env::var_os("DK_BENCH_GOALS").is_some_and(|v| v == "1") {
        for rule in rules {
            let _ = std::fs::remove_file(rule);
        }
        println!("\nmachine: {}", measure::machine());
        measure::print_table(&paired);
        print_ratios(&paired);
        return;
    }
    let mut rows = vec![
        measure("floor: do-nothing Rust handler", n, |i| {
            raw_request(&format!("{floor_prefix}:x#i{i}"), "1 user")
        }),
        measure("derived-keys symmetric (32 path)", n, |i| {
            raw_request(&format!("{pre}:db#i{i}"), "32 path")
        }),
        measure("derived-keys :pub (p256 machine)", n, |i| {
            raw_request(&format!("{pre}:host:pub#i{i}"), "p256 machine")
        }),
        measure(SIGN_ED25519, n, |i| {
            raw_request(&format!("{pre}:host:sign:{ed_digest}#i{i}"), &ed_callout)
        }),
        measure("library: KeyRequest::sign_digest", n / 2, |_| {
            let r = KeyRequest::new("host")
                .unwrap()
                .binding(Binding::Machine)
                .prefix(&pre);
            let start = Instant::now();
            r.sign_digest(&[1; 32])
                .map(|_| start.elapsed())
                .map_err(|e| e.errno())
        }),
    ];
    rows.push(parallel(&env, 8, n / 4));
    let parallel_row = rows.len() - 1;
    for rule in rules {
        let _ = std::fs::remove_file(rule);
    }
    // Objects our requests left in the TPM: the broker's primary while it
    // runs, and nothing once it has gone.
    let tcti = derived_keys::tpm::Tcti::parse(&env.swtpm.tcti()).unwrap();
    let count = || {
        derived_keys::tpm::Tpm::open(&tcti)
            .unwrap()
            .transient_count()
            .unwrap()
    };
    let with_broker = count();
    env.stop_broker();
    let leftover = count();
    rows.push(incumbent(
        &env,
        if smoke {
            2
        } else {
            env_n("DK_BENCH_INCUMBENT_N", 30)
        },
    ));

    rows.extend(paired);
    let p50 = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.pct(0.5))
            .unwrap()
    };
    let floor = rows[0].pct(0.5);
    let sign = p50(SIGN_P256);
    let sign_ed = p50(SIGN_ED25519);
    let inc = p50(INCUMBENT);
    println!("\nmachine: {}", measure::machine());
    measure::print_table(&rows);
    println!(
        "\nsign p50 / floor p50: {:.2}x (goal <= 1.5x)",
        sign / floor
    );
    println!(
        "ed25519 sign p50 / floor p50: {:.2}x; / p256 sign p50: {:.2}x",
        sign_ed / floor,
        sign_ed / sign
    );
    print_ratios(&rows);
    println!("incumbent p50 / sign p50: {:.1}x (goal >= 20x)", inc / sign);
    println!(
        "8 clients: p99 {:.2} ms (goal <= 25), errors {}",
        rows[parallel_row].pct(0.99),
        rows[parallel_row].errors
    );
    println!("TPM objects loaded: {with_broker} while the broker runs (its primary), {leftover} after it exits");
    if smoke {
        assert!(
            rows.iter().all(|r| r.errors == 0),
            "errors in the smoke run"
        );
        assert_eq!(leftover, 0);
    }
}
