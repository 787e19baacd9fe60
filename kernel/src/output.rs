//! Where a running cell's output goes: the kernel's [`Output`] turns `print` and `debug` into
//! `stream` messages, `display` into `display_data`, `help` into a pager payload, and long
//! work's progress into one display updated in place; all of it leaves through [`Iopub`] in
//! the order it was produced, while the cell runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jupyter_protocol::{
    ClearOutput, DisplayData, JupyterMessage, JupyterMessageContent, Media, MediaType,
    StreamContent, Transient, UpdateDisplayData,
};
use rhai::Dynamic;
use tokio::sync::{mpsc, oneshot};

use crate::display::bundle;
use rlvr::progress::{Cancel, Progress};
use rlvr::report::notebook::escape;
use rlvr::script::{shown, Output};

/// What the IOPub publisher receives: a message to publish, or a request to say when every
/// message before it has gone out.
pub enum Outgoing {
    /// Publish this message.
    Message(Box<JupyterMessage>),
    /// Answer once everything queued before has been published.
    Flush(oneshot::Sender<()>),
}

/// Appends `next`'s text to `first` when both are text on the same stream of the same cell,
/// so that a burst of prints already queued leaves as one message; false otherwise.
pub fn absorb(first: &mut JupyterMessage, next: &JupyterMessage) -> bool {
    let same_cell = first.parent_header.as_ref().map(|h| &h.msg_id)
        == next.parent_header.as_ref().map(|h| &h.msg_id);
    match (&mut first.content, &next.content) {
        (JupyterMessageContent::StreamContent(a), JupyterMessageContent::StreamContent(b))
            if same_cell && std::mem::discriminant(&a.name) == std::mem::discriminant(&b.name) =>
        {
            a.text.push_str(&b.text);
            true
        }
        _ => false,
    }
}

/// The queue to the IOPub publisher, usable from any thread.
#[derive(Clone)]
pub struct Iopub(mpsc::UnboundedSender<Outgoing>);

impl Iopub {
    /// A queue and the receiving end the publisher drains.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Iopub(tx), rx)
    }

    /// Publishes `content`, as a child of `parent` when there is one.
    pub fn publish(
        &self,
        content: impl Into<JupyterMessageContent>,
        parent: Option<&JupyterMessage>,
    ) {
        let message = JupyterMessage::new(content.into(), parent);
        // The publisher only stops when the kernel does.
        let _ = self.0.send(Outgoing::Message(Box::new(message)));
    }

    /// Waits until everything published so far has gone out.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Outgoing::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The kernel's [`Output`]: sends what the running cell shows to the notebook.
pub struct KernelOutput {
    iopub: Iopub,
    parent: Mutex<Option<JupyterMessage>>,
    pages: Mutex<Vec<String>>,
    cancel: Cancel,
}

impl KernelOutput {
    /// Output publishing through `iopub`.
    pub fn new(iopub: Iopub) -> Self {
        KernelOutput {
            iopub,
            parent: Mutex::new(None),
            pages: Mutex::new(Vec::new()),
            cancel: Cancel::new(),
        }
    }

    /// A cell starts: its messages become children of `request`, the pager is emptied and
    /// an old interrupt is forgotten.
    pub fn begin(&self, request: &JupyterMessage) {
        *lock(&self.parent) = Some(request.clone());
        lock(&self.pages).clear();
        self.cancel.reset();
    }

