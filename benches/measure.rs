//! Shared by the benchmarks: one raw request through the kernel, and
//! latency rows with percentiles.
#![allow(dead_code, unsafe_code)]

use std::ffi::CString;
use std::time::{Duration, Instant};

/// request_key(2) for `key_type` into the process keyring, then drop the
/// key. Returns the latency of the request alone, or the errno.
pub fn raw_request(key_type: &str, desc: &str, callout: &str) -> Result<Duration, i32> {
    let t = CString::new(key_type).unwrap();
    let d = CString::new(desc).unwrap();
    let c = CString::new(callout).unwrap();
    let start = Instant::now();
    // SAFETY: NUL-terminated strings alive for the call.
    let id = unsafe {
        libc::syscall(
            libc::SYS_request_key,
            t.as_ptr(),
            d.as_ptr(),
            c.as_ptr(),
            -2i64,
        )
    };
    let took = start.elapsed();
    if id < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_INVALIDATE, id) };
    Ok(took)
}

/// Empties this process's keyring: a refused request leaves a negative
/// key there for the configured time.
pub fn clear_process_keyring() {
    // SAFETY: integer arguments only.
    unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_CLEAR,
            libc::KEY_SPEC_PROCESS_KEYRING,
        )
    };
}

/// One row of a latency table.
pub struct Row {
    pub name: String,
    pub samples: Vec<Duration>,
    pub errors: usize,
}

impl Row {
    pub fn new(name: &str) -> Row {
        Row {
            name: name.into(),
            samples: Vec::new(),
            errors: 0,
        }
    }

    pub fn add(&mut self, r: Result<Duration, i32>) {
        match r {
            Ok(d) => self.samples.push(d),
            Err(_) => self.errors += 1,
        }
    }

    /// The p-th percentile in milliseconds (nearest rank).
    pub fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort();
        if s.is_empty() {
            return f64::NAN;
        }
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s[i].as_secs_f64() * 1000.0
    }
}

pub fn print_table(rows: &[Row]) {
    println!("\n| request | n | p50 ms | p99 ms | max ms | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            r.name,
            r.samples.len(),
            r.pct(0.5),
            r.pct(0.99),
            r.pct(1.0),
            r.errors
        );
    }
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} cores, kernel {}, swtpm",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}
