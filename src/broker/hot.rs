//! Hot keys: the PRKs of recent requests, so that a key asked for again
//! within the configured window is served without a TPM command. Keyed by
//! the derivation message m, which encodes every input (purpose, name,
//! binding values, options, epoch): a hit is exactly the same derivation.
//! Policy and identity are checked before the TPM step on every request,
//! as without the cache. PRKs sit in secret memory and are zeroized when
//! their window ends, when the cache is full (oldest first) and when the
//! broker exits.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::derive::Prk;
use crate::secret::{SecretAllocError, SecretBuf};

/// PRKs held at most.
pub(super) const MAX_HOT: usize = 64;

struct Entry {
    message: [u8; 32],
    prk: SecretBuf,
    since: Instant,
}

/// The hot PRKs, oldest first.
pub(super) struct HotKeys {
    window: Duration,
    entries: Mutex<VecDeque<Entry>>,
}

impl HotKeys {
    pub fn new(window: Duration) -> HotKeys {
        HotKeys {
            window,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops (and so zeroizes) every PRK whose window has ended.
    pub fn expire(&self) {
        let now = Instant::now();
        self.lock()
            .retain(|e| now.duration_since(e.since) < self.window);
    }

    /// Whether any PRK is held (the broker stays while one is).
    pub fn is_empty(&self) -> bool {
        self.expire();
        self.lock().is_empty()
    }

    /// The PRK of `message`, if it was derived within the window.
    pub fn get(&self, message: &[u8; 32]) -> Result<Option<Prk>, SecretAllocError> {
        if self.window.is_zero() {
            return Ok(None);
        }
        self.expire();
        let entries = self.lock();
        let Some(e) = entries.iter().find(|e| e.message == *message) else {
            return Ok(None);
        };
        let copy = SecretBuf::copy_from(e.prk.as_ref())?;
        Ok(Prk::new(copy).ok())
    }

    /// Remembers the PRK the TPM just gave for `message`.
    pub fn put(&self, message: &[u8; 32], prk: &Prk) -> Result<(), SecretAllocError> {
        if self.window.is_zero() {
            return Ok(());
        }
        let copy = SecretBuf::copy_from(prk.as_bytes())?;
        let mut entries = self.lock();
        entries.retain(|e| e.message != *message);
        while entries.len() >= MAX_HOT {
            entries.pop_front();
        }
        entries.push_back(Entry {
            message: *message,
            prk: copy,
            since: Instant::now(),
        });
        Ok(())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prk(b: u8) -> Prk {
        Prk::new(SecretBuf::copy_from(&[b; 32]).unwrap()).unwrap()
    }

    #[test]
    fn a_hit_is_the_same_message_within_the_window() {
        let h = HotKeys::new(Duration::from_millis(200));
        assert!(h.get(&[1; 32]).unwrap().is_none());
        h.put(&[1; 32], &prk(7)).unwrap();
        assert_eq!(h.get(&[1; 32]).unwrap().unwrap().as_bytes(), &[7; 32]);
        assert!(h.get(&[2; 32]).unwrap().is_none(), "another derivation");
        std::thread::sleep(Duration::from_millis(250));
        assert!(h.get(&[1; 32]).unwrap().is_none(), "the window ended");
        assert!(h.is_empty());
    }

    #[test]
    fn zero_turns_it_off_and_the_count_is_bounded() {
        let off = HotKeys::new(Duration::ZERO);
        off.put(&[1; 32], &prk(1)).unwrap();
        assert!(off.get(&[1; 32]).unwrap().is_none());
        assert_eq!(off.len(), 0);
        let h = HotKeys::new(Duration::from_secs(60));
        for i in 0..(MAX_HOT as u32 + 5) {
            let mut m = [0u8; 32];
            m[..4].copy_from_slice(&i.to_be_bytes());
            h.put(&m, &prk(1)).unwrap();
        }
        assert_eq!(h.len(), MAX_HOT);
        assert!(h.get(&[0; 32]).unwrap().is_none(), "oldest went first");
    }
}
