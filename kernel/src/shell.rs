//! The shell channel's requests, one at a time, each wrapped in busy / idle on IOPub:
//! `kernel_info`, `execute`, `complete`, `inspect`, `is_complete`, `history` and `comm_info`.
//! The script session runs on a thread of its own ([`Evaluator`]) and knows nothing of
//! Jupyter; this module passes it code and turns its answers into messages.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use jupyter_protocol::{
    CodeMirrorMode, CommInfoReply, CompleteReply, ErrorOutput, ExecuteInput, ExecuteReply,
    ExecuteRequest, ExecuteResult, ExecutionCount, ExpressionResult, HelpLink, HistoryEntry,
    HistoryReply, InspectReply, IsCompleteReply, JupyterMessage, JupyterMessageContent,
    KernelInfoReply, LanguageInfo, Media, MediaType, Payload, ReplyError, ReplyStatus, Status,
    Transient,
};
use jupyter_zmq_client::RouterSendConnection;
use rlvr::script::{shown, Completeness, Kind, ScriptError, Session};
use tokio::sync::oneshot;

use crate::display::{bundle, plain_text};
use crate::history::{Entry, History, Query, SESSION};
use crate::output::{Iopub, KernelOutput};

/// The Rhai version the kernel reports in `language_info`.
const RHAI_VERSION: &str = "1.27";

/// Whether an interrupt arrived during the current cell.
fn output_cancelled(output: &KernelOutput) -> bool {
    use rlvr::script::Output;
    output.cancel().is_cancelled()
}

/// The reply to `kernel_info_request`.
pub(crate) fn kernel_info() -> KernelInfoReply {
    KernelInfoReply {
        status: ReplyStatus::Ok,
        protocol_version: "5.3".into(),
        implementation: "rlvr".into(),
        implementation_version: env!("CARGO_PKG_VERSION").into(),
        language_info: LanguageInfo {
            name: "rhai".into(),
            version: RHAI_VERSION.into(),
            mimetype: Some("text/x-rhai".into()),
            file_extension: Some(".rhai".into()),
            pygments_lexer: Some("rust".into()),
            codemirror_mode: Some(CodeMirrorMode::Simple("rust".into())),
            nbconvert_exporter: Some("script".into()),
        },
        banner: format!(
            "rlvr {} — Rhai kernel. help(\"name\") shows a function's doc; Tab completes.",
            env!("CARGO_PKG_VERSION")
        ),
        help_links: vec![HelpLink {
            text: "The Rhai book".into(),
            url: "https://rhai.rs/book/".into(),
        }],
        debugger: false,
        error: None,
    }
}

/// A unit of work for the session's thread.
type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// The script session, on a thread of its own so that control messages (interrupts) are
/// answered while a cell runs.
pub(crate) struct Evaluator {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Evaluator {
    pub(crate) fn start(output: Arc<KernelOutput>) -> Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("rhai-session".into())
            .stack_size(64 << 20)
            .spawn(move || {
                let mut session = Session::new(output, Default::default());
                for job in queue {
                    // A panic inside a job ends that job (its caller sees an error), not
                    // the session.
                    let _ = catch_unwind(AssertUnwindSafe(|| job(&mut session)));
                }
            })
            .context("starting the script thread")?;
        Ok(Evaluator { jobs })
    }

    /// Runs `work` on the session and returns its result.
    async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Session) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |session| {
                let _ = tx.send(work(session));
            }))
            .ok()
            .context("the script thread has stopped")?;
        rx.await.context("the script thread stopped while working")
    }
}

/// The shell channel: requests one at a time, each wrapped in busy / idle on IOPub.
pub(crate) struct Shell {
    pub(crate) reply: RouterSendConnection,
    pub(crate) iopub: Iopub,
    pub(crate) output: Arc<KernelOutput>,
    pub(crate) evaluator: Evaluator,
    pub(crate) count: usize,
    pub(crate) history: History,
    /// After a failing cell, execute requests that arrived before this instant are aborted.
    pub(crate) abort_before: Option<Instant>,
}

