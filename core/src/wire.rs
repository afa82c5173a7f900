//! The protocol between the request-key handler and the broker.
//!
//! The handler (`derived-key-helper`) is a small static program with no
//! libc start-up to pay for; it only collects what the kernel tells it and
//! answers the kernel. This module is `core`-only so that the handler and
//! the broker share one definition of the bytes on the socket.
//!
//! One exchange per connection:
//! - broker → handler, at accept: [`Hello`] (how long the handler may
//!   wait, the negative-result timeout, where audit lines go, and the
//!   keyring to link the authorization key into);
//! - handler → broker, once it has linked its authorization key there:
//!   [`Upcall`], the kernel's facts, unparsed;
//! - broker → handler: an [`Answer`] header, then the payload.
//!
//! Every length is checked against the buffer it describes; a malformed
//! message decodes to `None` and the connection is dropped.

/// Protocol version; both ends are built from one tree.
pub const VERSION: u8 = 5;

/// Largest `KEYCTL_DESCRIBE` answer we accept: type, ids, permissions and
/// a description of up to 4095 bytes.
pub const MAX_DESCRIBE: usize = 4200;
/// Largest callout: the kernel limits it to one page.
pub const MAX_CALLOUT: usize = 4096;
/// Largest description prefix.
pub const MAX_PREFIX: usize = 64;
/// Largest result: a 1024-byte symmetric key.
pub const MAX_PAYLOAD: usize = 1024;
/// Largest syslog socket path in a hello.
pub const MAX_LOG_PATH: usize = 108;

/// An upcall's fixed fields ([`UpcallHead`] and the version byte).
const UPCALL_HEAD: usize = 1 + 4 * 4 + 8;
const UPCALL_FIXED: usize = UPCALL_HEAD + 2 * 3;
/// Largest encoded upcall.
pub const MAX_UPCALL: usize = UPCALL_FIXED + MAX_PREFIX + MAX_DESCRIBE + MAX_CALLOUT;
/// Size of the answer header.
pub const ANSWER_HEADER: usize = 1 + 4 + 2;
const HELLO_FIXED: usize = 1 + 1 + 4 + 4 + 4 + 2;
/// Largest encoded hello.
pub const MAX_HELLO: usize = HELLO_FIXED + MAX_LOG_PATH;

/// Where the handler sends the audit line of a request it had to answer
/// itself (the broker did not answer in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Syslog = 0,
    Kmsg = 1,
    Stderr = 2,
}

/// What the broker tells the handler as soon as it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    pub log: LogTo,
    /// The configured bound for the whole request, in milliseconds.
    pub bound_ms: u32,
    /// The timeout to give the kernel for a negative result, in seconds.
    pub negative_s: u32,
    /// The keyring the handler links its authorization key into while the
    /// broker reads /proc/keys (the broker's session keyring: its views of
    /// the file possess what it holds); 0 for none.
    pub keys_ring: i32,
    /// The syslog socket (for `LogTo::Syslog`).
    pub log_path: &'a [u8],
}

impl<'a> Hello<'a> {
    /// Encodes into `out`; the length used, or None if it does not fit.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Writer::new(out);
        w.u8(VERSION)?;
        w.u8(self.log as u8)?;
        w.u32(self.bound_ms)?;
        w.u32(self.negative_s)?;
        w.u32(self.keys_ring as u32)?;
        w.field(self.log_path, MAX_LOG_PATH)?;
        Some(w.pos)
    }

    /// How many bytes the hello starting with `head` takes, once at least
    /// `HELLO_FIXED` bytes are known.
    pub fn len(head: &[u8]) -> Option<usize> {
        let n = usize::from(u16::from_le_bytes([
            *head.get(HELLO_FIXED - 2)?,
            *head.get(HELLO_FIXED - 1)?,
        ]));
        (n <= MAX_LOG_PATH).then_some(HELLO_FIXED + n)
    }

    /// The fixed part every hello starts with.
    pub const FIXED: usize = HELLO_FIXED;

    pub fn decode(bytes: &'a [u8]) -> Option<Hello<'a>> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let log = match r.u8()? {
            0 => LogTo::Syslog,
            1 => LogTo::Kmsg,
            2 => LogTo::Stderr,
            _ => return None,
        };
        let bound_ms = r.u32()?;
        let negative_s = r.u32()?;
        let keys_ring = r.u32()? as i32;
        let log_path = r.field(MAX_LOG_PATH)?;
        r.end()?;
        Some(Hello {
            log,
            bound_ms,
            negative_s,
            keys_ring,
            log_path,
        })
    }
}

