//! Whether a waiting request's client has left: the server's socket to it seen in
//! `CLOSE_WAIT` in the kernel's table of sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Context;

/// A client's TCP connection as the kernel's table of sockets (`/proc/net/tcp`, `tcp6`)
/// shows it, so that a request waiting for its rows learns when the client has closed its
/// end (tiny_http hands out no socket to look at). Where there is no such table (not
/// Linux) no client is ever seen to leave, and a client that shuts down only its sending
/// half would be taken as gone.
pub(crate) struct Peer {
    /// The server's port.
    port: u16,
    sockets: Arc<Sockets>,
    /// The client's address as the table writes it, `None` when unknown.
    remote: Option<Vec<String>>,
    /// Whether the connection was found open once (a connection never found is never
    /// taken as gone).
    seen: bool,
}

impl Peer {
    /// How often a waiting request looks.
    pub(crate) const POLL: Duration = Duration::from_millis(500);

    /// The peer of `request` on the server of `context`.
    pub(crate) fn of(request: &tiny_http::Request, context: &Context) -> Self {
        let remote = request.remote_addr().map(|addr| {
            let port = addr.port();
            let words = |octets: &[u8]| -> String {
                (octets.chunks(4))
                    .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                    .collect()
            };
            match addr.ip().to_canonical() {
                std::net::IpAddr::V4(ip) => vec![
                    format!("{}:{port:04X}", words(&ip.octets())),
                    format!("{}:{port:04X}", words(&ip.to_ipv6_mapped().octets())),
                ],
                std::net::IpAddr::V6(ip) => vec![format!("{}:{port:04X}", words(&ip.octets()))],
            }
        });
        Peer {
            port: context.port,
            sockets: context.sockets.clone(),
            remote,
            seen: false,
        }
    }

    /// Whether the client has closed its end: the server's socket to it waits to close
    /// (`CLOSE_WAIT`), or is gone after it was seen open.
    pub(crate) fn left(&mut self) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let mut state = None;
        let text = self.sockets.read();
        for line in text
            .lines()
            .filter(|l| remote.iter().any(|r| l.contains(r)))
        {
            // sl local_address rem_address st ...
            let fields: Vec<&str> = line.split_whitespace().take(4).collect();
            let [_, local, rem, st] = fields[..] else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(self.port) && remote.iter().any(|r| r == rem) {
                state = u8::from_str_radix(st, 16).ok();
            }
        }
        const CLOSE_WAIT: u8 = 0x08;
        match state {
            Some(CLOSE_WAIT) => true,
            Some(_) => {
                self.seen = true;
                false
            }
            None => self.seen,
        }
    }
}

/// The kernel's tables of TCP sockets (`/proc/net/tcp` and `tcp6`), read at most once per
/// [`Peer::POLL`] however many requests wait: one read costs milliseconds of kernel time on a
/// machine with many sockets, too much to spend for each request.
#[derive(Default)]
pub(crate) struct Sockets(std::sync::Mutex<Option<(Instant, Arc<String>)>>);

impl Sockets {
    /// The tables' text, read again when the last read is older than [`Peer::POLL`].
    fn read(&self) -> Arc<String> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, text)) = cached.as_ref() {
            if at.elapsed() < Peer::POLL {
                return text.clone();
            }
        }
        let mut text = String::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            text += &std::fs::read_to_string(table).unwrap_or_default();
        }
        let text = Arc::new(text);
        *cached = Some((Instant::now(), text.clone()));
        text
    }
}
