//! The request-key handler's command line, as /sbin/request-key passes it
//! (`[--config FILE] [--prefix PREFIX] KEY UID GID`), typed at the edge.

/// The configuration file the handler reads when the rule names none.
pub const DEFAULT_CONFIG: &[u8] = b"/etc/derived-keys/derived-keys.conf";
/// The description prefix of the shipped rule.
pub const DEFAULT_PREFIX: &[u8] = b"derived";

/// What /sbin/request-key passes, typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args<'a> {
    pub config: &'a [u8],
    pub prefix: &'a [u8],
    /// The key under construction (`%k`).
    pub key: i32,
    /// The requester's fsuid and fsgid (`%u`, `%g`).
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cli<'a> {
    Run(Args<'a>),
    Version,
    Usage,
}

fn decimal<T: core::str::FromStr>(b: &[u8]) -> Option<T> {
    core::str::from_utf8(b).ok()?.parse().ok()
}

/// `[--config FILE] [--prefix PREFIX] KEY UID GID` (argv[0] first).
pub fn parse_args<'a>(mut it: impl Iterator<Item = &'a [u8]>) -> Cli<'a> {
    let _argv0 = it.next();
    let (mut config, mut prefix) = (DEFAULT_CONFIG, DEFAULT_PREFIX);
    let mut nums: [&[u8]; 3] = [b""; 3];
    let mut n = 0;
    while let Some(a) = it.next() {
        match a {
            b"--version" | b"-V" => return Cli::Version,
            b"--config" | b"--prefix" => {
                let Some(v) = it.next() else {
                    return Cli::Usage;
                };
                if a == b"--config" {
                    config = v;
                } else {
                    prefix = v;
                }
            }
            _ if a.starts_with(b"--config=") => config = &a[9..],
            _ if a.starts_with(b"--prefix=") => prefix = &a[9..],
            _ if n < 3 => {
                nums[n] = a;
                n += 1;
            }
            _ => return Cli::Usage,
        }
    }
    match (n, decimal(nums[0]), decimal(nums[1]), decimal(nums[2])) {
        (3, Some(key), Some(uid), Some(gid)) if key > 0 => Cli::Run(Args {
            config,
            prefix,
            key,
            uid,
            gid,
        }),
        _ => Cli::Usage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv<'a>(a: &'a [&'a str]) -> impl Iterator<Item = &'a [u8]> {
        a.iter().map(|s| s.as_bytes())
    }

    #[test]
    fn arguments() {
        let Cli::Run(a) = parse_args(argv(&["h", "12", "1000", "100"])) else {
            panic!("not parsed");
        };
        assert_eq!((a.key, a.uid, a.gid), (12, 1000, 100));
        assert_eq!((a.config, a.prefix), (DEFAULT_CONFIG, DEFAULT_PREFIX));
        let Cli::Run(a) = parse_args(argv(&["h", "--config", "/c", "--prefix=t1", "5", "0", "0"]))
        else {
            panic!("not parsed");
        };
        assert_eq!((a.config, a.prefix, a.key), (&b"/c"[..], &b"t1"[..], 5));
        for bad in [
            &["h"][..],
            &["h", "1", "2"],
            &["h", "1", "2", "3", "4"],
            &["h", "x", "2", "3"],
            &["h", "0", "2", "3"],
            &["h", "1", "-2", "3"],
            &["h", "1", "2", "3", "--config"],
        ] {
            assert_eq!(parse_args(argv(bad)), Cli::Usage, "{bad:?}");
        }
        assert_eq!(parse_args(argv(&["h", "--version"])), Cli::Version);
    }
}
