//! The Jupyter messaging protocol (5.3) over ZeroMQ: the five sockets of the connection file,
//! HMAC-SHA256 signatures (a wrongly signed message on shell, control or stdin is dropped
//! unread), and the requests of the shell and control channels (stdin's are dropped too:
//! nothing asks for input). The script session runs on a thread of its own and
//! knows nothing of Jupyter; this module only passes it code and turns its answers into
//! messages.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use jupyter_protocol::{
    CodeMirrorMode, CommInfoReply, CompleteReply, ConnectionInfo, ErrorOutput, ExecuteInput,
    ExecuteReply, ExecuteRequest, ExecuteResult, ExecutionCount, ExpressionResult, Header,
    HelpLink, HistoryEntry, HistoryReply, InspectReply, InterruptReply, IsCompleteReply,
    JupyterMessage, JupyterMessageContent, KernelInfoReply, LanguageInfo, Media, MediaType,
    Payload, ReplyError, ReplyStatus, ShutdownReply, Status, Transient,
};
use jupyter_zmq_client::{
    create_kernel_control_connection, create_kernel_heartbeat_connection,
    create_kernel_iopub_connection, create_kernel_shell_connection, create_kernel_stdin_connection,
    Connection, KernelControlConnection, KernelIoPubConnection, KernelStdinConnection, RawMessage,
    RouterRecvConnection, RouterSendConnection, RuntimeError,
};
use tokio::sync::{mpsc, oneshot};
use zeromq::{SocketRecv, ZmqMessage};

use crate::display::{bundle, plain_text};
use crate::history::{complete, Entry, History, Query, SESSION};
use crate::output::{absorb, new_id, Iopub, KernelOutput, Outgoing};
use rlvr::script::{shown, Completeness, Kind, ScriptError, Session};

/// The Rhai version the kernel reports in `language_info`.
const RHAI_VERSION: &str = "1.27";

/// Runs the kernel for `info` until a `shutdown_request`.
pub async fn serve(info: ConnectionInfo) -> Result<()> {
    if info.signature_scheme != "hmac-sha256" {
        bail!(
            "signature scheme `{}` is not supported (only hmac-sha256)",
            info.signature_scheme
        );
    }
    let session_id = new_id();
    let shell = create_kernel_shell_connection(&info, &session_id)
        .await
        .with_context(|| format!("binding the shell socket {}", info.shell_url()))?;
    let control = create_kernel_control_connection(&info, &session_id)
        .await
        .with_context(|| format!("binding the control socket {}", info.control_url()))?;
    let iopub_socket = create_kernel_iopub_connection(&info, &session_id)
        .await
        .with_context(|| format!("binding the iopub socket {}", info.iopub_url()))?;
    let stdin = create_kernel_stdin_connection(&info, &session_id)
        .await
        .with_context(|| format!("binding the stdin socket {}", info.stdin_url()))?;
    let mut heartbeat = create_kernel_heartbeat_connection(&info)
        .await
        .with_context(|| format!("binding the heartbeat socket {}", info.hb_url()))?;

    tokio::spawn(async move { while heartbeat.single_heartbeat().await.is_ok() {} });
    if info.key.is_empty() {
        eprintln!("rlvr kernel: the connection file has no key: messages are not signed");
    }
    tokio::spawn(drop_stdin(stdin));
    let (iopub, outgoing) = Iopub::new();
    tokio::spawn(send_iopub(iopub_socket, outgoing));

    let output = Arc::new(KernelOutput::new(iopub.clone()));
    let evaluator = Evaluator::start(output.clone())?;

    let (shell_send, shell_recv) = shell.split();
    let (requests, mut queue) = mpsc::unbounded_channel();
    tokio::spawn(read_shell(shell_recv, requests));
    let mut shell = Shell {
        reply: shell_send,
        iopub: iopub.clone(),
        output: output.clone(),
        evaluator,
        count: 0,
        history: History::default(),
        abort_before: None,
    };
    tokio::spawn(async move {
        while let Some((request, arrived)) = queue.recv().await {
            if let Err(err) = shell.handle(request, arrived).await {
                eprintln!("rlvr kernel: shell: {err}");
            }
        }
    });

    answer_control(control, &output, &iopub).await
}

/// Reads and drops whatever arrives on stdin: nothing asks for input.
async fn drop_stdin(mut stdin: KernelStdinConnection) {
    loop {
        let parts = match stdin.socket.recv().await {
            Ok(parts) => parts,
            Err(err) => {
                eprintln!("rlvr kernel: stdin: {err}");
                break;
            }
        };
        match signed_message(parts, &stdin) {
            Ok(message) => eprintln!(
                "rlvr kernel: dropped a stdin message `{}`: no input was asked for",
                message.header.msg_type
            ),
            Err(err) => eprintln!("rlvr kernel: dropped a stdin message: {err}"),
        }
    }
}

