//! The embedded software TPM's private network namespace.
//!
//! swtpm can only be reached over TCP by the TSS that tss-esapi 7 loads
//! (its `swtpm:` TCTI has no unix-socket option), and a TCP port on the
//! host's loopback is open to every local user. So the embedded swtpm
//! listens on 127.0.0.1 inside a network namespace of its own, kept alive
//! by a bind mount in a root-only directory (as `ip netns add` does).
//! Entering a network namespace takes CAP_SYS_ADMIN over the user
//! namespace that owns it, the initial one: root, and nobody else, not even
//! a user holding every capability inside a user namespace of its own.
//!
//! Namespaces are per thread: [`enter`] moves the calling thread (and the
//! threads and children it creates afterwards), [`run_in`] runs a closure
//! on a thread of its own, leaving the caller where it was.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

/// The network-namespace boundary's errors.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {action} failed")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace (expected the bind mount `dkey install` makes)")]
    NotNamespace { path: PathBuf },
    #[error("the thread working in network namespace {path} ended without an answer")]
    Thread { path: PathBuf },
}

impl NetnsError {
    fn io<'a>(
        path: &'a Path,
        action: &'static str,
    ) -> impl FnOnce(nix::errno::Errno) -> NetnsError + 'a {
        move |e| NetnsError::Io {
            path: path.to_owned(),
            action,
            source: std::io::Error::from(e),
        }
    }
}

fn is_nsfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .map(|s| s.filesystem_type() == nix::sys::statfs::FsType(libc::NSFS_MAGIC as _))
        .unwrap_or(false)
}

/// Opens `path` and checks that it is a namespace (nsfs), not a file
/// someone left at that path.
fn open(path: &Path) -> Result<File, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Io {
        path: path.to_owned(),
        action: "open",
        source,
    })?;
    if !is_nsfs(&file) {
        return Err(NetnsError::NotNamespace {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Whether `path` is a live network namespace mount.
pub fn exists(path: &Path) -> bool {
    open(path).is_ok()
}

/// The namespace's identity (the nsfs inode), as /proc/<pid>/ns/net shows it.
pub fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    open(path).ok()?.metadata().ok().map(|m| m.ino())
}

/// Creates a network namespace with `lo` up and binds it at `path`
/// (idempotent: an existing namespace there is kept, with what runs in it).
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if exists(path) {
        return Ok(());
    }
    // The mount point: an empty file, root-only like its directory.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| NetnsError::Io {
            path: path.to_owned(),
            action: "create the mount point",
            source,
        })?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), NetnsError> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(NetnsError::io(path, "unshare"))?;
            crate::sys::loopback_up().map_err(|source| NetnsError::Io {
                path: path.to_owned(),
                action: "bring up lo",
                source,
            })?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(NetnsError::io(path, "bind mount"))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetnsError::Thread {
                path: path.to_owned(),
            })
        })
    })
}

/// Unbinds and removes the namespace at `path` (it ends once nothing runs
/// in it any more).
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    if exists(path) {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
            .map_err(NetnsError::io(path, "unmount"))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetnsError::Io {
            path: path.to_owned(),
            action: "remove",
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = open(path)?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(NetnsError::io(path, "setns"))
}

/// Runs `f` on a thread inside the namespace at `path`, or right here when
/// `path` is None (the TPM is reached from the host's network).
pub fn run_in<T: Send>(path: Option<&Path>, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let Some(path) = path else {
        return Ok(f());
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetnsError::Thread {
                path: path.to_owned(),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_port_in_the_namespace_is_not_on_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("net");
        create(&ns).unwrap();
        create(&ns).unwrap(); // idempotent
        assert!(exists(&ns));
        let port = run_in(Some(&ns), || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::mem::forget(l); // keep listening in the namespace
            port
        })
        .unwrap();
        assert!(run_in(Some(&ns), || TcpStream::connect(("127.0.0.1", port))
            .is_ok())
        .unwrap());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        remove(&ns).unwrap();
        assert!(!exists(&ns));
    }

    #[test]
    fn a_plain_file_is_not_entered() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("net");
        std::fs::write(&f, b"").unwrap();
        assert!(matches!(enter(&f), Err(NetnsError::NotNamespace { .. })));
    }
}