/// What a cell's evaluation hands back to the protocol side.
struct CellResult {
    result: Result<Option<Media>, ScriptError>,
    expressions: HashMap<String, ExpressionResult>,
}

impl Shell {
    pub(crate) async fn handle(&mut self, request: JupyterMessage, arrived: Instant) -> Result<()> {
        self.iopub.publish(Status::busy(), Some(&request));
        let answered = self.answer(&request, arrived).await;
        self.iopub.publish(Status::idle(), Some(&request));
        answered
    }

    /// Sends the reply to `request` (none for comm messages), its IOPub output first.
    async fn answer(&mut self, request: &JupyterMessage, arrived: Instant) -> Result<()> {
        let mut failed_cell = false;
        let reply: Option<JupyterMessageContent> = match &request.content {
            JupyterMessageContent::KernelInfoRequest(_) => Some(kernel_info().into()),
            JupyterMessageContent::ExecuteRequest(execute) => {
                let reply = self.execute(request, execute, arrived).await?;
                failed_cell = reply.status != ReplyStatus::Ok && execute.stop_on_error;
                Some(reply.into())
            }
            JupyterMessageContent::CompleteRequest(req) => {
                let (code, cursor) = (req.code.clone(), req.cursor_pos);
                let completion = self
                    .evaluator
                    .run(move |s| s.complete(&code, cursor))
                    .await?;
                let types: Vec<serde_json::Value> = completion
                    .candidates
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "start": completion.start,
                            "end": completion.end,
                            "text": c.text,
                            "type": match c.kind {
                                Kind::Function => "function",
                                Kind::Variable => "instance",
                                Kind::Keyword => "keyword",
                            },
                        })
                    })
                    .collect();
                let mut metadata = serde_json::Map::new();
                metadata.insert("_jupyter_types_experimental".into(), types.into());
                Some(
                    CompleteReply {
                        matches: completion.candidates.into_iter().map(|c| c.text).collect(),
                        cursor_start: completion.start,
                        cursor_end: completion.end,
                        metadata,
                        status: ReplyStatus::Ok,
                        error: None,
                    }
                    .into(),
                )
            }
            JupyterMessageContent::InspectRequest(req) => {
                let (code, cursor) = (req.code.clone(), req.cursor_pos);
                let text = self
                    .evaluator
                    .run(move |s| s.inspect(&code, cursor))
                    .await?;
                Some(
                    InspectReply {
                        found: text.is_some(),
                        data: text
                            .map(|t| Media::new(vec![MediaType::Plain(t)]))
                            .unwrap_or_default(),
                        ..Default::default()
                    }
                    .into(),
                )
            }
            JupyterMessageContent::IsCompleteRequest(req) => {
                let code = req.code.clone();
                let status = self.evaluator.run(move |s| s.completeness(&code)).await?;
                Some(
                    match status {
                        Completeness::Complete => IsCompleteReply::complete(),
                        Completeness::Incomplete => IsCompleteReply::incomplete("    ".into()),
                        Completeness::Invalid => IsCompleteReply::invalid(),
                    }
                    .into(),
                )
            }
            JupyterMessageContent::HistoryRequest(req) => {
                let query = Query::of(req)?;
                let entries = self
                    .history
                    .query(&query)
                    .into_iter()
                    .map(|e| {
                        if query.output {
                            HistoryEntry::InputOutput(
                                SESSION,
                                e.count,
                                (e.input.clone(), e.output.clone()),
                            )
                        } else {
                            HistoryEntry::Input(SESSION, e.count, e.input.clone())
                        }
                    })
                    .collect();
                Some(HistoryReply::new(entries).into())
            }
            JupyterMessageContent::CommInfoRequest(_) => Some(CommInfoReply::default().into()),
            JupyterMessageContent::CommOpen(_)
            | JupyterMessageContent::CommMsg(_)
            | JupyterMessageContent::CommClose(_) => None,
            other => {
                eprintln!(
                    "rlvr kernel: shell message `{}` is not handled",
                    other.message_type()
                );
                None
            }
        };
        self.iopub.flush().await;
        if let Some(reply) = reply {
            self.reply
                .send(JupyterMessage::new(reply, Some(request)))
                .await?;
        }
        if failed_cell {
            // Cells queued behind a failing one (sent before the client saw this reply) are
            // not run, as "Run all" expects.
            self.abort_before = Some(Instant::now());
        }
        Ok(())
    }

    async fn execute(
        &mut self,
        request: &JupyterMessage,
        execute: &ExecuteRequest,
        arrived: Instant,
    ) -> Result<ExecuteReply> {
        if let Some(limit) = self.abort_before {
            if arrived < limit {
                return Ok(ExecuteReply {
                    status: ReplyStatus::Error,
                    execution_count: ExecutionCount::new(self.count),
                    error: Some(Box::new(ReplyError {
                        ename: "Aborted".into(),
                        evalue: "not run: an earlier cell failed".into(),
                        traceback: Vec::new(),
                    })),
                    ..Default::default()
                });
            }
            self.abort_before = None;
        }
        let store = execute.store_history && !execute.silent;
        if store {
            self.count += 1;
        }
        let count = self.count;
        if !execute.silent {
            self.iopub.publish(
                ExecuteInput {
                    code: execute.code.clone(),
                    execution_count: ExecutionCount::new(count),
                },
                Some(request),
            );
        }
        self.output.begin(request);
        let code = execute.code.clone();
        let expressions = execute.user_expressions.clone().unwrap_or_default();
        let source = if store {
            format!("<cell {count}>")
        } else {
            "<cell>".to_string()
        };
        let cell = self
            .evaluator
            .run(move |session| evaluate(session, &source, &code, expressions))
            .await?;
        let pages = self.output.take_pages();
        match cell.result {
            Ok(shown) => {
                let output = shown
                    .as_ref()
                    .and_then(plain_text)
                    .unwrap_or_default()
                    .to_string();
                if let (Some(data), false) = (shown, execute.silent) {
                    self.iopub.publish(
                        ExecuteResult {
                            execution_count: ExecutionCount::new(count),
                            data,
                            metadata: Default::default(),
                            transient: Some(Transient { display_id: None }),
                        },
                        Some(request),
                    );
                }
                self.remember(store, count, &execute.code, output);
                Ok(ExecuteReply {
                    status: ReplyStatus::Ok,
                    execution_count: ExecutionCount::new(count),
                    payload: pages
                        .into_iter()
                        .map(|text| Payload::Page {
                            data: Media::new(vec![MediaType::Plain(text)]),
                            start: 0,
                        })
                        .collect(),
                    user_expressions: Some(cell.expressions),
                    error: None,
                })
            }
            Err(mut err) => {
                // Long work stopped by the interrupt fails with its own error; the cell was
                // interrupted all the same.
                err.interrupted |= output_cancelled(&self.output);
                let error = error_content(&err);
                self.iopub.publish(error.clone(), Some(request));
                self.remember(store, count, &execute.code, String::new());
                Ok(ExecuteReply {
                    status: ReplyStatus::Error,
                    execution_count: ExecutionCount::new(count),
                    payload: Vec::new(),
                    user_expressions: None,
                    error: Some(Box::new(ReplyError {
                        ename: error.ename,
                        evalue: error.evalue,
                        traceback: error.traceback,
                    })),
                })
            }
        }
    }

    fn remember(&mut self, store: bool, count: usize, input: &str, output: String) {
        if store {
            self.history.push(Entry {
                count,
                input: input.to_string(),
                output,
            });
        }
    }
}

