//! The threads of the model's parallel loops: a team that spins between loops instead of
//! sleeping.
//!
//! A decoding step runs some 130 small parallel loops (each layer's products, the attention,
//! the sampling), many of them tens of microseconds long. On rayon's pool each of them paid
//! for waking a parked worker and for blocking the calling thread, which is not one of the
//! pool's, on a lock: more than the loop itself on a virtual machine, where a sleeping
//! thread's processor halts and waking it goes through the host (a 640 × 256 product took
//! 27 µs there, 6 µs here). Here the calling thread takes part in its own loop, and the
//! helpers watch for the next loop for [`SPIN`] before they sleep. Every product with a
//! frozen weight, the fused elementwise ops, the decoding attention and the sampling run
//! here, so a spinning helper does not compete with rayon's workers for the cores.
//!
//! One loop runs on the team at a time: a loop started while another runs (another thread's,
//! or one inside a loop's body) runs on rayon's pool instead, so nothing waits for the team.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper watches for the next loop before it sleeps.
const SPIN: Duration = Duration::from_millis(1);

/// The most indices one loop on the team may have (its count is kept in 16 bits).
const MAX_COUNT: usize = u16::MAX as usize;

/// The team's threads, the caller's among them: as many as rayon's pool has (its count is
/// set once, by `RAYON_NUM_THREADS` or [`crate::runtime::init`]).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f(i)` for every `i` in `0..count`, the calling thread among the team's threads, and
/// returns when all have run. A panic in `f` reaches the caller once every index is done.
pub fn for_each(count: usize, f: impl Fn(usize) + Sync) {
    match count {
        0 => {}
        1 => f(0),
        _ => match team() {
            // one thread: the caller's
            None => (0..count).for_each(f),
            Some(team) if count <= MAX_COUNT && !team.busy.swap(true, Ordering::Acquire) => {
                let outcome = team.run(count, &f);
                team.busy.store(false, Ordering::Release);
                if let Err(payload) = outcome {
                    resume_unwind(payload);
                }
            }
            Some(_) => (0..count).into_par_iter().for_each(&f),
        },
    }
}

/// `f(i)` for every `i` in `0..count`, in that order, computed as [`for_each`] runs them.
pub fn map<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..count).map(|_| Mutex::new(None)).collect();
    for_each(count, |i| {
        let value = f(i);
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    });
    slots
        .into_iter()
        .map(|slot| {
            let value = slot.into_inner().unwrap_or_else(|e| e.into_inner());
            value.expect("every index ran")
        })
        .collect()
}

/// Runs `f(i, chunk)` for every chunk `i` of `len` values of `data` (the last may be
/// shorter), as [`for_each`] runs its indices.
pub fn for_each_chunk<T: Send>(data: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks: Vec<Mutex<&mut [T]>> = data.chunks_mut(len.max(1)).map(Mutex::new).collect();
    for_each(chunks.len(), |i| {
        f(i, &mut chunks[i].lock().unwrap_or_else(|e| e.into_inner()))
    });
}

/// The team, started at its first use with as many threads as rayon's pool (the caller and
/// one helper fewer); none where that is one thread.
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let helpers = threads() - 1;
        if helpers == 0 {
            return None;
        }
        let team: &'static Team = Box::leak(Box::new(Team::default()));
        for i in 0..helpers {
            let started = std::thread::Builder::new()
                .name(format!("rlvr-team-{i}"))
                .spawn(move || team.help());
            if started.is_err() {
                // the loops run on the threads that did start, the caller among them
                break;
            }
        }
        Some(team)
    })
}

/// One loop: its body and how far it has got.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    /// Indices run so far.
    done: AtomicUsize,
    /// The first panic of the body.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// What the caller and the helpers share.
