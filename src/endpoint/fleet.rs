//! Several servers of one model used as one (one vLLM per GPU, a set of `rlvr serve`
//! processes): [`Fleet::spread`] hands out work items to the servers, each with at most its
//! own `concurrency` items in flight, and reports each result on the caller's thread as it
//! finishes. An item whose request fails is given to another server when its server no
//! longer answers (`GET /models` fails): the failed server is left out for the rest of the
//! fleet's life and its items in flight go to the others, so a server that dies costs time,
//! not items. An item that fails on a server that still answers is an error of the item.
//!
//! Which server answers an item never changes what the item asks for (its seed is the
//! caller's, fixed per item), so results do not depend on how the work was spread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{Endpoint, EndpointError};
use crate::progress::Job;

/// Servers of one model, used together.
#[derive(Clone, Debug)]
pub struct Fleet {
    endpoints: Vec<Endpoint>,
    /// Which servers failed (left out from then on).
    down: Arc<Vec<AtomicBool>>,
}

/// Why [`Fleet::spread`] stopped before every item was done.
#[derive(Debug)]
pub enum FleetError<E> {
    /// Item `index` failed on a server that still answers.
    Item {
        /// The item.
        index: usize,
        /// What the work returned.
        error: E,
    },
    /// Every server stopped answering; `left` items were not done.
    Down {
        /// Items not done.
        left: usize,
        /// The last failure seen, described.
        last: String,
    },
    /// The job was cancelled; the items finished before are reported.
    Cancelled,
}

/// What the workers share.
struct Queue {
    /// Items not yet handed out (or handed back by a failed server).
    todo: VecDeque<usize>,
    /// Items not yet finished (handed out or not).
    pending: usize,
    /// An item failed or the job was cancelled: hand out nothing more.
    stop: bool,
}

impl Fleet {
    /// The fleet of `endpoints`, which must name one model (the caches are kept by model
    /// name).
    pub fn new(endpoints: Vec<Endpoint>) -> Result<Fleet, EndpointError> {
        let first = endpoints.first().ok_or_else(|| EndpointError::Config {
            url: String::new(),
            message: "a fleet needs at least one endpoint".into(),
        })?;
        if let Some(other) = endpoints.iter().find(|e| e.model() != first.model()) {
            return Err(EndpointError::Config {
                url: other.base_url().to_string(),
                message: format!(
                    "serves model `{}` but the fleet's first endpoint ({}) serves `{}`; a \
                     fleet is servers of one model",
                    other.model(),
                    first.base_url(),
                    first.model()
                ),
            });
        }
        let down = Arc::new(endpoints.iter().map(|_| AtomicBool::new(false)).collect());
        Ok(Fleet { endpoints, down })
    }

    /// The servers.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The model every server serves.
    pub fn model(&self) -> &str {
        self.endpoints[0].model()
    }

    /// Requests in flight at once over every server still up.
    pub fn concurrency(&self) -> usize {
        self.live().map(|e| e.options().concurrency).sum()
    }

    /// The base URLs of the servers left out after a failure.
    pub fn down(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .zip(self.down.iter())
            .filter(|(_, d)| d.load(Ordering::Relaxed))
            .map(|(e, _)| e.base_url().to_string())
            .collect()
    }

    fn live(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .iter()
            .zip(self.down.iter())
            .filter(|(_, d)| !d.load(Ordering::Relaxed))
            .map(|(e, _)| e)
    }