/// What the kernel told the handler, passed on as bytes: the broker
/// parses it (parse, don't validate, happens in one place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upcall<'a> {
    /// The key under construction (`%k`).
    pub key: i32,
    /// The requester's fsuid and fsgid (`%u`, `%g`).
    pub uid: u32,
    pub gid: u32,
    /// The instantiation authorization key the handler holds.
    pub auth: i32,
    /// When the handler started (CLOCK_MONOTONIC, microseconds): the
    /// broker's deadline is the handler's.
    pub started_us: u64,
    /// The description prefix the rule serves.
    pub prefix: &'a [u8],
    /// `KEYCTL_DESCRIBE` of the key under construction.
    pub describe: &'a [u8],
    /// The callout information (read through the authorization key).
    pub callout: &'a [u8],
}

impl<'a> Upcall<'a> {
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        fn copy(b: &[u8]) -> impl FnOnce(&mut [u8]) -> Result<usize, ()> + '_ {
            move |room| {
                room.get_mut(..b.len()).ok_or(())?.copy_from_slice(b);
                Ok(b.len())
            }
        }
        UpcallBuilder::new(out, self.prefix)?
            .describe(copy(self.describe))
            .ok()?
            .callout(copy(self.callout))
            .ok()
            .map(|b| b.finish(&self.head()))
    }

    /// Its fixed fields.
    pub fn head(&self) -> UpcallHead {
        UpcallHead {
            key: self.key,
            uid: self.uid,
            gid: self.gid,
            auth: self.auth,
            started_us: self.started_us,
        }
    }

    /// Decodes a whole upcall; None if malformed, short or too long.
    pub fn decode(bytes: &'a [u8]) -> Option<Upcall<'a>> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let (key, uid, gid, auth) = (r.u32()? as i32, r.u32()?, r.u32()?, r.u32()? as i32);
        let up = Upcall {
            key,
            uid,
            gid,
            auth,
            started_us: r.u64()?,
            prefix: r.field(MAX_PREFIX)?,
            describe: r.field(MAX_DESCRIBE)?,
            callout: r.field(MAX_CALLOUT)?,
        };
        r.end()?;
        Some(up)
    }

    /// How many bytes of a message starting with `head` are still needed
    /// to know its full length: the reader reads until this returns
    /// `Complete(n)`.
    pub fn progress(head: &[u8]) -> Progress {
        let mut r = Reader::new(head);
        let mut need = UPCALL_HEAD;
        if r.skip(need).is_none() {
            return Progress::Need(need);
        }
        for max in [MAX_PREFIX, MAX_DESCRIBE, MAX_CALLOUT] {
            need += 2;
            let Some(n) = r.u16() else {
                return Progress::Need(need);
            };
            let n = usize::from(n);
            if n > max {
                return Progress::Invalid;
            }
            need += n;
            if r.skip(n).is_none() {
                return Progress::Need(need);
            }
        }
        Progress::Complete(need)
    }
}

/// An upcall's fixed fields, written last by [`UpcallBuilder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpcallHead {
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    pub auth: i32,
    pub started_us: u64,
}

/// Why a field of an upcall could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldError<E> {
    /// What fills the field failed.
    Fill(E),
    /// The field is longer than the protocol allows.
    TooLarge,
}

