//! One connection to the broker: opening it through any [`Connector`], the connect
//! handshake, and why it ended.

use std::future::Future;
use std::io;
use std::pin::Pin;

use rpc_core::ConnectionError;
use rpc_core::connection::{self, FrameReader, FrameSender, Io};
use rpc_core::frame::{Connect, Frame, GoAway, Publish};
use rpc_core::transport::{Connector, PeerAddr};
use tokio::io::{AsyncRead, AsyncWrite};

use super::ConnectOptions;
use crate::error::ConnectError;

/// The read half of any stream.
pub(super) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A stream already split into halves, whatever the transport: TCP halves stay
/// lock-free (each half is one boxed value; no `tokio::io::split` mutex).
pub(super) struct BoxIo {
    read: BoxRead,
    write: BoxWrite,
}

impl Io for BoxIo {
    type Read = BoxRead;
    type Write = BoxWrite;

    fn split_io(self) -> (BoxRead, BoxWrite) {
        (self.read, self.write)
    }
}

type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<(BoxIo, PeerAddr)>> + Send + 'a>>;

/// A [`Connector`] behind a pointer, so that the client is one type whatever the
/// transport. Only connecting goes through it (once per reconnect); frames do not.
pub(super) trait DynConnector: Send + Sync + 'static {
    fn connect(&self) -> Connecting<'_>;
    fn describe(&self) -> String;
}

impl<C: Connector> DynConnector for C {
    fn connect(&self) -> Connecting<'_> {
        Box::pin(async move {
            let (io, peer) = Connector::connect(self).await?;
            let (read, write) = io.split_io();
            let io = BoxIo {
                read: Box::new(read),
                write: Box::new(write),
            };
            Ok((io, peer))
        })
    }

    fn describe(&self) -> String {
        Connector::describe(self)
    }
}

/// A connection that has exchanged connect frames.
pub(super) struct Link {
    pub(super) reader: FrameReader<BoxRead>,
    pub(super) sender: FrameSender,
    /// The broker's connect frame: its limits.
    pub(super) broker: Connect,
}

/// Opens a connection and exchanges connect frames. A go-away instead of the broker's
/// connect (wrong token, too many connections) is the error. Frames sent on the link are
/// held to the frame limit the broker states.
pub(super) async fn handshake(
    connector: &dyn DynConnector,
    options: &ConnectOptions,
) -> Result<Link, ConnectError> {
    let timeout = options.connect_timeout;
    let (io, _peer) = tokio::time::timeout(timeout, connector.connect())
        .await
        .map_err(|_| ConnectError::Timeout {
            what: "connection",
            timeout,
        })??;
    let (mut reader, sender) = connection::start(io, &options.connection);
    sender
        .send(Frame::Connect(Connect {
            max_frame_len: options.connection.max_frame_len.min(u32::MAX as usize) as u32,
            max_payload: 0,
            name: options.name.clone().into(),
            token: options.token.clone().unwrap_or_default().into(),
        }))
        .await?;
    let answer = tokio::time::timeout(timeout, reader.next())
        .await
        .map_err(|_| ConnectError::Timeout {
            what: "answer to connect",
            timeout,
        })?;
    match answer {
        Some(Ok(Frame::Connect(broker))) => {
            // Held to the broker's limit less the room its delivery adds, so that a
            // publish the broker could not deliver is refused here (FrameTooLarge), not
            // by the broker, which would close the connection.
            let limit = broker.max_frame_len as usize;
            sender.limit_frame_len(limit.saturating_sub(Publish::DELIVERY_OVERHEAD));
            Ok(Link {
                reader,
                sender,
                broker,
            })
        }
        Some(Ok(Frame::GoAway(g))) => Err(ConnectError::Refused {
            code: g.code,
            message: g.message.to_string(),
        }),
        Some(Ok(other)) => Err(ConnectError::UnexpectedFrame { kind: other.kind() }),
        Some(Err(e)) => Err(e.into()),
        None => Err(ConnectError::Closed),
    }
}

/// Why a connection to the broker ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkDown {
    /// The broker sent a go-away (slow consumer, shutdown, …), then the connection ended.
    #[error("broker went away: {}", .go_away.message)]
    GoAway {
        go_away: GoAway,
        #[source]
        then: Option<ConnectionError>,
    },
    /// The connection failed.
    #[error(transparent)]
    Failed(ConnectionError),
    /// The broker closed the connection between frames, saying nothing.
    #[error("the broker closed the connection")]
    Closed,
}

impl LinkDown {
    pub(super) fn new(go_away: Option<GoAway>, error: Option<ConnectionError>) -> LinkDown {
        match (go_away, error) {
            (Some(go_away), then) => LinkDown::GoAway { go_away, then },
            (None, Some(error)) => LinkDown::Failed(error),
            (None, None) => LinkDown::Closed,
        }
    }
}

/// `error` and its sources, as one line: what a [`crate::Event::Disconnected`] says.
pub(super) fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(" ({cause_text})"));
        }
        source = cause.source();
    }
    text
}