    /// Runs `work(server, i)` for every item `i` in `0..n`, each server with at most its
    /// `concurrency` items at once, and calls `on_done(i, result)` on this thread as each
    /// item finishes. A failure on a server that no longer answers hands the item to another
    /// server; a failure on one that answers stops the spreading (items in flight finish and
    /// are reported) and is returned. `job.cancel` stops handing out items.
    pub fn spread<T: Send, E: Send + std::fmt::Display>(
        &self,
        n: usize,
        job: &Job,
        work: &(dyn Fn(&Endpoint, usize) -> Result<T, E> + Sync),
        on_done: &mut dyn FnMut(usize, T),
    ) -> Result<(), FleetError<E>> {
        let queue = Mutex::new(Queue {
            todo: (0..n).collect(),
            pending: n,
            stop: false,
        });
        let wake = Condvar::new();
        let failure: Mutex<Option<(usize, E)>> = Mutex::new(None);
        let last_down: Mutex<String> = Mutex::new(String::new());
        let (sender, receiver) = std::sync::mpsc::channel::<(usize, T)>();
        std::thread::scope(|scope| {
            for (s, endpoint) in self.endpoints.iter().enumerate() {
                if self.down[s].load(Ordering::Relaxed) {
                    continue;
                }
                for _ in 0..endpoint.options().concurrency.min(n.max(1)) {
                    let sender = sender.clone();
                    let (queue, wake, failure, last_down) = (&queue, &wake, &failure, &last_down);
                    scope.spawn(move || loop {
                        let Some(i) = next(queue, wake, &self.down[s], job) else {
                            return;
                        };
                        match work(endpoint, i) {
                            Ok(value) => {
                                let _ = sender.send((i, value));
                                finish(queue, wake);
                            }
                            Err(error) => {
                                let cancelled = job.cancel.is_cancelled();
                                if cancelled || !endpoint.alive() {
                                    // the server is gone (or the job stops): the item goes
                                    // back for another server
                                    if !cancelled {
                                        self.down[s].store(true, Ordering::Relaxed);
                                        *last_down.lock().expect("lock") =
                                            format!("{}: {error}", endpoint.base_url());
                                    }
                                    queue.lock().expect("lock").todo.push_front(i);
                                    wake.notify_all();
                                    return;
                                }
                                let mut first = failure.lock().expect("lock");
                                first.get_or_insert((i, error));
                                queue.lock().expect("lock").stop = true;
                                wake.notify_all();
                                return;
                            }
                        }
                    });
                }
            }
            drop(sender);
            for (i, value) in receiver {
                on_done(i, value);
            }
        });
        if let Some((index, error)) = failure.into_inner().expect("lock") {
            return Err(FleetError::Item { index, error });
        }
        if job.cancel.is_cancelled() {
            return Err(FleetError::Cancelled);
        }
        let left = queue.into_inner().expect("lock").pending;
        if left > 0 {
            return Err(FleetError::Down {
                left,
                last: last_down.into_inner().expect("lock"),
            });
        }
        Ok(())
    }
}

/// The next item for a worker of a server that is up, waiting while items are in flight
/// elsewhere (a failed server may hand them back); `None` when nothing is left to do, the
/// server is down, or the spreading stops.
fn next(queue: &Mutex<Queue>, wake: &Condvar, down: &AtomicBool, job: &Job) -> Option<usize> {
    let mut q = queue.lock().expect("lock");
    loop {
        if job.cancel.is_cancelled() {
            q.stop = true;
        }
        if q.stop || q.pending == 0 || down.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(i) = q.todo.pop_front() {
            return Some(i);
        }
        // wake now and then to see a cancellation
        q = wake
            .wait_timeout(q, std::time::Duration::from_millis(200))
            .expect("lock")
            .0;
    }
}

/// Marks one item finished.
fn finish(queue: &Mutex<Queue>, wake: &Condvar) {
    let mut q = queue.lock().expect("lock");
    q.pending -= 1;
    if q.pending == 0 {
        wake.notify_all();
    }
}

impl<E: std::fmt::Display> std::fmt::Display for FleetError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FleetError::Item { error, .. } => write!(f, "{error}"),
            FleetError::Down { left, last } => write!(
                f,
                "every server of the fleet stopped answering with {left} items left (the last \
                 failure: {last}); the finished items are kept"
            ),
            FleetError::Cancelled => write!(f, "interrupted"),
        }
    }
}
