//! Finding the authorization key's line in /proc/keys, which names the
//! requesting thread: fed in chunks, bounded, counting forgeries.

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
        let mut want = [b' '; 9];
        let hex = b"0123456789abcdef";
        let v = auth as u32;
        for (i, slot) in want[..8].iter_mut().enumerate() {
            *slot = hex[((v >> (28 - 4 * i)) & 0xf) as usize];
        }
        KeysLine {
            want,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
