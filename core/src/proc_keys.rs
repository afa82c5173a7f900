//! Finding the authorization key's line in /proc/keys, which names the
//! requesting thread: fed in chunks, bounded, counting forgeries
//! ([`KeysLine`]); or, where it is the first record of a view, read alone
//! ([`FirstRecord`]), so that the kernel does not list the rest.

/// Longest authorization key line kept (the kernel's is under 100 bytes).
pub const MAX_LINE: usize = 512;

/// Scans the whole of /proc/keys, fed in chunks of any size, for the
/// lines that start with key `auth`'s serial (8 lowercase hex digits and a
/// space). Key descriptions may contain newlines and /proc/keys prints
/// them raw, so a line further down can be forged by anyone whose key we
/// may view: only a serial that starts exactly one line is trusted (the
/// broker refuses otherwise). Keeps the first such line if it fits the
/// output buffer (the authorization key's line is short).
#[derive(Debug)]
pub struct KeysLine {
    want: [u8; 9],
    /// Bytes seen of the current line.
    col: usize,
    /// The current line starts with `want`, as far as seen.
    head: bool,
    /// Lines so far that start with `want`.
    count: u32,
    /// The first such line, once complete and if it fit.
    found: Option<usize>,
}

/// What a whole scan of /proc/keys found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysScan {
    /// Length of the first line with the serial (0 if none, or too long).
    pub len: usize,
    /// How many lines start with the serial; anything but 1 is refused.
    pub count: u32,
}

impl KeysLine {
    pub fn new(auth: i32) -> KeysLine {
        KeysLine {
            want: serial_field(auth),
            col: 0,
            head: true,
            count: 0,
            found: None,
        }
    }

    /// The current line ends (a newline, or the end of input).
    fn end_line(&mut self, out: &[u8]) {
        if self.head && self.col >= self.want.len() {
            self.count = self.count.saturating_add(1);
            if self.found.is_none() && self.col <= out.len() {
                self.found = Some(self.col);
            }
        }
        self.col = 0;
        self.head = true;
    }

    /// Feeds the next chunk. The first matching line is copied to `out`;
    /// `out` must be the same buffer on every call.
    pub fn feed(&mut self, chunk: &[u8], out: &mut [u8]) {
        for &b in chunk {
            if b == b'\n' {
                self.end_line(out);
                continue;
            }
            if self.head {
                match self.want.get(self.col) {
                    Some(&w) if w != b => self.head = false,
                    _ => {
                        if self.found.is_none() {
                            if let Some(slot) = out.get_mut(self.col) {
                                *slot = b;
                            }
                        }
                    }
                }
            }
            self.col = self.col.saturating_add(1);
        }
    }

    /// At end of input (a last line without a newline counts too).
    pub fn finish(mut self, out: &[u8]) -> KeysScan {
        if self.col > 0 {
            self.end_line(out);
        }
        KeysScan {
            len: self.found.unwrap_or(0),
            count: self.count,
        }
    }
}

/// The authorization key a request names, and what its record must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthKey {
    /// The authorization key's serial.
    pub serial: i32,
    /// The key under construction it authorizes.
    pub target: i32,
    /// The length of the callout it carries (the record's last field, only
    /// partly read where the record is read alone: see
    /// [`FirstRecord::unread`]).
    pub callout_len: usize,
}

/// Length of the part of a record before the description:
/// `"%08x %c%c%c%c%c%c%c %5d %4s %08x %5d %5d %-9.9s "` with every field
/// within its width. A field whose value needs more (a uid over 99999)
/// widens it, so this is the least a record's head takes.
pub const RECORD_HEAD: usize = 59;

/// The type field of an authorization key's record and of a keyring's (the
/// type's name padded or cut to 9, and the space after it).
const AUTH_TYPE: &[u8; 10] = b".request_ ";
const KEYRING_TYPE: &[u8; 10] = b"keyring   ";

/// Where the type field starts in a record that `seen` starts.
enum TypeAt {
    At(usize),
    /// `seen` ends before the fields do.
    More,
    /// Not a record's head.
    Bad,
}