/// An upcall built in place, its fields filled straight into the message
/// by whoever reads them (the handler's `KEYCTL_DESCRIBE` and
/// `KEYCTL_READ`), in their order: prefix, describe, callout. The handler
/// keeps no second copy of either, so the only memory a request touches
/// is the message's first bytes: a page fault is a few microseconds on a
/// VM, and a copy in a buffer of its own is one or two more.
/// [`Upcall::encode`] builds through it too: one layout.
pub struct UpcallBuilder<'b> {
    w: Writer<'b>,
}

/// An [`UpcallBuilder`] whose describe field is written; the callout
/// comes next.
pub struct UpcallWithDescribe<'b> {
    w: Writer<'b>,
}

/// An upcall whose fields are all written; its head goes last.
pub struct UpcallFields<'b> {
    w: Writer<'b>,
}

impl<'b> UpcallBuilder<'b> {
    /// Room for the fixed fields, then the prefix. None if `out` cannot
    /// hold them or the prefix is too long.
    pub fn new(out: &'b mut [u8], prefix: &[u8]) -> Option<UpcallBuilder<'b>> {
        if out.len() < UPCALL_HEAD {
            return None;
        }
        let mut w = Writer {
            out,
            pos: UPCALL_HEAD,
        };
        w.field(prefix, MAX_PREFIX)?;
        Some(UpcallBuilder { w })
    }

    /// The describe field: `fill` gets room for the most it may hold and
    /// returns how many bytes it wrote.
    pub fn describe<E>(
        mut self,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<UpcallWithDescribe<'b>, FieldError<E>> {
        self.w.field_with(MAX_DESCRIBE, fill)?;
        Ok(UpcallWithDescribe { w: self.w })
    }
}

impl<'b> UpcallWithDescribe<'b> {
    /// The callout field, as [`UpcallBuilder::describe`].
    pub fn callout<E>(
        mut self,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<UpcallFields<'b>, FieldError<E>> {
        self.w.field_with(MAX_CALLOUT, fill)?;
        Ok(UpcallFields { w: self.w })
    }
}

impl UpcallFields<'_> {
    /// Writes the fixed fields; the message's length.
    pub fn finish(self, head: &UpcallHead) -> usize {
        let end = self.w.pos;
        let mut w = Writer {
            out: self.w.out,
            pos: 0,
        };
        // Room for these was checked in `new`.
        let fixed = (|| {
            w.u8(VERSION)?;
            w.u32(head.key as u32)?;
            w.u32(head.uid)?;
            w.u32(head.gid)?;
            w.u32(head.auth as u32)?;
            w.bytes(&head.started_us.to_le_bytes())
        })();
        debug_assert!(fixed.is_some() && w.pos == UPCALL_HEAD);
        end
    }
}

/// How far a partly read message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// At least this many bytes in all are needed.
    Need(usize),
    /// The message is exactly this long.
    Complete(usize),
    /// A length field is out of range.
    Invalid,
}

/// The broker's verdict, followed by `len` payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// 0: instantiate with the payload; else the errno to reject with.
    pub errno: u8,
    /// The key's timeout for the kernel, in seconds; 0 for none.
    pub timeout_s: u32,
    /// Payload length (0 for a rejection).
    pub len: u16,
}

impl Answer {
    pub fn encode(&self) -> [u8; ANSWER_HEADER] {
        let mut out = [0u8; ANSWER_HEADER];
        out[0] = self.errno;
        out[1..5].copy_from_slice(&self.timeout_s.to_le_bytes());
        out[5..7].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8; ANSWER_HEADER]) -> Option<Answer> {
        let a = Answer {
            errno: b[0],
            timeout_s: u32::from_le_bytes([b[1], b[2], b[3], b[4]]),
            len: u16::from_le_bytes([b[5], b[6]]),
        };
        let ok = if a.errno == 0 {
            (1..=MAX_PAYLOAD).contains(&usize::from(a.len))
        } else {
            a.len == 0
        };
        ok.then_some(a)
    }
}

struct Writer<'b> {
    out: &'b mut [u8],
    pos: usize,
}