    /// The text `help` paged during the cell, taken out.
    pub fn take_pages(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.pages))
    }

    fn parent(&self) -> Option<JupyterMessage> {
        lock(&self.parent).clone()
    }

    fn publish(&self, content: impl Into<JupyterMessageContent>) {
        self.iopub.publish(content, self.parent().as_ref());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Output for KernelOutput {
    fn print(&self, text: &str) {
        self.publish(StreamContent::stdout(&format!("{text}\n")));
    }

    fn debug(&self, text: &str) {
        self.publish(StreamContent::stderr(&format!("{text}\n")));
    }

    fn display(&self, value: &Dynamic) {
        if let Some(data) = bundle(shown(value)) {
            self.publish(DisplayData::new(data));
        }
    }

    fn page(&self, text: &str) {
        lock(&self.pages).push(text.to_string());
    }

    fn clear(&self, wait: bool) {
        self.publish(ClearOutput { wait });
    }

    fn progress(&self) -> Arc<dyn Progress> {
        Arc::new(ProgressDisplay {
            iopub: self.iopub.clone(),
            parent: self.parent(),
            state: Mutex::new(BarState::default()),
        })
    }

    fn cancel(&self) -> Cancel {
        self.cancel.clone()
    }
}

/// A random identifier (128 bits as hex), for sessions and display ids.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Updates closer together than this are skipped (the last one always goes out).
const UPDATE_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct BarState {
    /// The display this task's bar lives in (a new one for each task started).
    id: String,
    label: String,
    total: u64,
    started: Option<Instant>,
    last_sent: Option<Instant>,
}

/// A progress bar shown as one `display_data` per task and advanced with
/// `update_display_data` on that display's id, so each task's last state stays visible.
struct ProgressDisplay {
    iopub: Iopub,
    parent: Option<JupyterMessage>,
    state: Mutex<BarState>,
}

impl ProgressDisplay {
    fn bar(state: &BarState, done: u64, message: &str) -> Media {
        let elapsed = state.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let count = if state.total > 0 {
            format!("{done}/{}", state.total)
        } else {
            format!("{done}")
        };
        let tail = if message.is_empty() {
            format!("{count} · {elapsed:.1} s")
        } else {
            format!("{count} · {elapsed:.1} s · {message}")
        };
        let (text_bar, html_bar) =
            if let Some(filled) = (done.min(state.total) * 30).checked_div(state.total) {
                let filled = filled as usize;
                (
                    format!("[{}{}] ", "#".repeat(filled), "-".repeat(30 - filled)),
                    format!(
                        "<progress value=\"{done}\" max=\"{}\"></progress> ",
                        state.total
                    ),
                )
            } else {
                (String::new(), "<progress></progress> ".to_string())
            };
        Media::new(vec![
            MediaType::Plain(format!("{} {text_bar}{tail}", state.label)),
            MediaType::Html(format!(
                "<div>{} {html_bar}<code>{}</code></div>",
                escape(&state.label),
                escape(&tail)
            )),
        ])
    }

    fn send_update(&self, state: &mut BarState, done: u64, message: &str) {
        state.last_sent = Some(Instant::now());
        self.iopub.publish(
            UpdateDisplayData::new(Self::bar(state, done, message), &state.id),
            self.parent.as_ref(),
        );
    }
}

impl Progress for ProgressDisplay {
    fn start(&self, label: &str, total: u64) {
        let mut state = lock(&self.state);
        *state = BarState {
            id: new_id(),
            label: label.to_string(),
            total,
            started: Some(Instant::now()),
            last_sent: Some(Instant::now()),
        };
        let shown = DisplayData {
            data: Self::bar(&state, 0, ""),
            metadata: Default::default(),
            transient: Some(Transient {
                display_id: Some(state.id.clone()),
            }),
        };
        self.iopub.publish(shown, self.parent.as_ref());
    }

    fn update(&self, done: u64, message: &str) {
        let mut state = lock(&self.state);
        if state.id.is_empty() {
            return; // no task started: nothing shown to update
        }
        let due = state.last_sent.is_none_or(|t| t.elapsed() >= UPDATE_EVERY);
        if due || (state.total > 0 && done >= state.total) {
            self.send_update(&mut state, done, message);
        }
    }

    fn finish(&self, message: &str) {
        let mut state = lock(&self.state);
        if state.id.is_empty() {
            return;
        }
        let total = state.total;
        let message = if message.is_empty() { "done" } else { message };
        self.send_update(&mut state, total, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<JupyterMessage> {
        let mut out = Vec::new();
        while let Ok(Outgoing::Message(m)) = rx.try_recv() {
            out.push(*m);
        }
        out
    }

    fn request() -> JupyterMessage {
        JupyterMessage::new(jupyter_protocol::ExecuteRequest::new("1".into()), None)
    }

    #[test]
    fn print_debug_and_display_become_children_of_the_cell() {
        let (iopub, mut rx) = Iopub::new();
        let out = KernelOutput::new(iopub);
        let req = request();
        out.begin(&req);
        out.print("hello");
        out.debug("careful");
        out.display(&Dynamic::from(crate::display::tests::test_plot()));
        let msgs = drain(&mut rx);
        let types: Vec<&str> = msgs.iter().map(|m| m.message_type()).collect();
        assert_eq!(types, ["stream", "stream", "display_data"]);
        for m in &msgs {
            assert_eq!(m.parent_header.as_ref().unwrap().msg_id, req.header.msg_id);
        }
        match (&msgs[0].content, &msgs[1].content, &msgs[2].content) {
            (
                JupyterMessageContent::StreamContent(a),
                JupyterMessageContent::StreamContent(b),
                JupyterMessageContent::DisplayData(d),
            ) => {
                assert_eq!(a.text, "hello\n");
                assert!(matches!(b.name, jupyter_protocol::Stdio::Stderr));
                let mimes: Vec<&str> = d.data.content.iter().map(|m| m.mime_type()).collect();
                assert!(mimes.contains(&"image/png") && mimes.contains(&"image/svg+xml"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn queued_prints_of_one_stream_merge() {
        let (iopub, mut rx) = Iopub::new();
        let out = KernelOutput::new(iopub);
        out.begin(&request());
        out.print("a");
        out.print("b");
        out.debug("c");
        let mut msgs = drain(&mut rx);
        let (first, rest) = msgs.split_at_mut(1);
        assert!(absorb(&mut first[0], &rest[0]));
        assert!(
            !absorb(&mut first[0], &rest[1]),
            "stdout and stderr stay apart"
        );
        match &first[0].content {
            JupyterMessageContent::StreamContent(s) => assert_eq!(s.text, "a\nb\n"),
            other => panic!("{other:?}"),
        }
        out.begin(&request());
        out.print("d");
        let other_cell = drain(&mut rx).remove(0);
        assert!(!absorb(&mut first[0], &other_cell), "cells stay apart");
    }

    #[test]
    fn progress_shows_once_and_updates_in_place() {
        let (iopub, mut rx) = Iopub::new();
        let out = KernelOutput::new(iopub);
        out.begin(&request());
        let bar = out.progress();
        bar.start("judging", 4);
        bar.update(1, "");
        bar.update(4, "reward 0.5");
        bar.finish("");
        let msgs = drain(&mut rx);
        let types: Vec<&str> = msgs.iter().map(|m| m.message_type()).collect();
        // The update at 1 comes too soon after the start; the one at the total always goes.
        assert_eq!(
            types,
            ["display_data", "update_display_data", "update_display_data"]
        );
        let id = match &msgs[0].content {
            JupyterMessageContent::DisplayData(d) => d.transient.clone().unwrap().display_id,
            _ => unreachable!(),
        };
        for m in &msgs[1..] {
            match &m.content {
                JupyterMessageContent::UpdateDisplayData(u) => {
                    assert_eq!(u.transient.display_id, id);
                }
                _ => unreachable!(),
            }
        }
        match &msgs[1].content {
            JupyterMessageContent::UpdateDisplayData(u) => match &u.data.content[0] {
                MediaType::Plain(text) => {
                    assert!(text.starts_with("judging [####"), "{text}");
                    assert!(
                        text.contains("4/4") && text.contains("reward 0.5"),
                        "{text}"
                    );
                }
                other => panic!("{other:?}"),
            },
            _ => unreachable!(),
        }
    }

    #[test]
    fn each_task_gets_its_own_display() {
        let (iopub, mut rx) = Iopub::new();
        let out = KernelOutput::new(iopub);
        out.begin(&request());
        let bar = out.progress();
        bar.start("judging", 2);
        bar.finish("");
        bar.start("training", 3);
        let ids: Vec<Option<String>> = drain(&mut rx)
            .into_iter()
            .filter_map(|m| match m.content {
                JupyterMessageContent::DisplayData(d) => Some(d.transient.unwrap().display_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
    }

    #[test]
    fn begin_clears_an_old_interrupt_and_the_pager() {
        let (iopub, _rx) = Iopub::new();
        let out = KernelOutput::new(iopub);
        out.page("doc");
        out.cancel().cancel();
        out.begin(&request());
        assert!(!out.cancel().is_cancelled());
        assert!(out.take_pages().is_empty());
    }
}