/// Finds the type field by the fields before it rather than by their
/// widths: the serial, then six fields (flags, usage, expiry, permissions,
/// uid, gid), each printable without a space, after one or more spaces
/// (separator and padding), and one space before the type, which never
/// starts with one.
fn type_at(seen: &[u8]) -> TypeAt {
    let mut i = 9;
    for _ in 0..6 {
        loop {
            match seen.get(i) {
                None => return TypeAt::More,
                Some(b' ') => i += 1,
                Some(_) => break,
            }
        }
        loop {
            match seen.get(i) {
                None => return TypeAt::More,
                Some(b' ') => break,
                Some(b) if b.is_ascii_graphic() => i += 1,
                Some(_) => return TypeAt::Bad,
            }
        }
    }
    TypeAt::At(i + 1)
}

/// A record of the view's session keyring, after its head: the kernel's
/// name for an anonymous session keyring, then `: <count>` while it holds
/// keys (`: empty` when it holds none: not passed over, as it then does not
/// hold the authorization key).
const RING_DESC: &[u8; 6] = b"_ses: ";

/// What the kernel names an anonymous session keyring (the broker's, which
/// its views hold: `KEYCTL_JOIN_SESSION_KEYRING` without a name).
pub const ANON_SESSION: &[u8] = RING_DESC.split_at(4).0;

/// Most digits a pid has (`PID_MAX_LIMIT`, 4,194,304).
const MAX_PID_DIGITS: usize = 7;

/// The first record of a /proc/keys view, read by a caller that asks the
/// kernel for fewer bytes than the record still holds.
///
/// The kernel builds the file on every read from its start, checking each
/// key in the system in serial order (possession, then permission), and
/// stops once it has as many bytes as the read asked for. A read that takes
/// the last byte of a record makes it go on to the next record it can
/// show, and a view shows few: that lists every key left. So the record's
/// end is left unread, and the keys after it are never checked. Serials
/// are random, so where the view's first record is the authorization
/// key's (a view shows what its credentials possess, and the requester's
/// keys anyone may view: under one request at a time, that is so) half of
/// the view's cost goes, on average. (This is `seq_read_iter`, Linux 5.10
/// and later; where a read is served from what is left of a record
/// without going on, the reads are merely as cheap as before.)
///
/// No count of lines is needed for that record: forged lines live inside
/// a record's description, and no record comes before the first one. Its
/// first bytes are the kernel's `%08x ` of the first key listed, so if they
/// are the authorization key's serial, the whole record is the kernel's:
/// the type, and the description `key:%x pid:%d ci:%zu` made from the
/// kernel's own numbers. The one record allowed before it is the view's own
/// session keyring's (which it possesses, so lists): given its serial, a
/// `keyring` record of that serial described `_ses: <keys>` is read whole
/// and passed over. Its description is the kernel's name for an anonymous
/// keyring (a key's description never changes), so it forges nothing
/// either. Anything else (another key first, a field wider than its width,
/// the key revoked meanwhile) is [`Step::NotFirst`]: the caller then scans
/// the whole view with [`KeysLine`].
#[derive(Debug, Clone, Copy)]
pub struct FirstRecord {
    /// `%08x ` of the view's own session keyring, which may come first.
    ring: Option<[u8; 9]>,
    /// The record's first bytes: `%08x ` of the serial.
    serial: [u8; 9],
    /// `key:%x pid:`, and its length.
    head: [u8; 21],
    head_len: usize,
    /// ` ci:%zu` and the newline, and its length.
    tail: [u8; 26],
    tail_len: usize,
}

/// What to do after a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read exactly this many more bytes: less than is left of the
    /// record, if it is the one expected.
    Read(usize),
    /// The record is the expected one: it starts at `at` (after the
    /// session keyring's record, if that came first), and its first `len`
    /// bytes, then [`FirstRecord::unread`], are its line (without the
    /// newline).
    Done { at: usize, len: usize },
    /// Not the expected record first: scan the whole view.
    NotFirst,
}

/// Writes `v` in lowercase hex (without leading zeros, as `%x`) or decimal
/// into `out`; returns the length.
fn digits(mut v: u64, radix: u64, out: &mut [u8]) -> usize {
    let mut tmp = [0u8; 20];
    let mut n = 0;
    loop {
        tmp[n] = b"0123456789abcdef"[(v % radix) as usize];
        n += 1;
        v /= radix;
        if v == 0 {
            break;
        }
    }
    for (i, slot) in out[..n].iter_mut().enumerate() {
        *slot = tmp[n - 1 - i];
    }
    n
}

