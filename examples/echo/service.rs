//! The `Echo` service shared by `echo_server` and `echo_client` (included by both with
//! `#[path]`). Each side uses half of what the macro generates, hence `dead_code`.

#![allow(dead_code)]

/// Errors of the `Echo` service itself (not transport errors).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum EchoError {
    /// The text was empty.
    Empty,
}

/// Echoes text back.
#[courier::service]
pub(crate) trait Echo {
    /// Returns `text` unchanged.
    async fn echo(&self, text: String) -> String;
    /// Returns `text` in capitals, or `EchoError::Empty`.
    async fn shout(&self, text: String) -> Result<String, EchoError>;
}
