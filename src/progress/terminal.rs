//! Progress in a terminal: an indicatif bar when standard error is a terminal, a plain line
//! every few seconds when it is a file or a pipe (CI logs, `nohup`), so logs stay readable.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{BinaryBytes, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use super::Progress;

/// How often plain lines are written when standard error is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(10);

/// Progress drawn on standard error: a bar (label, count/total, rate, ETA, message) on a
/// terminal, periodic plain lines elsewhere.
pub struct Terminal {
    mode: Mode,
    state: Mutex<State>,
}

enum Mode {
    Bar,
    Lines {
        every: Duration,
        out: Mutex<Box<dyn Write + Send>>,
    },
}

#[derive(Default)]
struct State {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    /// The units are bytes.
    bytes: bool,
    started: Option<Instant>,
    last_line: Option<Instant>,
}

impl Terminal {
    /// A bar when standard error is a terminal, lines every [`LINE_EVERY`] otherwise.
    pub fn stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Terminal::bar()
        } else {
            Terminal::lines(Box::new(std::io::stderr()), LINE_EVERY)
        }
    }

    /// An indicatif bar on standard error.
    pub fn bar() -> Self {
        Terminal {
            mode: Mode::Bar,
            state: Mutex::default(),
        }
    }

    /// Plain lines written to `out`: one when a task starts, then at most one per `every`,
    /// and one when it finishes.
    pub fn lines(out: Box<dyn Write + Send>, every: Duration) -> Self {
        Terminal {
            mode: Mode::Lines {
                every,
                out: Mutex::new(out),
            },
            state: Mutex::default(),
        }
    }

    /// Runs `f` with the bar cleared from the screen, so text printed meanwhile does not
    /// tear it; the bar is drawn again afterwards.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        let bar = self.lock().bar.clone();
        match bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_line(&self, line: &str) {
        if let Mode::Lines { out, .. } = &self.mode {
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

fn bar_style(total: u64, bytes: bool) -> ProgressStyle {
    let template = match (total > 0, bytes) {
        (true, false) => "{prefix:.bold} {wide_bar:.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}, {rate}] {msg}",
        (false, false) => "{spinner} {prefix:.bold} {pos} [{elapsed_precise}, {rate}] {msg}",
        (true, true) => "{prefix:.bold} {wide_bar:.cyan/blue} {binary_bytes}/{binary_total_bytes} [{elapsed_precise} < {eta_precise}, {binary_bytes_per_sec}] {msg}",
        (false, true) => "{spinner} {prefix:.bold} {binary_bytes} [{elapsed_precise}, {binary_bytes_per_sec}] {msg}",
    };
    ProgressStyle::with_template(template)
        .expect("the bar template is valid")
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}", rate(state.per_sec()));
            },
        )
        .progress_chars("█▉▊▋▌▍▎▏ ")
}

impl Terminal {
    fn begin(&self, label: &str, total: u64, bytes: bool) {
        let mut state = self.lock();
        if let Some(old) = state.bar.take() {
            old.abandon();
        }
        *state = State {
            label: label.to_string(),
            total,
            bytes,
            started: Some(Instant::now()),
            last_line: Some(Instant::now()),
            ..State::default()
        };
        match &self.mode {
            Mode::Bar => {
                let bar = ProgressBar::with_draw_target(
                    (total > 0).then_some(total),
                    ProgressDrawTarget::stderr(),
                );
                bar.set_style(bar_style(total, bytes));
                bar.set_prefix(label.to_string());
                if total == 0 {
                    bar.enable_steady_tick(Duration::from_millis(200));
                }
                state.bar = Some(bar);
            }
            Mode::Lines { .. } => {
                drop(state);
                let line = match total {
                    0 => format!("{label}: started"),
                    n => format!("{label}: started, {} to do", amount(n, bytes)),
                };
                self.write_line(&line);
            }
        }
    }
}

impl Progress for Terminal {
    fn start(&self, label: &str, total: u64) {
        self.begin(label, total, false)
    }

    fn start_bytes(&self, label: &str, total: u64) {
        self.begin(label, total, true)
    }

    fn update(&self, done: u64, message: &str) {
        let mut state = self.lock();
        state.done = done;
        match &self.mode {
            Mode::Bar => {
                if let Some(bar) = &state.bar {
                    bar.set_position(done);
                    bar.set_message(message.to_string());
                }
            }
            Mode::Lines { every, .. } => {
                let now = Instant::now();
                if state
                    .last_line
                    .is_some_and(|t| now.duration_since(t) < *every)
                {
                    return;
                }
                state.last_line = Some(now);
                let elapsed = state
                    .started
                    .map(|t| now.duration_since(t))
                    .unwrap_or_default();
                let line = progress_line(
                    &state.label,
                    (done, state.total, state.bytes),
                    elapsed,
                    message,
                );
                drop(state);
                self.write_line(&line);
            }
        }
    }

    fn finish(&self, message: &str) {
        let mut state = self.lock();
        match &self.mode {
            Mode::Bar => {
                if let Some(bar) = state.bar.take() {
                    bar.finish_with_message(message.to_string());
                }
            }
            Mode::Lines { .. } => {
                let elapsed = state.started.map(|t| t.elapsed()).unwrap_or_default();
                let mut line = format!(
                    "{}: finished {} in {}",
                    state.label,
                    count(state.done, state.total, state.bytes),
                    duration(elapsed)
                );
                if !message.is_empty() {
                    line.push_str(&format!(" — {message}"));
                }
                drop(state);
                self.write_line(&line);
            }
        }
    }
}

