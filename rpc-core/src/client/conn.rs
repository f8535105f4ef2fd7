//! One client connection: the calls pending on it and the task that reads its answers.

use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap;
use tokio::io::AsyncRead;
use tokio::sync::oneshot;

use crate::connection::{FrameReader, FrameSender};
use crate::error::{ProtocolError, RpcError};
use crate::frame::{Frame, GoAway, Response};
use crate::sync::Latch;
use crate::transport::PeerAddr;

type Reply = oneshot::Sender<Result<Response, RpcError>>;

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) sender: FrameSender,
    pub(super) peer: PeerAddr,
    pending: Mutex<Pending>,
    /// Set when this connection takes no new calls: it closed, or the server is draining
    /// it. Every call reads it.
    retired: Latch,
}

#[derive(Debug, Default)]
struct Pending {
    /// By call id. The ids are this client's own sequence, not a peer's choice, so a
    /// fast unkeyed hash (FxHash) is safe here (SipHash showed in the client's profile).
    calls: FxHashMap<u64, Reply>,
    /// Set once the connection closed; no call can register after that.
    closed: Option<Arc<str>>,
}

impl Conn {
    pub(super) fn new(sender: FrameSender, peer: PeerAddr) -> Self {
        Conn {
            sender,
            peer,
            pending: Mutex::default(),
            retired: Latch::new(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Inserts and removes only: a panic elsewhere cannot leave the map half-updated.
        crate::sync::lock(&self.pending)
    }

    /// Registers call `id`; its answer (or the connection's failure) arrives on the receiver.
    pub(super) fn register(
        &self,
        id: u64,
    ) -> Result<oneshot::Receiver<Result<Response, RpcError>>, RpcError> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending();
        if let Some(reason) = &pending.closed {
            return Err(RpcError::ConnectionClosed {
                reason: reason.clone(),
            });
        }
        pending.calls.insert(id, tx);
        Ok(rx)
    }

    /// Forgets call `id`; true when it was still waiting for its answer.
    pub(super) fn unregister(&self, id: u64) -> bool {
        self.pending().calls.remove(&id).is_some()
    }

    /// Why the connection closed, once it has.
    pub(super) fn close_reason(&self) -> Option<Arc<str>> {
        self.pending().closed.clone()
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.is_set()
    }

    pub(super) async fn retired(&self) {
        self.retired.wait().await;
    }

    /// Fails every pending call with `reason` at once and refuses new ones.
    pub(super) fn fail_all(&self, reason: Arc<str>) {
        let calls = {
            let mut pending = self.pending();
            pending.closed.get_or_insert(reason.clone());
            std::mem::take(&mut pending.calls)
        };
        self.retired.set();
        for (_, reply) in calls {
            let _ = reply.send(Err(RpcError::ConnectionClosed {
                reason: reason.clone(),
            }));
        }
    }

    /// Reads answers until the connection ends, then fails what is still pending.
    pub(super) async fn read_loop<R: AsyncRead + Unpin>(
        self: Arc<Self>,
        mut reader: FrameReader<R>,
    ) {
        let mut going_away: Option<RpcError> = None;
        let error = loop {
            match reader.next().await {
                Some(Ok(Frame::Response(response))) => {
                    // Unknown ids are answers to calls that timed out or were dropped.
                    let reply = self.pending().calls.remove(&response.id);
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(response));
                    }
                }
                Some(Ok(Frame::GoAway(g))) => {
                    tracing::info!(peer = %self.peer, code = g.code, message = %g.message, "server is going away");
                    if g.code == GoAway::SHUTDOWN {
                        // Calls in flight will still be answered; new calls go elsewhere.
                        self.retired.set();
                    }
                    going_away = Some(RpcError::GoAway {
                        code: g.code,
                        message: g.message.to_string(),
                    });
                }
                Some(Ok(other)) => {
                    break reader
                        .protocol_violation(ProtocolError::UnexpectedFrame {
                            kind: other.kind(),
                            context: "an RPC client accepts only response and go-away frames",
                        })
                        .into();
                }
                Some(Err(e)) => break e.into(),
                None => {
                    break RpcError::ConnectionClosed {
                        reason: "server closed the connection".into(),
                    };
                }
            }
        };
        // A go-away explains the close better than the end of stream that follows it.
        let reason: Arc<str> = match going_away {
            Some(g) if matches!(error, RpcError::ConnectionClosed { .. }) => g.to_string().into(),
            _ => match &error {
                RpcError::ConnectionClosed { reason } => reason.clone(),
                other => other.to_string().into(),
            },
        };
        tracing::info!(peer = %self.peer, %reason, "disconnected");
        self.fail_all(reason);
        self.sender.close();
    }
}
