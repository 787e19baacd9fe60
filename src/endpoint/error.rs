//! What can go wrong when talking to a server, each case naming the URL it is about.

/// A failed request, after its retries.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EndpointError {
    /// The endpoint could not be set up (a bad URL, a missing API key variable).
    #[error("endpoint {url}: {message}")]
    Config {
        /// The base URL as given.
        url: String,
        /// Why.
        message: String,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status} after {attempts} attempt(s): {message}")]
    Http {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's own message (its `error.message` when it sends OpenAI's shape).
        message: String,
        /// Requests made, retries included.
        attempts: usize,
    },
    /// No answer came: the connection failed or dropped, or the reply took too long.
    #[error("{url}: no reply after {attempts} attempt(s): {message}")]
    Connection {
        /// The URL requested.
        url: String,
        /// What failed, e.g. `connection refused` or `timed out after 30 s`.
        message: String,
        /// Requests made, retries included.
        attempts: usize,
    },
    /// The server answered 200 with something that is not an OpenAI reply.
    #[error("{url}: unexpected reply: {message}")]
    Response {
        /// The URL requested.
        url: String,
        /// What is wrong with the reply.
        message: String,
    },
    /// The request was not sent, or was abandoned, because the job was cancelled.
    #[error("interrupted before this request finished")]
    Cancelled,
}

impl EndpointError {
    /// The HTTP status, for errors that have one.
    pub fn status(&self) -> Option<u16> {
        match self {
            EndpointError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}