/// An amount of units: a count, or bytes as `12.3 MiB`.
fn amount(n: u64, bytes: bool) -> String {
    match bytes {
        true => BinaryBytes(n).to_string(),
        false => n.to_string(),
    }
}

fn count(done: u64, total: u64, bytes: bool) -> String {
    match total {
        0 => amount(done, bytes),
        t => format!("{}/{}", amount(done, bytes), amount(t, bytes)),
    }
}

/// One plain progress line: `judge: 120/500 (24%), 3.2/s, ETA 1m 59s — reward 0.41`, or
/// for bytes `download: 12.0 MiB/48.0 MiB (25%), 4.0 MiB/s, ETA 9.0s`. `(done, total,
/// bytes)` counts the work.
pub fn progress_line(
    label: &str,
    (done, total, bytes): (u64, u64, bool),
    elapsed: Duration,
    message: &str,
) -> String {
    let mut line = format!("{label}: {}", count(done, total, bytes));
    if let Some(percent) = (done * 100).checked_div(total) {
        line.push_str(&format!(" ({percent}%)"));
    }
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 && done > 0 {
        let per_second = done as f64 / seconds;
        match bytes {
            true => line.push_str(&format!(", {}/s", BinaryBytes(per_second as u64))),
            false => line.push_str(&format!(", {}", rate(per_second))),
        }
        if total > done {
            let left = Duration::from_secs_f64((total - done) as f64 / per_second);
            line.push_str(&format!(", ETA {}", duration(left)));
        }
    }
    if !message.is_empty() {
        line.push_str(&format!(" — {message}"));
    }
    line
}

/// A rate as `3.2/s`, or `25.0s each` below one a second.
fn rate(per_second: f64) -> String {
    if per_second >= 1.0 || per_second <= 0.0 {
        format!("{per_second:.1}/s")
    } else {
        format!("{:.1}s each", 1.0 / per_second)
    }
}

/// A duration as `1h 02m 03s`, `2m 03s` or `3.4s`.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m {:02}s", s / 3600, s % 3600 / 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bar_templates_parse_and_a_hidden_bar_follows_updates() {
        for (total, bytes) in [(0, false), (10, false), (0, true), (10, true)] {
            let _ = bar_style(total, bytes);
        }
        let bar = ProgressBar::with_draw_target(Some(10), ProgressDrawTarget::hidden());
        bar.set_style(bar_style(10, false));
        bar.set_position(4);
        bar.set_message("reward 0.5");
        assert_eq!((bar.position(), bar.message().as_ref()), (4, "reward 0.5"));
    }

    #[test]
    fn a_line_has_count_share_rate_eta_and_message() {
        let line = progress_line(
            "judge",
            (120, 500, false),
            Duration::from_secs(40),
            "reward 0.41",
        );
        assert_eq!(
            line,
            "judge: 120/500 (24%), 3.0/s, ETA 2m 06s — reward 0.41"
        );
        let slow = progress_line("grpo", (2, 100, false), Duration::from_secs(50), "");
        assert_eq!(slow, "grpo: 2/100 (2%), 25.0s each, ETA 40m 50s");
        assert_eq!(
            progress_line("download", (0, 0, false), Duration::ZERO, ""),
            "download: 0"
        );
    }

    #[test]
    fn a_download_counts_bytes() {
        let mib = 1024 * 1024;
        let line = progress_line(
            "gemma.gguf",
            (12 * mib, 48 * mib, true),
            Duration::from_secs(3),
            "",
        );
        assert_eq!(
            line,
            "gemma.gguf: 12.00 MiB/48.00 MiB (25%), 4.00 MiB/s, ETA 9.0s"
        );
        let out = Shared::default();
        let lines = Terminal::lines(Box::new(out.clone()), Duration::ZERO);
        lines.start_bytes("part 1", 3 * mib);
        lines.update(mib, "");
        lines.finish("");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.starts_with("part 1: started, 3.00 MiB to do\n"),
            "{text}"
        );
        assert!(
            text.contains("part 1: finished 1.00 MiB/3.00 MiB in"),
            "{text}"
        );
    }

    #[test]
    fn lines_are_written_at_start_and_finish_and_at_most_once_per_period() {
        let out = Shared::default();
        let every_time = Terminal::lines(Box::new(out.clone()), Duration::ZERO);
        every_time.start("evaluate", 3);
        every_time.update(1, "acc 1.000");
        every_time.update(2, "acc 0.500");
        every_time.update(3, "acc 0.667");
        every_time.finish("accuracy 0.667");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], "evaluate: started, 3 to do");
        assert!(lines[1].starts_with("evaluate: 1/3 (33%)"), "{text}");
        assert!(lines[1].ends_with("— acc 1.000"), "{text}");
        assert!(lines[4].starts_with("evaluate: finished 3/3 in "), "{text}");
        assert!(lines[4].ends_with("— accuracy 0.667"), "{text}");

        let out = Shared::default();
        let hourly = Terminal::lines(Box::new(out.clone()), Duration::from_secs(3600));
        hourly.start("judge", 100);
        for i in 1..=100 {
            hourly.update(i, "");
        }
        hourly.finish("");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "only start and finish: {text}");
    }
}
