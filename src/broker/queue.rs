//! Requests waiting for a worker, by requester share (the uid, or the
//! owner of its subordinate uid range: [`super::shares`]): the broker's
//! fairness.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::net::UnixStream;

/// Requests of one uid served at once: the rest of the workers stay free
/// for other uids, whatever one uid sends.
pub(super) const PER_UID: usize = 2;
/// Requests waiting at most, per share and in all (each holds a socket);
/// past that, ETIMEDOUT at once. (Under the kernel's default key quota,
/// 200 keys a uid, one uid alone has at most about 99 requests under way,
/// each a key and a session keyring: the limit per share binds for root,
/// for a share of many subordinate uids, and where the quota is raised.
/// tests/queue.rs fills every place with sixteen uids.)
pub(super) const MAX_QUEUED_PER_UID: usize = 128;
pub(super) const MAX_QUEUED: usize = 512;

/// One request between its arrival and its answer.
pub(super) struct Job {
    pub stream: UnixStream,
    pub upcall: Vec<u8>,
    pub uid: u32,
    /// Whose share it counts against (the queues' key).
    pub share: u32,
}

/// Requests waiting for a worker, one queue per share (a uid, with its
/// subordinate uids if it has any; "uid" below), served round robin with
/// at most [`PER_UID`] of one uid at once: however many
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
    /// Queues a job. A uid with [`MAX_QUEUED_PER_UID`] waiting gets it back.
    /// When [`MAX_QUEUED`] wait in all, the job takes the place of the
    /// newest job of the uid with the most waiting, if that uid would
    /// still have at least as many waiting as this job's uid then has:
    /// that job is handed back instead (to be refused). So a few uids that
    /// fill the queues between them cannot turn every other uid away; a
    /// job is given back itself only when no uid has two more waiting than
    /// its own. Every displacement lowers the sum of the queues' squared
    /// lengths, so uids cannot displace each other back and forth. Among
    /// equally long queues the highest uid's is taken (`max_by_key` keeps
    /// the last).
    pub fn push(&mut self, job: Job) -> Result<Option<Job>, Job> {
        let mine = self.waiting.get(&job.share).map_or(0, VecDeque::len);
        if mine >= MAX_QUEUED_PER_UID {
            return Err(job);
        }
        let displaced = if self.queued >= MAX_QUEUED {
            let longest = self
                .waiting
                .iter()
                .max_by_key(|(_, q)| q.len())
                .filter(|(_, q)| q.len() > mine + 1)
                .map(|(uid, _)| *uid);
            let Some(uid) = longest else {
                return Err(job);
            };
            let q = self.waiting.get_mut(&uid);
            let Some(out) = q.and_then(VecDeque::pop_back) else {
                return Err(job);
            };
            self.queued -= 1;
            Some(out)
        } else {
            None
        };
        self.waiting.entry(job.share).or_default().push_back(job);
        self.queued += 1;
        Ok(displaced)
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

    /// A job of `share` has ended.
    pub fn done(&mut self, share: u32) {
        if let Some(n) = self.running.get_mut(&share) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&share);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues a job that must fit without displacing another.
    fn put(q: &mut Queues, j: Job) {
        assert!(matches!(q.push(j), Ok(None)));
    }

    fn job(uid: u32) -> Job {
        let (a, _b) = UnixStream::pair().unwrap();
        Job {
            stream: a,
            upcall: Vec::new(),
            uid,
            share: uid,
        }
    }

    #[test]
    fn a_flooding_uid_gets_its_share_and_no_more() {
        let mut q = Queues::default();
        for _ in 0..50 {
            put(&mut q, job(1000));
        }
        // Only PER_UID of the flooder's run at once, however many wait.
        let first: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|j| j.uid).collect();
        assert_eq!(first, vec![1000; PER_UID]);
        // Another uid's request goes next, ahead of the flooder's backlog.
        put(&mut q, job(0));
        put(&mut q, job(2000));
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
            put(&mut q, job(uid));
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
            put(&mut q, job(round % 10));
            assert_eq!(q.wakes_needed(), 0);
            let j = q.pop().unwrap();
            q.done(j.uid);
        }
        // Three workers wait; five jobs may run: three wake-ups, once.
        for uid in 0..5 {
            put(&mut q, job(uid));
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

    /// Subordinate uids of one user count as that user: two of them run
    /// no more than PER_UID between them, and another uid goes next.
    #[test]
    fn subordinate_uids_share_their_owners_turns() {
        let mut q = Queues::default();
        for uid in [100_000, 100_001, 100_002, 100_000, 100_001] {
            let mut j = job(uid);
            j.share = 1000;
            put(&mut q, j);
        }
        put(&mut q, job(2000));
        let mut first: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|j| j.share).collect();
        first.sort_unstable();
        assert_eq!(first.len(), PER_UID + 1);
        assert_eq!(first.iter().filter(|&&s| s == 1000).count(), PER_UID);
        assert!(first.contains(&2000));
        // Their turns end by share: one ends, one more of theirs runs.
        q.done(1000);
        assert_eq!(q.pop().map(|j| j.share), Some(1000));
        assert!(q.pop().is_none());
    }

    #[test]
    fn round_robin_across_uids() {
        let mut q = Queues::default();
        for uid in [5, 5, 5, 7, 7, 9] {
            put(&mut q, job(uid));
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
            put(&mut q, job(1));
        }
        assert!(q.push(job(1)).is_err(), "per uid");
        assert!(q.push(job(2)).is_ok(), "others still queue");
    }

    /// Four uids fill every place between them (4 x 128 = 512): a fifth
    /// uid's request still gets in, in place of the newest request of a
    /// uid with the most waiting, and so does a sixth's; the queues never
    /// hold more than MAX_QUEUED.
    #[test]
    fn uids_that_fill_the_queues_make_room_for_others() {
        assert_eq!(4 * MAX_QUEUED_PER_UID, MAX_QUEUED);
        let mut q = Queues::default();
        for i in 0..MAX_QUEUED {
            put(&mut q, job(1000 + (i % 4) as u32));
        }
        assert_eq!(q.queued, MAX_QUEUED);
        let out = q.push(job(7)).map_err(|_| ()).unwrap().unwrap();
        assert!(
            (1000..1004).contains(&out.uid),
            "a flooder's job went: {}",
            out.uid
        );
        let out2 = q.push(job(8)).map_err(|_| ()).unwrap().unwrap();
        assert_ne!(
            out2.uid, out.uid,
            "from the longest queue, now another flooder's"
        );
        assert_eq!(q.queued, MAX_QUEUED);
        // The newcomers are served in their turn of the round robin.
        let mut served = Vec::new();
        while let Some(j) = q.pop() {
            served.push(j.uid);
            q.done(j.uid);
        }
        assert!(served.contains(&7) && served.contains(&8));
        assert_eq!(served.len(), MAX_QUEUED);
    }

    /// The boundary: a uid two ahead of the newcomer's gives up a place
    /// (both end level); one ahead does not.
    #[test]
    fn a_place_is_taken_only_from_a_uid_two_ahead() {
        let mut q = Queues::default();
        for i in 0..MAX_QUEUED {
            put(&mut q, job((i / 2) as u32));
        }
        // 256 uids with two each: a new uid takes one, both end with one.
        let out = q.push(job(100_000)).map_err(|_| ()).unwrap().unwrap();
        assert_eq!(q.waiting[&out.uid].len(), 1);
        assert_eq!(q.waiting[&100_000].len(), 1);
        // The newcomer, now at one, against uids at two: two is not two
        // ahead of the two it would have.
        assert!(q.push(job(100_000)).is_err());
        assert_eq!(q.queued, MAX_QUEUED);
    }

    /// With every uid holding as many as the newcomer would, nobody is
    /// displaced: the newcomer is given back.
    #[test]
    fn nobody_is_displaced_for_an_equal_share() {
        let mut q = Queues::default();
        for i in 0..MAX_QUEUED {
            put(&mut q, job(i as u32));
        }
        // 512 uids with one each; a second request of uid 0 would leave it
        // with two against their one.
        assert!(q.push(job(0)).is_err());
        // And a new uid would take one from a uid that has only one.
        assert!(q.push(job(100_000)).is_err());
        assert_eq!(q.queued, MAX_QUEUED);
    }
}