/// Runs a cell on the session: its value as a bundle, then the user expressions.
fn evaluate(
    session: &mut Session,
    source: &str,
    code: &str,
    expressions: HashMap<String, String>,
) -> CellResult {
    let result = match catch_unwind(AssertUnwindSafe(|| session.eval(source, code))) {
        Ok(result) => result.map(|value| bundle(shown(&session.described(value)))),
        Err(panic) => Err(ScriptError {
            source: source.to_string(),
            line: None,
            column: None,
            message: format!("internal error: {}", panic_text(panic.as_ref())),
            snippet: None,
            interrupted: false,
        }),
    };
    let mut results = HashMap::new();
    if result.is_ok() {
        for (name, expression) in expressions {
            let value = match session.eval("<expression>", &expression) {
                Ok(value) => ExpressionResult::Ok {
                    data: bundle(shown(&session.described(value)))
                        .unwrap_or_else(|| Media::new(vec![MediaType::Plain("()".into())])),
                    metadata: Default::default(),
                },
                Err(err) => {
                    let error = error_content(&err);
                    ExpressionResult::Error {
                        ename: error.ename,
                        evalue: error.evalue,
                        traceback: error.traceback,
                    }
                }
            };
            results.insert(name, value);
        }
    }
    CellResult {
        result,
        expressions: results,
    }
}

