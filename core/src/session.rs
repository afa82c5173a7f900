//! The session keyring the kernel makes for each request-key upcall
//! (`_req.<key>`, in security/keys/request_key.c), which request-key(8)
//! and then the handler run in and nothing else uses. Once the request is
//! over it waits for the key collector with the request's other finished
//! keys, and every reader of /proc/keys (the broker's view of its owner's
//! keys, at every request) searches its own keyrings for each such key
//! whose possessor may view it. The handler therefore takes the
//! possessor's view away from this keyring, after checking that it is
//! the request's own.

/// `KEY_POS_VIEW` (linux/keyctl.h).
pub const KEY_POS_VIEW: u32 = 0x0100_0000;

/// The permissions for the keyring that `describe` (its KEYCTL_DESCRIBE,
/// `type;uid;gid;perm;description`) reports: its own less the
/// possessor's view, if it is key `key`'s request keyring and its
/// possessor may still view it; None otherwise, and nothing is to change.
pub fn without_possessor_view(describe: &[u8], key: i32) -> Option<u32> {
    let mut fields = describe.splitn(5, |&b| b == b';');
    if fields.next()? != b"keyring" {
        return None;
    }
    let (_uid, _gid) = (fields.next()?, fields.next()?);
    let perm = hex_u32(fields.next()?)?;
    let serial = fields.next()?.strip_prefix(b"_req.")?;
    let key = u32::try_from(key).ok()?;
    (decimal_u32(serial)? == key && perm & KEY_POS_VIEW != 0).then_some(perm & !KEY_POS_VIEW)
}

/// Eight lowercase hex digits, as the kernel prints permissions.
fn hex_u32(b: &[u8]) -> Option<u32> {
    if b.len() != 8 {
        return None;
    }
    b.iter().try_fold(0u32, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u32::from(d))
    })
}

/// A decimal without sign or leading zeros, as the kernel prints a serial.
fn decimal_u32(b: &[u8]) -> Option<u32> {
    if b.is_empty() || (b.len() > 1 && b[0] == b'0') {
        return None;
    }
    b.iter().try_fold(0u32, |acc, &c| {
        if !c.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u32::from(c - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_requests_own_keyring_loses_the_possessors_view() {
        let ours = b"keyring;0;0;3f030000;_req.132878927";
        assert_eq!(without_possessor_view(ours, 132_878_927), Some(0x3e03_0000));
        // Already without it: nothing to change.
        assert_eq!(
            without_possessor_view(b"keyring;0;0;3e030000;_req.132878927", 132_878_927),
            None
        );
        // Whatever else it keeps, it keeps.
        assert_eq!(
            without_possessor_view(b"keyring;1000;100;3f3f0000;_req.7", 7),
            Some(0x3e3f_0000)
        );
        for other in [
            &b"keyring;0;0;3f030000;_req.132878928"[..],
            b"keyring;0;0;3f030000;_ses",
            b"keyring;0;0;3f030000;_req.0132878927",
            b"keyring;0;0;3f030000;_req.",
            b"keyring;0;0;3f030000;_req.132878927x",
            b"keyring;0;0;3f030000;x_req.132878927",
            b"user;0;0;3f030000;_req.132878927",
            b"keyring;0;0;3F030000;_req.132878927",
            b"keyring;0;0;3f03000;_req.132878927",
            b"keyring;0;0;3f030000",
            b"",
        ] {
            assert_eq!(
                without_possessor_view(other, 132_878_927),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        assert_eq!(without_possessor_view(ours, -1), None);
        assert_eq!(
            without_possessor_view(b"keyring;0;0;3f030000;_req.99999999999", 1),
            None
        );
    }
}