/// `%08x ` of a serial.
fn serial_field(serial: i32) -> [u8; 9] {
    let mut out = [b' '; 9];
    let n = digits(u64::from(serial as u32), 16, &mut out);
    out.copy_within(..n, 8 - n);
    out[..8 - n].fill(b'0');
    out
}

/// Where a part of a record that `seen` holds the start of ends, or how
/// many bytes at least are left of it.
enum Part {
    Ends(usize),
    Read(usize),
    Not,
}

/// `want` at `at` in `seen`, as far as `seen` goes; if only its start is
/// there, the bytes left of it and `then` more are to be read (what the
/// record still holds after it at least).
fn known(seen: &[u8], at: usize, want: &[u8], then: usize) -> Part {
    let got = &seen[at.min(seen.len())..];
    let n = got.len().min(want.len());
    if got[..n] != want[..n] {
        Part::Not
    } else if n < want.len() {
        Part::Read(want.len() - n + then)
    } else {
        Part::Ends(at + want.len())
    }
}

/// The type field of a record that `seen` starts, which must be `want`,
/// followed by at least `then` bytes.
fn type_field(seen: &[u8], want: &[u8; 10], then: usize) -> Part {
    match type_at(seen) {
        TypeAt::At(at) => known(seen, at, want, then),
        // Until the fields before it are all there: the type field and
        // `then` are still to come whatever their widths.
        TypeAt::More => Part::Read(want.len() + then),
        TypeAt::Bad => Part::Not,
    }
}

/// The record of the view's session keyring that `seen` starts.
fn ring_record(seen: &[u8]) -> Part {
    // The name, then at least a digit and the newline.
    let desc_at = match type_field(seen, KEYRING_TYPE, RING_DESC.len() + 2) {
        Part::Ends(at) => at,
        other => return other,
    };
    let count_at = match known(seen, desc_at, RING_DESC, 2) {
        Part::Ends(at) => at,
        other => return other,
    };
    let count = &seen[count_at..];
    let n = count.iter().take_while(|b| b.is_ascii_digit()).count();
    match count.get(n) {
        // More keys than a u64 counts: not a keyring's record.
        _ if n > 20 => Part::Not,
        None if n == 0 => Part::Read(2),
        None => Part::Read(1),
        Some(b'\n') if n > 0 => Part::Ends(count_at + n + 1),
        Some(_) => Part::Not,
    }
}

impl FirstRecord {
    /// The reader of `key`'s record, passing over a first record of the
    /// view's own session keyring `ring` (its serial), if given.
    pub fn new(key: &AuthKey, ring: Option<i32>) -> FirstRecord {
        let serial = serial_field(key.serial);
        let mut head = [0u8; 21];
        head[..4].copy_from_slice(b"key:");
        let mut head_len = 4 + digits(u64::from(key.target as u32), 16, &mut head[4..]);
        head[head_len..head_len + 5].copy_from_slice(b" pid:");
        head_len += 5;
        let mut tail = [0u8; 26];
        tail[..4].copy_from_slice(b" ci:");
        let mut tail_len = 4 + digits(key.callout_len as u64, 10, &mut tail[4..]);
        tail[tail_len] = b'\n';
        tail_len += 1;
        FirstRecord {
            ring: ring.map(serial_field),
            serial,
            head,
            head_len,
            tail,
            tail_len,
        }
    }

    /// The next step, given the bytes of the view read so far (all of them,
    /// from its start, each read as asked by the step before; none at
    /// first).
    pub fn step(&self, seen: &[u8]) -> Step {
        if seen.len() < RECORD_HEAD {
            return Step::Read(RECORD_HEAD - seen.len());
        }
        if self.ring.is_some_and(|r| seen.starts_with(&r)) {
            return match ring_record(seen) {
                Part::Ends(at) => match self.auth_step(&seen[at..]) {
                    Step::Done { len, .. } => Step::Done { at, len },
                    other => other,
                },
                Part::Read(n) => Step::Read(n),
                Part::Not => Step::NotFirst,
            };
        }
        self.auth_step(seen)
    }

