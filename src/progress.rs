//! How long work (judging, training, evaluation, downloads) reports progress and learns that
//! it should stop, without knowing who is watching: the CLI draws a terminal bar, the
//! Jupyter kernel updates a display in place, tests stay silent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Receives progress from long work. Implementations must be cheap to call often.
pub trait Progress: Send + Sync {
    /// A task named `label` of `total` units starts (0 when the total is unknown).
    fn start(&self, label: &str, total: u64);
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

/// Progress drawn on standard error for the command line: a bar (bytes, or counts of
/// items) while a task runs, then its summary line. Where standard error is not a terminal
/// (logs, CI) it writes one line when a task starts and one when it ends.
pub struct TerminalProgress {
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
    bytes: bool,
    terminal: bool,
}

impl TerminalProgress {
    /// Progress in bytes (downloads).
    pub fn bytes() -> Self {
        Self::new(true)
    }

    /// Progress in items (questions, steps).
    pub fn counts() -> Self {
        Self::new(false)
    }

    fn new(bytes: bool) -> Self {
        use std::io::IsTerminal;
        TerminalProgress {
            bar: std::sync::Mutex::new(None),
            bytes,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<indicatif::ProgressBar>> {
        self.bar.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Progress for TerminalProgress {
    fn start(&self, label: &str, total: u64) {
        use indicatif::{DecimalBytes, ProgressBar, ProgressStyle};
        if !self.terminal {
            match (total, self.bytes) {
                (0, _) => eprintln!("{label} …"),
                (n, true) => eprintln!("{label} ({}) …", DecimalBytes(n)),
                (n, false) => eprintln!("{label} ({n}) …"),
            }
            return;
        }
        let template = match (total, self.bytes) {
            (0, true) => "{spinner} {prefix} {decimal_bytes} {decimal_bytes_per_sec}",
            (0, false) => "{spinner} {prefix} {pos} {msg}",
            (_, true) => "{prefix} [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}",
            (_, false) => "{prefix} [{wide_bar}] {pos}/{len} {msg} eta {eta}",
        };
        let bar = if total == 0 {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::new(total)
        };
        let style = ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        if let Some(old) = self.current().replace(bar) {
            old.finish_and_clear();
        }
    }

    fn update(&self, done: u64, message: &str) {
        if let Some(bar) = self.current().as_ref() {
            bar.set_position(done);
            if !message.is_empty() {
                bar.set_message(message.to_string());
            }
        }
    }

    fn finish(&self, message: &str) {
        if let Some(bar) = self.current().take() {
            bar.finish_and_clear();
        }
        if !message.is_empty() {
            eprintln!("{message}");
        }
    }
}
