//! The Jupyter messaging protocol (5.3) over ZeroMQ: the five sockets of the connection file,
//! HMAC-SHA256 signatures (a wrongly signed message on shell, control or stdin is dropped
//! unread), the shell requests handed in order to [`crate::shell`], and the control
//! channel's requests (`interrupt_request`, `shutdown_request`, `kernel_info_request`),
//! answered while a cell runs (stdin's are dropped: nothing asks for input).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use jupyter_protocol::{
    ConnectionInfo, Header, InterruptReply, JupyterMessage, JupyterMessageContent, ReplyStatus,
    ShutdownReply,
};
use jupyter_zmq_client::{
    create_kernel_control_connection, create_kernel_heartbeat_connection,
    create_kernel_iopub_connection, create_kernel_shell_connection, create_kernel_stdin_connection,
    Connection, KernelControlConnection, KernelIoPubConnection, KernelStdinConnection, RawMessage,
    RouterRecvConnection, RuntimeError,
};
use tokio::sync::mpsc;
use zeromq::{SocketRecv, ZmqMessage};

use crate::history::{complete, History};
use crate::output::{absorb, new_id, Iopub, KernelOutput, Outgoing};
use crate::shell::{kernel_info, Evaluator, Shell};

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
