//! Who may have which key: pure decisions over the parsed request, the
//! requester's facts and the configuration. Every refusal means EACCES.

use crate::config::Config;
use crate::request::{Binding, Request};
use crate::requester::Needs;

/// The facts policy looks at.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
    pub same_mount_ns: bool,
    pub exe_at_path: bool,
    /// In the broker's user namespace, the initial one (see
    /// `requester::Requester::same_user_ns`).
    pub same_user_ns: bool,
}

/// Why policy refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("binding {binding} is disabled by the configuration")]
    BindingDisabled { binding: Binding },
    #[error("uid {uid} may not ask for machine keys (not in machine_uids or machine_gids)")]
    MachineNotAllowed { uid: u32 },
    #[error("path binding refused: the requester is in another mount namespace")]
    ForeignMountNamespace,
    #[error("path binding refused: the requester's executable is no longer at its path (replaced or deleted)")]
    ExeNotAtPath,
    #[error(
        "{binding} binding refused: the requester is not in the initial user namespace, \
         where a process can make its executable name any file it can read"
    )]
    ForeignUserNamespace { binding: Binding },
}

impl PolicyError {
    /// Every policy refusal is EACCES.
    pub fn errno(&self) -> i32 {
        libc::EACCES
    }
}

/// The facts about the requester that [`check`] looks at for `req` from
/// `uid`/`gid`; the others are not read (see [`Needs`]: a fact not read
/// refuses). `machine` needs the groups only when neither the uid nor the
/// primary gid is listed; `path` and `csum` need the namespaces, `path`
/// also whether its executable is still at its path; `user` nothing.
pub fn needs(config: &Config, req: &Request, uid: u32, gid: u32) -> Needs {
    if !config.enabled(req.binding) {
        return Needs::default();
    }
    match req.binding {
        Binding::Machine => Needs {
            groups: !config.machine_uids.contains(&uid)
                && !config.machine_gids.contains(&gid)
                && !config.machine_gids.is_empty(),
            ..Needs::default()
        },
        Binding::Path => Needs {
            namespaces: true,
            exe_at_path: true,
            ..Needs::default()
        },
        Binding::Csum => Needs {
            namespaces: true,
            ..Needs::default()
        },
        Binding::User => Needs::default(),
    }
}