#[derive(Default)]
struct Team {
    /// The current loop's generation (high 32 bits), its index count (next 16) and the next
    /// index to take (low 16): one word, so that an index is taken only from the loop it was
    /// counted for.
    claim: AtomicU64,
    /// The current loop (valid while any of its indices is untaken or running).
    job: AtomicPtr<Job<'static>>,
    /// Whether a loop is running on the team.
    busy: AtomicBool,
    /// Helpers asleep (or about to be) on `wake`.
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

fn generation(word: u64) -> u64 {
    word >> 32
}

impl Team {
    /// Runs the loop's indices on the team; the caller holds `busy`.
    fn run(&self, count: usize, f: &(dyn Fn(usize) + Sync)) -> Result<(), Box<dyn Any + Send>> {
        let job = Job {
            f,
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        // SAFETY (of the lifetime's erasure): the helpers reach the job only through an
        // index they took, and this function returns only once every index has run
        let erased = &job as *const Job<'_> as *mut Job<'static>;
        self.job.store(erased, Ordering::Release);
        let gen = (generation(self.claim.load(Ordering::Relaxed)) + 1) & u64::from(u32::MAX);
        self.claim
            .store(gen << 32 | (count as u64) << 16, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        self.work(gen);
        let start = Instant::now();
        while job.done.load(Ordering::Acquire) < count {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                // a helper's processor was taken away: leave the core to it
                std::thread::yield_now();
            }
        }
        let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        panic.map_or(Ok(()), Err)
    }

    /// Takes and runs loop `gen`'s indices until none is left.
    fn work(&self, gen: u64) {
        loop {
            let word = self.claim.load(Ordering::Acquire);
            let (count, next) = ((word >> 16) & 0xffff, word & 0xffff);
            if generation(word) != gen || next >= count {
                return;
            }
            if self
                .claim
                .compare_exchange_weak(word, word + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            // SAFETY: the index just taken belongs to loop `gen`, whose caller stored its job
            // before publishing it and waits for this index before its job goes
            let job = unsafe { &*self.job.load(Ordering::Acquire) };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.f)(next as usize))) {
                job.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(payload);
            }
            job.done.fetch_add(1, Ordering::Release);
        }
    }

    /// A helper's life: watch for a new loop, spinning for [`SPIN`] and then asleep, and take
    /// part in it.
    fn help(&self) {
        let mut seen = generation(self.claim.load(Ordering::Acquire));
        loop {
            let start = Instant::now();
            let mut polls = 0u32;
            let gen = loop {
                let gen = generation(self.claim.load(Ordering::Acquire));
                if gen != seen {
                    break gen;
                }
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(256) && start.elapsed() > SPIN {
                    break self.sleep(seen);
                }
                std::hint::spin_loop();
            };
            seen = gen;
            self.work(gen);
        }
    }

    /// Sleeps until a loop after `seen` is published; returns its generation.
    fn sleep(&self, seen: u64) -> u64 {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.fetch_add(1, Ordering::SeqCst);
        let gen = loop {
            let gen = generation(self.claim.load(Ordering::SeqCst));
            if gen != seen {
                break gen;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        };
        self.sleeping.fetch_sub(1, Ordering::SeqCst);
        gen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_in_loops_after_one_another() {
        for count in [0, 1, 2, 3, 17, 1000] {
            let runs: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                for_each(count, |i| {
                    runs[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 50));
        }
        assert_eq!(map(5, |i| i * i), vec![0, 1, 4, 9, 16]);
        let mut data: Vec<usize> = vec![0; 10];
        for_each_chunk(&mut data, 3, |i, chunk| chunk.fill(i + chunk.len()));
        assert_eq!(data, [3, 3, 3, 4, 4, 4, 5, 5, 5, 4]);
    }

    #[test]
    fn loops_from_several_threads_and_inside_a_loop_all_run() {
        std::thread::scope(|scope| {
            for t in 0..4 {
                scope.spawn(move || {
                    for _ in 0..200 {
                        let sums = map(8, |i| map(3, |j| t + i + j).iter().sum::<usize>());
                        assert_eq!(sums, (0..8).map(|i| 3 * (t + i) + 3).collect::<Vec<_>>());
                    }
                });
            }
        });
    }

    #[test]
    fn a_panic_in_the_body_reaches_the_caller_and_the_team_goes_on() {
        let caught = catch_unwind(|| for_each(4, |i| assert!(i != 2, "index two")));
        assert!(caught.is_err());
        assert_eq!(map(4, |i| i + 1), vec![1, 2, 3, 4]);
    }

    #[test]
    fn sleeping_helpers_wake_for_the_next_loop() {
        assert_eq!(map(4, |i| i), vec![0, 1, 2, 3]);
        std::thread::sleep(SPIN * 20);
        assert_eq!(map(4, |i| 2 * i), vec![0, 2, 4, 6]);
    }
}