impl<'b> Writer<'b> {
    fn new(out: &'b mut [u8]) -> Writer<'b> {
        Writer { out, pos: 0 }
    }

    fn bytes(&mut self, b: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(b.len())?;
        self.out.get_mut(self.pos..end)?.copy_from_slice(b);
        self.pos = end;
        Some(())
    }

    fn u8(&mut self, v: u8) -> Option<()> {
        self.bytes(&[v])
    }

    fn u32(&mut self, v: u32) -> Option<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn field(&mut self, b: &[u8], max: usize) -> Option<()> {
        if b.len() > max {
            return None;
        }
        self.bytes(&u16::try_from(b.len()).ok()?.to_le_bytes())?;
        self.bytes(b)
    }

    /// A field of at most `max` bytes that `fill` writes in place.
    fn field_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), FieldError<E>> {
        let start = self.pos.checked_add(2).ok_or(FieldError::TooLarge)?;
        let room_end = self.out.len().min(start.saturating_add(max));
        let room = self
            .out
            .get_mut(start..room_end)
            .ok_or(FieldError::TooLarge)?;
        let room_len = room.len();
        let n = fill(room).map_err(FieldError::Fill)?;
        if n > room_len {
            return Err(FieldError::TooLarge);
        }
        let len = u16::try_from(n).map_err(|_| FieldError::TooLarge)?;
        self.out[self.pos..start].copy_from_slice(&len.to_le_bytes());
        self.pos = start + n;
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(v))
    }

    fn field(&mut self, max: usize) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        if n > max {
            return None;
        }
        self.take(n)
    }

    fn end(&self) -> Option<()> {
        (self.pos == self.b.len()).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Upcall<'static> {
        Upcall {
            key: 0x1234_5678,
            uid: 1000,
            gid: 100,
            auth: 0x0a0b_0c0d,
            started_us: 0x0102_0304_0506_0708,
            prefix: b"derived",
            describe: b"user;1000;100;3f010000;derived:db",
            callout: b"32 path",
        }
    }

    #[test]
    fn upcall_round_trip_and_progress() {
        let up = sample();
        let mut buf = [0u8; MAX_UPCALL];
        let n = up.encode(&mut buf).unwrap();
        assert_eq!(Upcall::decode(&buf[..n]), Some(up));
        assert_eq!(Upcall::progress(&buf[..n]), Progress::Complete(n));
        // Every prefix knows it is incomplete, and asks for more than it has.
        for k in 0..n {
            match Upcall::progress(&buf[..k]) {
                Progress::Need(m) => assert!(m > k && m <= n, "k={k} m={m}"),
                other => panic!("k={k}: {other:?}"),
            }
            assert_eq!(Upcall::decode(&buf[..k]), None);
        }
        // Trailing bytes are an error, not ignored.
        assert_eq!(Upcall::decode(&buf[..n + 1]), None);
        // An older handler's upcall is refused, not misread.
        buf[0] = VERSION - 1;
        assert_eq!(Upcall::decode(&buf[..n]), None);
    }

    #[test]
    fn oversized_fields_are_refused_both_ways() {
        let long = [b'a'; MAX_CALLOUT + 1];
        let up = Upcall {
            callout: &long,
            ..sample()
        };
        let mut buf = [0u8; MAX_UPCALL + 16];
        assert_eq!(up.encode(&mut buf), None);
        // A forged length beyond the maximum.
        let mut forged = [0u8; 1 + 28 + 2];
        forged[0] = VERSION;
        forged[29..31].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(Upcall::progress(&forged), Progress::Invalid);
        assert_eq!(Upcall::decode(&forged), None);
        // Too small an output buffer.
        assert_eq!(sample().encode(&mut [0u8; 20]), None);
    }

    #[test]
    fn an_upcall_built_in_place_is_the_encoded_one() {
        let up = sample();
        let mut want = [0u8; MAX_UPCALL];
        let n = up.encode(&mut want).unwrap();
        // The fills see the most their field may hold, write in place and
        // say how much they wrote, as the handler's keyctl reads do.
        let mut buf = [0xee_u8; MAX_UPCALL];
        let mut rooms = (0, 0);
        fn fill<'s>(
            b: &'static [u8],
            seen: &'s mut usize,
        ) -> impl FnOnce(&mut [u8]) -> Result<usize, i32> + 's {
            move |room| {
                *seen = room.len();
                room[..b.len()].copy_from_slice(b);
                // What the kernel's describe leaves after the text.
                room[b.len()] = 0;
                Ok(b.len())
            }
        }
        let head = up.head();
        let got = UpcallBuilder::new(&mut buf, up.prefix)
            .unwrap()
            .describe(fill(up.describe, &mut rooms.0))
            .unwrap()
            .callout(fill(up.callout, &mut rooms.1))
            .unwrap()
            .finish(&head);
        assert_eq!(rooms, (MAX_DESCRIBE, MAX_CALLOUT));
        assert_eq!(got, n);
        assert_eq!(buf[..n], want[..n]);

        // A fill's failure is its own; a fill that claims more than its
        // room, or a prefix over the limit, is too large.
        let mut buf = [0u8; MAX_UPCALL];
        let b = UpcallBuilder::new(&mut buf, b"derived").unwrap();
        assert!(matches!(
            b.describe(|_| Err::<usize, i32>(7)),
            Err(FieldError::Fill(7))
        ));
        let b = UpcallBuilder::new(&mut buf, b"derived").unwrap();
        assert!(matches!(
            b.describe(|room| Ok::<usize, i32>(room.len() + 1)),
            Err(FieldError::TooLarge)
        ));
        assert!(UpcallBuilder::new(&mut buf, &[b'p'; MAX_PREFIX + 1]).is_none());
        assert!(UpcallBuilder::new(&mut [0u8; UPCALL_HEAD + 1], b"").is_none());
        // A message buffer too short for the largest callout gives the
        // fill only what it has.
        let mut short = [0u8; UPCALL_HEAD + 2 + 7 + 2 + 40 + 2 + 5];
        let mut seen = 0;
        let b = UpcallBuilder::new(&mut short, b"derived").unwrap();
        let b = b.describe(|_| Ok::<usize, i32>(40)).unwrap();
        let done = b.callout(|room| {
            seen = room.len();
            Ok::<usize, i32>(room.len())
        });
        assert_eq!(seen, 5);
        assert_eq!(done.unwrap().finish(&head), short.len());
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut buf = [0u8; MAX_UPCALL];
        let n = sample().encode(&mut buf).unwrap();
        buf[0] = 1;
        assert_eq!(Upcall::decode(&buf[..n]), None);
    }

    #[test]
    fn hello_round_trip() {
        let h = Hello {
            log: LogTo::Kmsg,
            bound_ms: 3000,
            negative_s: 2,
            keys_ring: -0x1234_5678,
            log_path: b"/dev/log",
        };
        let mut buf = [0u8; MAX_HELLO];
        let n = h.encode(&mut buf).unwrap();
        assert_eq!(Hello::len(&buf[..Hello::FIXED]), Some(n));
        assert_eq!(Hello::decode(&buf[..n]), Some(h));
        buf[1] = 9;
        assert_eq!(Hello::decode(&buf[..n]), None);
    }

    #[test]
    fn answers() {
        let a = Answer {
            errno: 0,
            timeout_s: 31,
            len: 72,
        };
        assert_eq!(Answer::decode(&a.encode()), Some(a));
        let r = Answer {
            errno: 13,
            timeout_s: 2,
            len: 0,
        };
        assert_eq!(Answer::decode(&r.encode()), Some(r));
        // A grant without payload, a refusal with one, an oversized payload.
        for bad in [(0, 0), (13, 5), (0, (MAX_PAYLOAD + 1) as u16)] {
            let a = Answer {
                errno: bad.0,
                timeout_s: 0,
                len: bad.1,
            };
            assert_eq!(Answer::decode(&a.encode()), None);
        }
    }
}
