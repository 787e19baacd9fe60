//! How long work (judging, training, evaluation, downloads) reports progress and learns that
//! it should stop, without knowing who is watching: the CLI draws a terminal bar, the
//! Jupyter kernel updates a display in place, tests stay silent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub mod terminal;

pub use terminal::Terminal;

/// Receives progress from long work. Implementations must be cheap to call often.
pub trait Progress: Send + Sync {
    /// A task named `label` of `total` units starts (0 when the total is unknown).
    fn start(&self, label: &str, total: u64);
    /// A task counted in bytes (a download) starts; where units are told apart it shows as
    /// `12.3 MiB/241.5 MiB` and `4.1 MiB/s`, elsewhere as [`Progress::start`].
    fn start_bytes(&self, label: &str, total: u64) {
        self.start(label, total)
    }
    /// `done` units of the current task are finished; `message` is a short status such as
    /// the mean reward.
    fn update(&self, done: u64, message: &str);
    /// The current task ended; `message` sums it up.
    fn finish(&self, message: &str);
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _label: &str, _total: u64) {}
    fn update(&self, _done: u64, _message: &str) {}
    fn finish(&self, _message: &str) {}
}

/// A shared flag asking long work to stop at its next checkpoint (between batches): set by
/// Ctrl-C in the terminal and by an interrupt in Jupyter. Work that stops keeps what it has
/// done.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Asks the work to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether stopping was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Resolves once stopping is asked for (it looks every 50 ms): raced against a network
    /// wait, it ends the wait within that.
    #[cfg(feature = "http")]
    pub async fn cancelled(&self) {
        while !self.is_cancelled() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Clears the flag, before the next piece of work starts.
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What an engine needs from its caller to run long work: where to report and when to stop.
#[derive(Clone)]
pub struct Job {
    /// Where progress goes.
    pub progress: Arc<dyn Progress>,
    /// Checked between batches.
    pub cancel: Cancel,
}

impl Job {
    /// A job that reports nothing and is never cancelled (tests, library use).
    pub fn silent() -> Self {
        Job {
            progress: Arc::new(Silent),
            cancel: Cancel::new(),
        }
    }

    /// Fails with [`Cancelled`] when stopping was asked for.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.cancel.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

/// The work stopped because it was asked to; what it finished is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted; the work done so far is kept and a rerun resumes it")]
pub struct Cancelled;