    /// The end of the authorization key's record, ` ci:%zu` with the
    /// request's callout length: the reads stop once the pid is whole, and
    /// what they saw of this part is only checked to begin it. Reading a
    /// record's last byte makes the kernel list the keys after it (to have
    /// the next record ready); this part holds only the callout's length,
    /// which the request carries and nothing relies on.
    pub fn unread(&self) -> &[u8] {
        &self.tail[..self.tail_len - 1]
    }

    /// [`FirstRecord::step`] for the authorization key's record, which
    /// `seen` starts. Every read leaves at least the record's newline
    /// unread; the record is taken once the pid's digits are whole (a
    /// space after them).
    fn auth_step(&self, seen: &[u8]) -> Step {
        let head = &self.head[..self.head_len];
        // With the newline: what is left after the pid's digits.
        let tail = &self.tail[..self.tail_len];
        if seen.len() < RECORD_HEAD {
            return Step::Read(RECORD_HEAD - seen.len());
        }
        if !seen.starts_with(&self.serial) {
            return Step::NotFirst;
        }
        // After the type field and after `key:<target> pid:`, at least a
        // digit of the pid and the tail are still to come: reading the
        // tail's length more is safe.
        let part = match type_field(seen, AUTH_TYPE, head.len() + tail.len()) {
            Part::Ends(desc_at) => known(seen, desc_at, head, tail.len()),
            other => other,
        };
        let pid_at = match part {
            Part::Ends(at) => at,
            Part::Read(n) => return Step::Read(n),
            Part::Not => return Step::NotFirst,
        };
        let after = &seen[pid_at..];
        let pid = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if pid > MAX_PID_DIGITS {
            return Step::NotFirst;
        }
        if pid == after.len() {
            // Maybe more digits; the whole tail is still to come.
            return Step::Read(if pid == 0 { tail.len() } else { 1 });
        }
        // `%d` of a pid: no leading zero, never 0.
        if pid == 0 || after[0] == b'0' || !self.unread().starts_with(&after[pid..]) {
            return Step::NotFirst;
        }
        Step::Done {
            at: 0,
            len: pid_at + pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The authorization key most tests look for.
    const KEY: AuthKey = AuthKey {
        serial: 0x1a2b_3c4d,
        target: 0xb,
        callout_len: 7,
    };

    fn scan(text: &[u8], auth: i32, chunk: usize, out: &mut [u8]) -> KeysScan {
        let mut m = KeysLine::new(auth);
        for c in text.chunks(chunk.max(1)) {
            m.feed(c, out);
        }
        m.finish(out)
    }

    const KEYS: &[u8] = b"0000000a I--Q--- 1 perm 3f010000 0 0 user x: 1\n\
        1a2b3c4d I--Q--- 1 perm 3f010000 0 0 .request_ key:0000000b pid:42 ci:7\n\
        1a2b3c4e I--Q--- 1 perm 3f010000 0 0 user y: 1\n";

    #[test]
    fn keys_line_is_found_across_chunks() {
        let want = KEYS.split(|&b| b == b'\n').nth(1).unwrap();
        for chunk in [1, 2, 7, 9, 10, 64, KEYS.len()] {
            let mut out = [0u8; 512];
            let s = scan(KEYS, 0x1a2b_3c4d, chunk, &mut out);
            assert_eq!((&out[..s.len], s.count), (want, 1), "chunk {chunk}");
        }
        // The last line without a newline counts.
        let mut out = [0u8; 512];
        let s = scan(&KEYS[..KEYS.len() - 1], 0x1a2b_3c4e, 5, &mut out);
        assert_eq!(s.count, 1);
        assert!(out[..s.len].ends_with(b"user y: 1"));
        // A serial that is only a prefix of another (always 8 digits) or
        // of a longer token, and no serial at all.
        for (auth, text) in [
            (0x01a2_b3c4, KEYS),
            (
                0x1a2b_3c4d,
                &b"1a2b3c4dd I--Q--- 1 perm 0 0 0 user z: 1\n"[..],
            ),
            (0x1a2b_3c4d, b"1a2b3c4d"),
            (0x1a2b_3c4d, b""),
            (0x1a2b_3c4d, b" 1a2b3c4d I--Q--- x\n"),
        ] {
            let mut out = [0u8; 512];
            assert_eq!(scan(text, auth, 3, &mut out), KeysScan { len: 0, count: 0 });
        }
        // A line too long for the buffer is counted, but not kept.
        let mut small = [0u8; 8];
        assert_eq!(
            scan(KEYS, 0x0a, 4, &mut small),
            KeysScan { len: 0, count: 1 }
        );
    }

    #[test]
    fn every_line_with_the_serial_is_counted() {
        let real = &b"1a2b3c4d I--Q--- 1 perm 3f010000 0 0 .request_ key:0000000b pid:42 ci:7"[..];
        // A forged line in another key's description, before and after
        // the real one, and a second copy of the real line itself.
        let forged_desc = b"0000000a I--Q--- 1 perm 3f3f3f3f 4310 4310 user x\n\
            1a2b3c4d I--Q--- 1 perm 3f010000 4300 4300 .request_ key:0000000b pid:99 ci:7: 0\n";
        let mut before = forged_desc.to_vec();
        before.extend_from_slice(real);
        before.push(b'\n');
        let mut after = real.to_vec();
        after.push(b'\n');
        after.extend_from_slice(forged_desc);
        let mut twice = after[..real.len() + 1].to_vec();
        twice.extend_from_slice(&after[..real.len() + 1]);
        for text in [&before, &after, &twice] {
            for chunk in [1, 3, 9, 100, text.len()] {
                let mut out = [0u8; 512];
                let s = scan(text, 0x1a2b_3c4d, chunk, &mut out);
                assert_eq!(s.count, 2, "chunk {chunk}");
                // Whatever is kept, the count tells the broker to refuse.
                assert!(out[..s.len].starts_with(b"1a2b3c4d "));
            }
        }
        // Many decoys saturate, never wrap.
        let mut m = KeysLine::new(0x0a);
        let mut out = [0u8; 64];
        for _ in 0..3 {
            m.feed(b"0000000a x\n", &mut out);
        }
        assert_eq!(m.finish(&out).count, 3);
    }

    /// Reads `view` as the broker does, following the steps; the step it
    /// ends with, and the bytes read by then.
    fn follow(view: &[u8], key: &AuthKey, ring: Option<i32>) -> (Step, usize) {
        let reader = FirstRecord::new(key, ring);
        let mut seen = 0;
        loop {
            match reader.step(&view[..seen]) {
                Step::Read(n) => {
                    assert!(n > 0);
                    if seen + n > view.len() || seen + n > MAX_LINE {
                        return (Step::NotFirst, seen);
                    }
                    seen += n;
                }
                done => return (done, seen),
            }
        }
    }

    /// `follow`, expecting the record at `at`, whose newline must be left
    /// unread; its line as the reader puts it together.
    fn line_at(view: &[u8], key: &AuthKey, ring: Option<i32>, at: usize) -> Vec<u8> {
        let (step, seen) = follow(view, key, ring);
        let Step::Done { at: got_at, len } = step else {
            panic!("{step:?}: {}", String::from_utf8_lossy(view));
        };
        assert_eq!(got_at, at);
        let end = at + view[at..].iter().position(|&b| b == b'\n').unwrap();
        assert!(
            seen <= end,
            "read the record's end: {}",
            String::from_utf8_lossy(view)
        );
        let mut line = view[at..at + len].to_vec();
        line.extend_from_slice(FirstRecord::new(key, ring).unread());
        line
    }

    fn auth_record(serial: u32, uid: &str, target: u32, pid: u32, ci: usize) -> String {
        format!(
            "{serial:08x} I--Q---     1 perm 3f010000 {uid:>5} 65534 .request_ key:{target:x} pid:{pid} ci:{ci}\n"
        )
    }

    #[test]
    fn the_first_record_is_read_alone() {
        let next = "5a000000 I--Q---     1 perm 3f010000     0 65534 user      x: 1\n";
        for (serial, target, pid, ci) in [
            (0x0000_0001_u32, 0x1_u32, 1_u32, 0_usize),
            (0x1a2b_3c4d, 0x7fff_ffff, 4_194_304, 4095),
            (0x0012_3456, 0xbeef, 42, 7),
            (0x7fff_ffff, 0x10, 999_999, 100),
        ] {
            let rec = auth_record(serial, "0", target, pid, ci);
            assert_eq!(rec.find(" key:"), Some(RECORD_HEAD - 1), "{rec}");
            let key = AuthKey {
                serial: serial as i32,
                target: target as i32,
                callout_len: ci,
            };
            let view = format!("{rec}{next}");
            let line = rec.trim_end().as_bytes();
            assert_eq!(line_at(view.as_bytes(), &key, None, 0), line);
            // The view's keyring named but not first: the same.
            assert_eq!(line_at(view.as_bytes(), &key, Some(0x5a00_0000), 0), line);
            // Another serial or target: not this record. (The callout's
            // length is what the request says: read only as far as the
            // pid's end needs.)
            for other in [
                AuthKey {
                    serial: serial as i32 ^ 1,
                    ..key
                },
                AuthKey {
                    target: target as i32 ^ 1,
                    ..key
                },
            ] {
                assert_eq!(
                    follow(view.as_bytes(), &other, None).0,
                    Step::NotFirst,
                    "{rec}"
                );
            }
        }
    }

    #[test]
    fn anything_else_first_is_not_trusted() {
        let key = KEY;
        let real = auth_record(0x1a2b_3c4d, "0", 0xb, 42, 7);
        // Another key first, its description forging the real line.
        let forger =
            format!("0000000a I--Q---     1 perm 3f3f3f3f     0 65534 user      x\n{real}");
        // The key revoked (no pid any more), more digits than a pid has,
        // another type, an empty view.
        let revoked = "1a2b3c4d I-R-Q--     1 perm 3f010000     0 65534 .request_ key:b\n";
        let more_digits = auth_record(0x1a2b_3c4d, "0", 0xb, 12_345_678, 7);
        for view in [
            format!("{forger}{real}"),
            format!("{revoked}{real}"),
            format!("{more_digits}{real}"),
            real.replace(".request_", "user     "),
            real.replace("pid:42", "pid:042"),
            real.replace("pid:42", "pid:0"),
            real.replace("I--Q---", "I-\t-Q--"),
            real.replace("     1 perm", "    \n1 perm"),
            String::new(),
        ] {
            assert_eq!(
                follow(view.as_bytes(), &key, None).0,
                Step::NotFirst,
                "{view}"
            );
        }
        // Found unlike the expected record before its end is read.
        assert!(follow(forger.as_bytes(), &key, None).1 < forger.find('\n').unwrap());
    }

    #[test]
    fn fields_wider_than_their_width_are_followed() {
        let key = KEY;
        let next = auth_record(0x1a2b_3c4e, "0", 0xb, 42, 7);
        for rec in [
            auth_record(0x1a2b_3c4d, "1000000", 0xb, 42, 7),
            auth_record(0x1a2b_3c4d, "4294967294", 0xb, 4_194_304, 7),
            "1a2b3c4d I--Q--- 123456 perm 3f010000 100000 1000000 .request_ key:b pid:9 ci:7\n"
                .to_string(),
        ] {
            let view = format!("{rec}{next}");
            let line = line_at(view.as_bytes(), &key, None, 0);
            assert_eq!(line, rec.trim_end().as_bytes());
            // And after the view's keyring's record, itself wide.
            let ring = "00000100 I------     2 perm 3f1b0000 100000 100000 keyring   _ses: 1\n";
            let view = format!("{ring}{rec}{next}");
            let line = line_at(view.as_bytes(), &key, Some(0x100), ring.len());
            assert_eq!(line, rec.trim_end().as_bytes());
        }
    }

    #[test]
    fn any_split_of_the_reads_gives_the_same_record() {
        // Reads may return less than asked: the steps follow from the bytes
        // seen, whatever their number.
        let key = KEY;
        let ring = "00000100 I------     2 perm 3f1b0000     0 65534 keyring   _ses: 12\n";
        let rec = auth_record(0x1a2b_3c4d, "0", 0xb, 4242, 7);
        let view = format!("{ring}{rec}");
        let reader = FirstRecord::new(&key, Some(0x100));
        for short in 1..8 {
            let mut seen = 0;
            let step = loop {
                match reader.step(&view.as_bytes()[..seen]) {
                    Step::Read(n) => seen += n.min(short),
                    done => break done,
                }
            };
            let want = Step::Done {
                at: ring.len(),
                len: rec.len() - 1 - FirstRecord::new(&key, None).unread().len(),
            };
            assert_eq!(step, want, "reads of at most {short}");
            assert!(seen < view.len());
        }
    }

    fn ring_record(serial: u32, desc: &str) -> String {
        format!("{serial:08x} I------     2 perm 3f1b0000     0 65534 keyring   {desc}\n")
    }

    #[test]
    fn the_views_own_keyring_first_is_passed_over() {
        let key = KEY;
        let real = auth_record(0x1a2b_3c4d, "0", 0xb, 42, 7);
        let ring = Some(0x0000_0100);
        for keys in ["1", "9", "12", "1234567"] {
            let first = ring_record(0x100, &format!("_ses: {keys}"));
            let view = format!("{first}{real}");
            let line = line_at(view.as_bytes(), &key, ring, first.len());
            assert_eq!(line, real.trim_end().as_bytes());
            // Not named: scanned; another serial: scanned.
            assert_eq!(follow(view.as_bytes(), &key, None).0, Step::NotFirst);
            assert_eq!(follow(view.as_bytes(), &key, Some(0x101)).0, Step::NotFirst);
        }
        // The keyring first, then another key's record: scanned.
        let other = auth_record(0x1a2b_3c4e, "0", 0xb, 42, 7);
        let view = format!("{}{other}{real}", ring_record(0x100, "_ses: 2"));
        assert_eq!(follow(view.as_bytes(), &key, ring).0, Step::NotFirst);
        // Only the kernel's record of an anonymous session keyring holding
        // keys; and only one record passed over.
        for first in [
            ring_record(0x100, "_ses: empty"),
            ring_record(0x100, "_ses"),
            ring_record(0x100, "_sess: 1"),
            ring_record(0x100, "_ses: 1x"),
            ring_record(0x100, "_ses: 1").replace("keyring  ", "user     "),
            format!(
                "{}{}",
                ring_record(0x100, "_ses: 1"),
                ring_record(0x100, "_ses: 1")
            ),
        ] {
            let view = format!("{first}{real}");
            assert_eq!(
                follow(view.as_bytes(), &key, ring).0,
                Step::NotFirst,
                "{view}"
            );
        }
    }

    #[test]
    fn mutated_views_never_take_a_line_across_a_newline() {
        // Single-byte changes, insertions and cuts of a real view: whatever
        // is taken lies within one line, starts with the serial (after one
        // whole keyring record at most), and its end was not read.
        let key = KEY;
        let ring = "00000100 I------     2 perm 3f1b0000     0 65534 keyring   _ses: 1\n";
        let real = auth_record(0x1a2b_3c4d, "0", 0xb, 42, 7);
        let base = format!("{ring}{real}{real}").into_bytes();
        let alphabet = b" \n0123456789abcdef.:_kpirceuqst-IQ";
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut taken = 0;
        for _ in 0..20_000 {
            let mut view = base.clone();
            for _ in 0..1 + next(3) {
                let at = next(view.len());
                match next(3) {
                    0 => view[at] = alphabet[next(alphabet.len())],
                    1 => view.insert(at, alphabet[next(alphabet.len())]),
                    _ => {
                        view.remove(at);
                    }
                }
            }
            let (step, seen) = follow(&view, &key, Some(0x100));
            let Step::Done { at, len } = step else {
                continue;
            };
            taken += 1;
            assert!(at + len <= seen);
            assert!(!view[at..seen].contains(&b'\n'));
            assert!(view[at..].starts_with(b"1a2b3c4d "));
            if at > 0 {
                assert!(view.starts_with(b"00000100 "));
                assert_eq!(view.iter().position(|&b| b == b'\n'), Some(at - 1));
            }
        }
        // Most single changes miss the parts that are read.
        assert!(taken > 1_000, "{taken}");
    }
}