/// Sends the queued iopub messages on `socket`, in order, until every sender is gone.
async fn send_iopub(
    mut socket: KernelIoPubConnection,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut next: Option<Outgoing> = None;
    loop {
        let item = match next.take() {
            Some(item) => item,
            None => match outgoing.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        match item {
            Outgoing::Message(mut message) => {
                // Prints queued faster than the socket sends them leave as one message.
                while let Ok(queued) = outgoing.try_recv() {
                    match queued {
                        Outgoing::Message(m) if absorb(&mut message, &m) => {}
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                if let Err(err) = socket.send(*message).await {
                    eprintln!("rlvr kernel: iopub: {err}");
                }
            }
            Outgoing::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Passes the shell requests, signature checked, to `requests` with the instant each
/// arrived.
async fn read_shell(
    mut shell_recv: RouterRecvConnection,
    requests: mpsc::UnboundedSender<(JupyterMessage, Instant)>,
) {
    loop {
        let parts = match shell_recv.socket.recv().await {
            Ok(parts) => parts,
            Err(err) => {
                eprintln!("rlvr kernel: shell: {err}");
                break;
            }
        };
        match signed_message(parts, &shell_recv) {
            Ok(message) => {
                if requests.send((message, Instant::now())).is_err() {
                    break;
                }
            }
            Err(err) => eprintln!("rlvr kernel: dropped a shell message: {err}"),
        }
    }
}

/// Answers the control channel (interrupt, shutdown, kernel info) until a shutdown.
async fn answer_control(
    mut control: KernelControlConnection,
    output: &KernelOutput,
    iopub: &Iopub,
) -> Result<()> {
    loop {
        let parts = control
            .socket
            .recv()
            .await
            .context("reading the control socket")?;
        let request = match signed_message(parts, &control) {
            Ok(message) => message,
            Err(err) => {
                eprintln!("rlvr kernel: dropped a control message: {err}");
                continue;
            }
        };
        match &request.content {
            JupyterMessageContent::InterruptRequest(_) => {
                output_cancel(output);
                control
                    .send(InterruptReply::new().as_child_of(&request))
                    .await?;
            }
            JupyterMessageContent::ShutdownRequest(req) => {
                let reply = ShutdownReply {
                    restart: req.restart,
                    status: ReplyStatus::Ok,
                    error: None,
                };
                iopub.publish(reply.clone(), Some(&request));
                iopub.flush().await;
                control.send(reply.as_child_of(&request)).await?;
                // ZeroMQ sockets write their queues in the background and have no flush: give
                // the reply a moment to leave before the process ends.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                return Ok(());
            }
            JupyterMessageContent::KernelInfoRequest(_) => {
                control.send(kernel_info().as_child_of(&request)).await?;
            }
            _ => eprintln!(
                "rlvr kernel: control message `{}` is not handled",
                request.message_type()
            ),
        }
    }
}

/// The message in `parts`, read off `socket` (shell, control or stdin) once its
/// HMAC-SHA256 signature is verified with the connection file's key (in constant time, by
/// `ring`): a message wrongly signed, unsigned or malformed is an error and is not read
/// further. Read as jupyter-zmq-client reads one, except that a `history_request` may
/// leave out what IPython lets a client leave out ([`complete`]).
fn signed_message<S>(parts: ZmqMessage, socket: &Connection<S>) -> Result<JupyterMessage> {
    let raw = RawMessage::from_multipart(parts, &socket.mac).map_err(|err| match err {
        RuntimeError::VerifyError(_) => anyhow!("its signature does not match the key"),
        RuntimeError::DecodeError(_) => anyhow!("its signature is not hexadecimal"),
        other => anyhow!("{other}"),
    })?;
    if raw.jparts.len() < 4 {
        bail!("a message of {} parts", raw.jparts.len());
    }
    let header: Header = serde_json::from_slice(&raw.jparts[0])?;
    let mut content: serde_json::Value = serde_json::from_slice(&raw.jparts[3])?;
    if header.msg_type == "history_request" {
        complete(&mut content);
    }
    let content = JupyterMessageContent::from_type_and_content(&header.msg_type, content)
        .with_context(|| format!("reading a `{}`", header.msg_type))?;
    Ok(JupyterMessage {
        zmq_identities: raw.zmq_identities,
        header,
        parent_header: serde_json::from_slice(&raw.jparts[1]).ok(),
        metadata: serde_json::from_slice(&raw.jparts[2])?,
        content,
        buffers: raw.jparts[4..].to_vec(),
        channel: None,
    })
}

fn output_cancel(output: &KernelOutput) {
    use rlvr::script::Output;
    output.cancel().cancel();
}

/// Whether an interrupt arrived during the current cell.
fn output_cancelled(output: &KernelOutput) -> bool {
    use rlvr::script::Output;
    output.cancel().is_cancelled()
}

/// The reply to `kernel_info_request`.
fn kernel_info() -> KernelInfoReply {
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
struct Evaluator {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Evaluator {
    fn start(output: Arc<KernelOutput>) -> Result<Self> {
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
struct Shell {
    reply: RouterSendConnection,
    iopub: Iopub,
    output: Arc<KernelOutput>,
    evaluator: Evaluator,
    count: usize,
    history: History,
    /// After a failing cell, execute requests that arrived before this instant are aborted.
    abort_before: Option<Instant>,
}

/// What a cell's evaluation hands back to the protocol side.
struct CellResult {
    result: Result<Option<Media>, ScriptError>,
    expressions: HashMap<String, ExpressionResult>,
}

impl Shell {
    async fn handle(&mut self, request: JupyterMessage, arrived: Instant) -> Result<()> {
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
