//! Requests waiting for a worker, by requester uid: the broker's fairness.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::net::UnixStream;

/// Requests of one uid served at once: the rest of the workers stay free
/// for other uids, whatever one uid sends.
pub(super) const PER_UID: usize = 2;
/// Requests waiting at most, per uid and in all (each holds a socket);
/// past that, ETIMEDOUT at once.
pub(super) const MAX_QUEUED_PER_UID: usize = 128;
pub(super) const MAX_QUEUED: usize = 512;

/// One request between its arrival and its answer.
pub(super) struct Job {
    pub stream: UnixStream,
    pub upcall: Vec<u8>,
    pub uid: u32,
}

/// Requests waiting for a worker, one queue per requester uid, served
/// round robin with at most [`PER_UID`] of one uid at once: however many
/// requests one uid sends (or however slow they are), every other uid's
/// next request goes to the next free worker.
#[derive(Default)]
pub(super) struct Queues {
    waiting: BTreeMap<u32, VecDeque<Job>>,
    running: HashMap<u32, usize>,
    pub queued: usize,
    /// Where the round robin goes on.
    next_uid: u32,
    /// Workers waiting for work, and wake-ups sent to them that no woken
    /// worker has taken yet: together they keep the wake-ups to what the
    /// waiting jobs need, however long all workers stay busy.
    idle: usize,
    signalled: usize,
}

impl Queues {
    /// Queues a job, or gives it back when its uid (or everyone) has too
    /// many waiting.
    pub fn push(&mut self, job: Job) -> Result<(), Job> {
        let q = self.waiting.entry(job.uid).or_default();
        if q.len() >= MAX_QUEUED_PER_UID || self.queued >= MAX_QUEUED {
            return Err(job);
        }
        q.push_back(job);
        self.queued += 1;
        Ok(())
    }

    /// The next job of the next uid (after the last one served) that has
    /// fewer than PER_UID running.
    pub fn pop(&mut self) -> Option<Job> {
        let running = &self.running;
        let uid = self
            .waiting
            .range(self.next_uid..)
            .chain(self.waiting.range(..self.next_uid))
            .find(|(uid, q)| !q.is_empty() && running.get(uid).copied().unwrap_or(0) < PER_UID)
            .map(|(uid, _)| *uid)?;
        let q = self.waiting.get_mut(&uid)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.waiting.remove(&uid);
        }
        self.queued -= 1;
        *self.running.entry(uid).or_default() += 1;
        self.next_uid = uid.wrapping_add(1);
        Some(job)
    }

    /// How many waiting jobs [`Queues::pop`] would hand out now.
    pub fn eligible(&self) -> usize {
        self.waiting
            .iter()
            .map(|(uid, q)| {
                let running = self.running.get(uid).copied().unwrap_or(0);
                q.len().min(PER_UID.saturating_sub(running))
            })
            .sum()
    }

    /// Workers waiting for work now.
    pub fn idle(&self) -> usize {
        self.idle
    }

    /// A worker is about to wait for work.
    pub fn waiting(&mut self) {
        self.idle += 1;
    }

    /// A worker stopped waiting; `woken` if a wake-up of ours woke it.
    pub fn awake(&mut self, woken: bool) {
        self.idle = self.idle.saturating_sub(1);
        if woken {
            self.signalled = self.signalled.saturating_sub(1);
        }
    }

    /// How many waiting workers to wake now: one per job that may run and
    /// that no wake-up already sent is for, at most one per waiting worker.
    pub fn wakes_needed(&mut self) -> usize {
        let n = self
            .eligible()
            .min(self.idle)
            .saturating_sub(self.signalled);
        self.signalled += n;
        n
    }

    pub fn done(&mut self, uid: u32) {
        if let Some(n) = self.running.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(uid: u32) -> Job {
        let (a, _b) = UnixStream::pair().unwrap();
        Job {
            stream: a,
            upcall: Vec::new(),
            uid,
        }
    }

    #[test]
    fn a_flooding_uid_gets_its_share_and_no_more() {
        let mut q = Queues::default();
        for _ in 0..50 {
            q.push(job(1000)).map_err(|_| ()).unwrap();
        }
        // Only PER_UID of the flooder's run at once, however many wait.
        let first: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|j| j.uid).collect();
        assert_eq!(first, vec![1000; PER_UID]);
        // Another uid's request goes next, ahead of the flooder's backlog.
        q.push(job(0)).map_err(|_| ()).unwrap();
        q.push(job(2000)).map_err(|_| ()).unwrap();
        let mut next: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|j| j.uid).collect();
        next.sort_unstable();
        assert_eq!(next, vec![0, 2000]);
        q.done(1000);
        assert_eq!(q.pop().map(|j| j.uid), Some(1000));
        assert_eq!(q.queued, 50 - PER_UID - 1);
    }

    #[test]
    fn eligible_counts_what_pop_hands_out() {
        let mut q = Queues::default();
        for uid in [1000, 1000, 1000, 0] {
            q.push(job(uid)).map_err(|_| ()).unwrap();
        }
        assert_eq!(q.eligible(), PER_UID + 1);
        let mut popped = 0;
        while q.pop().is_some() {
            popped += 1;
        }
        assert_eq!(popped, PER_UID + 1);
        assert_eq!(q.eligible(), 0, "uid 1000 has its share running");
        q.done(1000);
        assert_eq!(q.eligible(), 1);
    }

    #[test]
    fn wake_ups_follow_the_waiting_workers_not_the_load() {
        let mut q = Queues::default();
        // A long burst with every worker busy: jobs become eligible again
        // and again, but nobody waits, so nobody is woken.
        for round in 0..1000u32 {
            q.push(job(round % 10)).map_err(|_| ()).unwrap();
            assert_eq!(q.wakes_needed(), 0);
            let j = q.pop().unwrap();
            q.done(j.uid);
        }
        // Three workers wait; five jobs may run: three wake-ups, once.
        for uid in 0..5 {
            q.push(job(uid)).map_err(|_| ()).unwrap();
        }
        for _ in 0..3 {
            q.waiting();
        }
        assert_eq!(q.wakes_needed(), 3);
        assert_eq!(q.wakes_needed(), 0, "already on their way");
        // Each woken worker takes its wake-up; none is left over.
        for _ in 0..3 {
            q.awake(true);
        }
        assert_eq!(q.wakes_needed(), 0, "nobody waits");
        q.waiting();
        assert_eq!(q.wakes_needed(), 1);
    }

    #[test]
    fn round_robin_across_uids() {
        let mut q = Queues::default();
        for uid in [5, 5, 5, 7, 7, 9] {
            q.push(job(uid)).map_err(|_| ()).unwrap();
        }
        let mut order = Vec::new();
        while let Some(j) = q.pop() {
            order.push(j.uid);
            q.done(j.uid);
        }
        assert_eq!(order, vec![5, 7, 9, 5, 7, 5]);
    }

    #[test]
    fn queues_are_bounded() {
        let mut q = Queues::default();
        for _ in 0..MAX_QUEUED_PER_UID {
            q.push(job(1)).map_err(|_| ()).unwrap();
        }
        assert!(q.push(job(1)).is_err(), "per uid");
        assert!(q.push(job(2)).is_ok(), "others still queue");
    }
}
