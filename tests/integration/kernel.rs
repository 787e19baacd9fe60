//! The Jupyter kernel as a client sees it: `rlvr kernel --connection-file` started as
//! Jupyter starts it, driven over ZeroMQ on 127.0.0.1 with signed messages (kernel_info,
//! cells with output and state, an error, an interrupted `loop {}`, shutdown). The full
//! conformance suite runs with Python's jupyter_client in tests/kernel/.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use jupyter_protocol::{
    ConnectionInfo, ExecuteRequest, JupyterMessage, JupyterMessageContent, KernelInfoRequest,
    MediaType, ReplyStatus, ShutdownRequest, Transport,
};
use jupyter_zmq_client::{
    create_client_control_connection, create_client_iopub_connection,
    create_client_shell_connection_with_identity, peek_ports, peer_identity_for_session,
    ClientControlConnection, ClientIoPubConnection, ClientShellConnection,
};
use tokio::time::timeout;

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

struct Client {
    kernel: Child,
    shell: ClientShellConnection,
    iopub: ClientIoPubConnection,
    control: ClientControlConnection,
    dir: std::path::PathBuf,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.kernel.kill();
        let _ = self.kernel.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start() -> Client {
    let ports = peek_ports(IpAddr::V4(Ipv4Addr::LOCALHOST), 5)
        .await
        .unwrap();
    let info = ConnectionInfo {
        ip: "127.0.0.1".into(),
        transport: Transport::TCP,
        shell_port: ports[0],
        iopub_port: ports[1],
        stdin_port: ports[2],
        control_port: ports[3],
        hb_port: ports[4],
        key: "a-secret-key-for-the-test".into(),
        signature_scheme: "hmac-sha256".into(),
        kernel_name: Some("rhai".into()),
    };
    let dir = std::env::temp_dir().join(format!(
        "rlvr-kernel-it-{}-{}",
        std::process::id(),
        ports[0]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("connection.json");
    std::fs::write(&file, serde_json::to_string(&info).unwrap()).unwrap();
    let kernel = Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .args(["kernel", "--connection-file"])
        .arg(&file)
        .stdin(Stdio::null())
        .spawn()
        .expect("the kernel starts");
    let session = "rlvr-integration-client";
    let identity = peer_identity_for_session(session).unwrap();
    let shell = create_client_shell_connection_with_identity(&info, session, identity)
        .await
        .unwrap();
    let iopub = create_client_iopub_connection(&info, "", session)
        .await
        .unwrap();
    let control = create_client_control_connection(&info, session)
        .await
        .unwrap();
    let mut client = Client {
        kernel,
        shell,
        iopub,
        control,
        dir,
    };
    // As jupyter_client's wait_for_ready: ask kernel_info until both its reply and IOPub
    // messages arrive (the IOPub subscription takes a moment to reach the kernel).
    for _ in 0..60 {
        let request: JupyterMessage = KernelInfoRequest {}.into();
        client.shell.send(request.clone()).await.unwrap();
        let reply = client.reply_to(&request).await;
        match reply.content {
            JupyterMessageContent::KernelInfoReply(info) => {
                assert_eq!(info.language_info.name, "rhai");
            }
            other => panic!("not a kernel_info_reply: {other:?}"),
        }
        if let Ok(Ok(_)) = timeout(Duration::from_millis(500), client.iopub.read()).await {
            client.drain_iopub().await;
            return client;
        }
    }
    panic!("IOPub never delivered a message");
}

impl Client {
    async fn reply_to(&mut self, request: &JupyterMessage) -> JupyterMessage {
        loop {
            let message = timeout(WAIT, self.shell.read())
                .await
                .expect("a shell reply")
                .unwrap();
            if message.parent_header.as_ref().map(|h| &h.msg_id) == Some(&request.header.msg_id) {
                return message;
            }
        }
    }

    async fn drain_iopub(&mut self) {
        while let Ok(Ok(_)) = timeout(Duration::from_millis(200), self.iopub.read()).await {}
    }

    /// The request's IOPub messages, up to its status idle.
    async fn outputs(&mut self, request: &JupyterMessage) -> Vec<JupyterMessageContent> {
        let mut out = Vec::new();
        loop {
            let message = timeout(WAIT, self.iopub.read())
                .await
                .expect("iopub messages")
                .unwrap();
            if message.parent_header.as_ref().map(|h| &h.msg_id) != Some(&request.header.msg_id) {
                continue;
            }
            if let JupyterMessageContent::Status(status) = &message.content {
                if status.execution_state.as_str() == "idle" {
                    return out;
                }
            }
            out.push(message.content);
        }
    }

    async fn execute(&mut self, code: &str) -> (JupyterMessage, Vec<JupyterMessageContent>) {
        let request: JupyterMessage = ExecuteRequest::new(code.into()).into();
        self.shell.send(request.clone()).await.unwrap();
        let reply = self.reply_to(&request).await;
        let outputs = self.outputs(&request).await;
        (reply, outputs)
    }
}

fn plain(outputs: &[JupyterMessageContent]) -> Option<String> {
    outputs.iter().find_map(|o| match o {
        JupyterMessageContent::ExecuteResult(r) => r.data.content.iter().find_map(|m| match m {
            MediaType::Plain(text) => Some(text.clone()),
            _ => None,
        }),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_runs_cells_reports_errors_stops_on_interrupt_and_shuts_down() {
    let mut client = start().await;

    let (reply, outputs) = client.execute("print(\"hi\"); let kept = 41;").await;
    match &reply.content {
        JupyterMessageContent::ExecuteReply(r) => {
            assert_eq!(r.status, ReplyStatus::Ok);
            assert_eq!(r.execution_count.0, 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(outputs
        .iter()
        .any(|o| matches!(o, JupyterMessageContent::StreamContent(s) if s.text == "hi\n")));
    let (_, outputs) = client.execute("kept + 1").await;
    assert_eq!(plain(&outputs).as_deref(), Some("42"));

    let (reply, outputs) = client.execute("let a = 1;\nthrow \"boom\";").await;
    match &reply.content {
        JupyterMessageContent::ExecuteReply(r) => {
            assert_eq!(r.status, ReplyStatus::Error);
            let error = r.error.as_ref().unwrap();
            assert!(error.evalue.contains("boom"), "{}", error.evalue);
            assert!(
                error.traceback.iter().any(|l| l.contains("<cell 3>:2")),
                "{:?}",
                error.traceback
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        outputs
            .iter()
            .filter(|o| matches!(o, JupyterMessageContent::ErrorOutput(_)))
            .count(),
        1
    );

    // Output streams while a cell runs: "started" arrives before the loop is interrupted.
    // Interrupt: the busy loop stops, the kernel and its variables stay.
    let request: JupyterMessage = ExecuteRequest::new("print(\"started\");\nloop {}".into()).into();
    client.shell.send(request.clone()).await.unwrap();
    loop {
        let message = timeout(WAIT, client.iopub.read()).await.unwrap().unwrap();
        if matches!(&message.content, JupyterMessageContent::StreamContent(s) if s.text == "started\n")
        {
            break;
        }
    }
    let interrupt: JupyterMessage = jupyter_protocol::InterruptRequest {}.into();
    client.control.send(interrupt.clone()).await.unwrap();
    let ack = timeout(WAIT, client.control.read()).await.unwrap().unwrap();
    assert!(matches!(
        ack.content,
        JupyterMessageContent::InterruptReply(_)
    ));
    let reply = client.reply_to(&request).await;
    match &reply.content {
        JupyterMessageContent::ExecuteReply(r) => {
            assert_eq!(r.status, ReplyStatus::Error);
            assert_eq!(r.error.as_ref().unwrap().ename, "Interrupted");
        }
        other => panic!("{other:?}"),
    }
    client.outputs(&request).await;
    let (_, outputs) = client.execute("kept").await;
    assert_eq!(plain(&outputs).as_deref(), Some("41"));

    let shutdown: JupyterMessage = ShutdownRequest { restart: false }.into();
    client.control.send(shutdown).await.unwrap();
    let reply = timeout(WAIT, client.control.read()).await.unwrap().unwrap();
    assert!(matches!(
        reply.content,
        JupyterMessageContent::ShutdownReply(_)
    ));
    for _ in 0..300 {
        if let Some(status) = client.kernel.try_wait().unwrap() {
            assert!(status.success());
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the kernel still runs 30 s after its shutdown_reply");
}