/// The message a panic carried.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic".to_string()
    }
}

/// A script error as Jupyter shows it: a name, the message, and the traceback (where, the
/// cell's line and a caret), its first line in red.
fn error_content(err: &ScriptError) -> ErrorOutput {
    let ename = if err.interrupted {
        "Interrupted"
    } else {
        "ScriptError"
    };
    let mut traceback: Vec<String> = err.to_string().lines().map(str::to_string).collect();
    if let Some(first) = traceback.first_mut() {
        *first = format!("\x1b[0;31m{first}\x1b[0m");
    }
    ErrorOutput {
        ename: ename.into(),
        evalue: err.message.clone(),
        traceback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_cell_line_and_message() {
        let err = ScriptError {
            source: "<cell 3>".into(),
            line: Some(2),
            column: Some(1),
            message: "Runtime error: boom".into(),
            snippet: Some("throw \"boom\";".into()),
            interrupted: false,
        };
        let content = error_content(&err);
        assert_eq!(content.ename, "ScriptError");
        assert_eq!(content.evalue, "Runtime error: boom");
        assert!(content.traceback[0].contains("<cell 3>:2:1: Runtime error: boom"));
        assert!(content.traceback[1].contains("throw \"boom\";"));
        let stopped = ScriptError {
            interrupted: true,
            ..err
        };
        assert_eq!(error_content(&stopped).ename, "Interrupted");
    }

    /// Output whose `display` fails as a bug in a library function would.
    struct Broken;

    impl rlvr::script::Output for Broken {
        fn print(&self, _text: &str) {}
        fn display(&self, _value: &rhai::Dynamic) {
            panic!("display is broken");
        }
        fn cancel(&self) -> rlvr::progress::Cancel {
            rlvr::progress::Cancel::new()
        }
    }

    #[test]
    fn a_panic_in_a_cell_is_its_error_and_the_session_goes_on() {
        let mut session = Session::new(Arc::new(Broken), Default::default());
        let cell = evaluate(
            &mut session,
            "<cell 1>",
            "let x = 41; display(x)",
            HashMap::new(),
        );
        let err = cell.result.unwrap_err();
        assert_eq!(err.message, "internal error: display is broken");
        let cell = evaluate(&mut session, "<cell 2>", "x + 1", HashMap::new());
        let media = cell.result.unwrap().unwrap();
        assert_eq!(plain_text(&media), Some("42"));
    }

    #[test]
    fn kernel_info_describes_rhai() {
        let info = kernel_info();
        assert_eq!(info.language_info.name, "rhai");
        assert_eq!(info.language_info.file_extension.as_deref(), Some(".rhai"));
        assert_eq!(info.language_info.mimetype.as_deref(), Some("text/x-rhai"));
        assert!(info.protocol_version.starts_with("5."));
    }
}