/// Allows or refuses `req` from a requester with `facts`.
pub fn check(config: &Config, req: &Request, facts: &Facts<'_>) -> Result<(), PolicyError> {
    if !config.enabled(req.binding) {
        return Err(PolicyError::BindingDisabled {
            binding: req.binding,
        });
    }
    match req.binding {
        Binding::Machine => {
            let by_uid = config.machine_uids.contains(&facts.uid);
            let by_gid = config
                .machine_gids
                .iter()
                .any(|g| *g == facts.gid || facts.groups.contains(g));
            if !(by_uid || by_gid) {
                return Err(PolicyError::MachineNotAllowed { uid: facts.uid });
            }
        }
        // Both name the requester by its executable, which a process in a
        // user namespace of its own can replace (PR_SET_MM_MAP exe_fd).
        Binding::Path | Binding::Csum if !facts.same_user_ns => {
            return Err(PolicyError::ForeignUserNamespace {
                binding: req.binding,
            });
        }
        Binding::Path => {
            if !facts.same_mount_ns {
                return Err(PolicyError::ForeignMountNamespace);
            }
            if !facts.exe_at_path {
                return Err(PolicyError::ExeNotAtPath);
            }
        }
        Binding::Csum | Binding::User => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::DEFAULT_PREFIX;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        Config::parse(extra, Path::new("/t")).unwrap()
    }

    fn req(callout: &str) -> Request {
        Request::parse(b"user", b"derived:x", callout.as_bytes(), DEFAULT_PREFIX).unwrap()
    }

    fn facts(uid: u32, gid: u32, groups: &[u32]) -> Facts<'_> {
        Facts {
            uid,
            gid,
            groups,
            same_mount_ns: true,
            exe_at_path: true,
            same_user_ns: true,
        }
    }

    #[test]
    fn machine_is_root_only_by_default() {
        let c = cfg("");
        assert!(check(&c, &req("32 machine"), &facts(0, 0, &[])).is_ok());
        assert_eq!(
            check(&c, &req("32 machine"), &facts(1000, 1000, &[])),
            Err(PolicyError::MachineNotAllowed { uid: 1000 })
        );
        assert!(check(&c, &req("32 user"), &facts(1000, 1000, &[])).is_ok());
    }

    #[test]
    fn machine_by_listed_uid_or_group() {
        let c = cfg("[bindings]\nmachine_uids = [7]\nmachine_gids = [50]\n");
        assert!(check(&c, &req("32 machine"), &facts(7, 7, &[])).is_ok());
        assert!(check(&c, &req("32 machine"), &facts(8, 50, &[])).is_ok());
        assert!(check(&c, &req("32 machine"), &facts(8, 8, &[1, 50])).is_ok());
        assert!(
            check(&c, &req("32 machine"), &facts(0, 0, &[])).is_err(),
            "root not listed"
        );
    }

    #[test]
    fn path_needs_our_mount_namespace_and_the_real_file() {
        let c = cfg("");
        let mut f = facts(0, 0, &[]);
        f.same_mount_ns = false;
        assert_eq!(
            check(&c, &req("32 path"), &f),
            Err(PolicyError::ForeignMountNamespace)
        );
        assert!(
            check(&c, &req("32 csum"), &f).is_ok(),
            "csum does not depend on paths"
        );
        let mut f = facts(0, 0, &[]);
        f.exe_at_path = false;
        assert_eq!(
            check(&c, &req("32 path"), &f),
            Err(PolicyError::ExeNotAtPath)
        );
    }

    #[test]
    fn executable_bindings_need_the_initial_user_namespace() {
        let c = cfg("[bindings]\nmachine_uids = [4320]\n");
        let mut f = facts(4320, 4320, &[]);
        f.same_user_ns = false;
        for (callout, binding) in [("32 path", Binding::Path), ("32 csum", Binding::Csum)] {
            let e = check(&c, &req(callout), &f).unwrap_err();
            assert_eq!(e, PolicyError::ForeignUserNamespace { binding });
            assert!(e.to_string().contains("user namespace"), "{e}");
        }
        // The uid alone, or nothing about the requester, still work.
        assert!(check(&c, &req("32 user"), &f).is_ok());
        assert!(check(&c, &req("32 machine"), &f).is_ok());
        // A disabled binding is still reported as disabled first.
        let c = cfg("[bindings]\npath = false\n");
        assert_eq!(
            check(&c, &req("32 path"), &f),
            Err(PolicyError::BindingDisabled {
                binding: Binding::Path
            })
        );
    }

    #[test]
    fn disabled_bindings() {
        let c = cfg("[bindings]\nuser = false\n");
        assert_eq!(
            check(&c, &req("32 user"), &facts(0, 0, &[])),
            Err(PolicyError::BindingDisabled {
                binding: Binding::User
            })
        );
    }

    /// Whatever the facts are, the verdict with only the facts `needs`
    /// names (the others at their refusing values, as `identify` leaves
    /// them) is the verdict with all of them.
    #[test]
    fn the_facts_needs_names_are_all_check_looks_at() {
        let configs = [
            cfg(""),
            cfg("[bindings]\nmachine_uids = [0, 1000]\n"),
            cfg("[bindings]\nmachine_gids = [27]\n"),
            cfg("[bindings]\nmachine_uids = []\nmachine_gids = [1000, 27]\nuser = false\n"),
        ];
        let callouts = ["32 machine", "32 path", "32 csum", "32 user"];
        let groups: [&[u32]; 3] = [&[], &[27], &[4, 1000]];
        for c in &configs {
            for callout in callouts {
                let r = req(callout);
                for (uid, gid) in [(0, 0), (1000, 1000), (1000, 27), (4242, 4242)] {
                    for g in groups {
                        for bits in 0..8u8 {
                            let all = Facts {
                                uid,
                                gid,
                                groups: g,
                                same_mount_ns: bits & 1 != 0,
                                exe_at_path: bits & 2 != 0,
                                same_user_ns: bits & 4 != 0,
                            };
                            let n = needs(c, &r, uid, gid);
                            let gathered = Facts {
                                uid,
                                gid,
                                groups: if n.groups { g } else { &[] },
                                same_mount_ns: n.namespaces && all.same_mount_ns,
                                exe_at_path: n.exe_at_path && all.exe_at_path,
                                same_user_ns: n.namespaces && all.same_user_ns,
                            };
                            assert_eq!(
                                check(c, &r, &gathered),
                                check(c, &r, &all),
                                "{callout} uid {uid} gid {gid} groups {g:?} facts {bits:03b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
