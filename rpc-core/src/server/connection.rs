//! One server connection: reads requests, runs each as a task, writes the answers.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{CallContext, ServerConfig, ServiceError, Shared};
use crate::connection::{self, FrameReader, FrameSender, Io, TrySendError};
use crate::error::{ProtocolError, RpcError};
use crate::frame::{Frame, GoAway, Request, Response, Status};
use crate::transport::PeerAddr;

/// Handlers running on this connection, by request id, so that a cancel can abort one.
type Calls = Arc<Mutex<HashMap<u64, AbortHandle>>>;

fn lock(calls: &Calls) -> std::sync::MutexGuard<'_, HashMap<u64, AbortHandle>> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts
    // and removes), so a poisoned lock is still good to use.
    calls.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Answers a connection over the limit with a go-away naming the limit, then closes it.
pub(super) async fn refuse<T: Io>(io: T, peer: PeerAddr, config: ServerConfig) {
    let limit = config.max_connections;
    tracing::warn!(%peer, limit, "refusing connection: at max_connections");
    let (_reader, sender) = connection::start(io, &config.connection);
    let message =
        format!("server is at its connection limit of {limit} (ServerConfig::max_connections)");
    let error = RpcError::GoAway {
        code: GoAway::TOO_MANY_CONNECTIONS,
        message: message.clone(),
    };
    sender.close_with(GoAway::new(GoAway::TOO_MANY_CONNECTIONS, message), &error);
    sender.closed().await;
}

/// Serves one connection until it closes. `drain` starts a graceful shutdown of it;
/// `abort` ends the grace period.
pub(super) async fn serve<T: Io>(
    io: T,
    peer: PeerAddr,
    server: Arc<Shared>,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let config = &server.config;
    let (mut reader, sender) = connection::start(io, &config.connection);
    let conn = Conn {
        server: server.clone(),
        sender,
        peer: Arc::new(peer),
        calls: Calls::default(),
        slots: Arc::new(Semaphore::new(config.max_calls_in_flight.max(1))),
        tasks: TaskTracker::new(),
    };
    tracing::info!(peer = %conn.peer, "connection opened");

    // Serving: read, run, answer, until the peer leaves or the server drains. The drain
    // future is pinned once: a fresh `cancelled()` per frame would register a waiter each time.
    let draining = drain.cancelled();
    tokio::pin!(draining);
    let ended = loop {
        let frame = tokio::select! {
            biased;
            _ = &mut draining => break None,
            frame = reader.next() => frame,
        };
        match frame {
            Some(Ok(Frame::Request(request))) => {
                // Backpressure: at the in-flight limit, stop reading until a call ends.
                let slot = tokio::select! {
                    biased;
                    _ = &mut draining => {
                        conn.refuse_shutting_down(request.id).await;
                        break None;
                    }
                    slot = conn.slots.clone().acquire_owned() => slot,
                };
                let Ok(slot) = slot else { break None }; // never closed
                if let Err(e) = conn.start_call(request, slot) {
                    break Some(reader.protocol_violation(e));
                }
            }
            Some(Ok(frame)) => {
                if let Err(e) = conn.on_other_frame(frame) {
                    break Some(reader.protocol_violation(e));
                }
            }
            Some(Err(e)) => break Some(e),
            None => {
                break Some(RpcError::ConnectionClosed {
                    reason: "peer closed the connection".into(),
                });
            }
        }
    };

    match ended {
        Some(reason) => {
            // The peer is gone or broke the protocol: nobody will read the answers.
            tracing::info!(peer = %conn.peer, %reason, "connection closed");
            conn.abort_all();
        }
        None => {
            conn.drain(&mut reader, &abort).await;
            tracing::info!(peer = %conn.peer, "connection closed after shutdown");
        }
    }
    conn.tasks.close();
    conn.tasks.wait().await;
    conn.sender.close();
    conn.sender.closed().await;
}

struct Conn {
    server: Arc<Shared>,
    sender: FrameSender,
    peer: Arc<PeerAddr>,
    calls: Calls,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Conn {
    fn start_call(
        &self,
        request: Request,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), ProtocolError> {
        let Request {
            id,
            timeout,
            method,
            metadata,
            payload,
        } = request;
        let span = tracing::info_span!("call", method = %method, id, peer = %self.peer);
        let deadline = timeout.map(|t| Instant::now() + t);
        let name = method.clone(); // shares the frame's buffer; no copy
        let ctx = CallContext {
            request_id: id,
            method,
            deadline,
            metadata,
            peer: self.peer.clone(),
        };
        let sender = self.sender.clone();
        let calls = self.calls.clone();
        let future = match self.server.route(name.as_str()) {
            Ok((service, name)) => service.call(name, ctx, payload),
            Err(e) => e.into_future(),
        };

        if lock(&self.calls).contains_key(&id) {
            return Err(ProtocolError::DuplicateRequestId { id });
        }
        // One poll here first: a handler that finishes without waiting (no I/O, no lock
        // held elsewhere) is answered from the read loop, with no task, no timer and no
        // entry in the map of running calls. One that waits becomes a task, which polls
        // it again with its own waker.
        let mut future = AssertUnwindSafe(future).catch_unwind();
        let first = {
            let _entered = span.enter();
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::pin::Pin::new(&mut future).poll(&mut cx)
        };
        if let std::task::Poll::Ready(outcome) = first {
            drop(slot);
            respond_now(self, id, finish(outcome));
            return Ok(());
        }

        // Held while spawning so that a call finishing at once cannot remove its entry
        // before it was inserted.
        let mut running = lock(&self.calls);
        let task = self.tasks.spawn(
            async move {
                let outcome = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, future)
                        .await
                        .unwrap_or_else(|_| {
                            Ok(Err(ServiceError::new(
                                Status::DEADLINE_EXCEEDED,
                                "deadline passed before the handler finished; handler aborted",
                            )))
                        }),
                    None => future.await,
                };
                let result = finish(outcome);
                lock(&calls).remove(&id);
                drop(slot);
                respond(&sender, id, result).await;
            }
            .instrument(span),
        );
        running.insert(id, task.abort_handle());
        Ok(())
    }

    fn on_other_frame(&self, frame: Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Cancel { id } => {
                // Unknown ids are normal: the call may have finished as the cancel flew.
                let handle = lock(&self.calls).remove(&id);
                if let Some(handle) = handle {
                    tracing::debug!(id, peer = %self.peer, "call cancelled by the client");
                    handle.abort();
                }
                Ok(())
            }
            Frame::GoAway(g) => {
                tracing::debug!(peer = %self.peer, code = g.code, message = %g.message, "client going away");
                Ok(())
            }
            other => Err(ProtocolError::UnexpectedFrame {
                kind: other.kind(),
                context: "an RPC server accepts only request, cancel and go-away frames",
            }),
        }
    }

    async fn refuse_shutting_down(&self, id: u64) {
        let error = ServiceError::new(
            Status::SHUTTING_DOWN,
            "server is shutting down; call not started",
        );
        respond(&self.sender, id, Err(error)).await;
    }

    /// Graceful end: tell the client, keep answering cancels (and refusing new calls)
    /// while calls in flight finish, abort them when the grace period ends.
    async fn drain<R: tokio::io::AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        abort: &CancellationToken,
    ) {
        let _ = self
            .sender
            .send(Frame::GoAway(GoAway::new(
                GoAway::SHUTDOWN,
                "server is shutting down",
            )))
            .await;
        self.tasks.close();
        loop {
            tokio::select! {
                _ = self.tasks.wait() => return,
                _ = abort.cancelled() => break,
                frame = reader.next() => match frame {
                    Some(Ok(Frame::Request(r))) => self.refuse_shutting_down(r.id).await,
                    Some(Ok(frame)) => {
                        if let Err(e) = self.on_other_frame(frame) {
                            reader.protocol_violation(e);
                            break;
                        }
                    }
                    Some(Err(_)) | None => break,
                },
            }
        }
        self.abort_all();
    }

    fn abort_all(&self) {
        let handles: Vec<_> = lock(&self.calls).drain().map(|(_, h)| h).collect();
        for handle in handles {
            handle.abort();
        }
    }
}

async fn respond(sender: &FrameSender, id: u64, result: Result<Bytes, ServiceError>) {
    match sender.send(response(id, result)).await {
        Ok(()) => {}
        Err(e) => answer_not_sent(sender, id, e).await,
    }
}

/// Queues an answer without waiting when there is room (the common case); otherwise a
/// task of the connection sends it.
fn respond_now(conn: &Conn, id: u64, result: Result<Bytes, ServiceError>) {
    match conn.sender.try_send(response(id, result)) {
        Ok(()) => {}
        Err(TrySendError::Full(frame)) => {
            let sender = conn.sender.clone();
            conn.tasks.spawn(async move {
                if let Err(e) = sender.send(frame).await {
                    answer_not_sent(&sender, id, e).await;
                }
            });
        }
        Err(TrySendError::Failed(e)) => {
            let sender = conn.sender.clone();
            conn.tasks
                .spawn(async move { answer_not_sent(&sender, id, e).await });
        }
    }
}

/// A handler's outcome as the answer to send: a panic becomes `INTERNAL`.
fn finish(
    outcome: Result<Result<Bytes, ServiceError>, Box<dyn std::any::Any + Send>>,
) -> Result<Bytes, ServiceError> {
    let result = outcome.unwrap_or_else(|_| {
        tracing::error!("handler panicked");
        Err(ServiceError::internal("handler panicked"))
    });
    if let Err(e) = &result {
        tracing::debug!(status = %e.status, message = %e.message, "call failed");
    }
    result
}

fn response(id: u64, result: Result<Bytes, ServiceError>) -> Frame {
    Frame::Response(match result {
        Ok(payload) => Response {
            id,
            status: Status::OK,
            message: Default::default(),
            payload,
        },
        Err(e) => Response {
            id,
            status: e.status,
            message: e.message.into(),
            payload: Bytes::new(),
        },
    })
}

/// An answer could not be queued: one too large is replaced by an error answer saying
/// so; on a closed connection there is nobody to tell.
async fn answer_not_sent(sender: &FrameSender, id: u64, error: RpcError) {
    match error {
        RpcError::FrameTooLarge { size, limit } => {
            let message = format!(
                "response of {size} bytes exceeds the maximum frame length of {limit} bytes (ConnectionConfig::max_frame_len)"
            );
            tracing::warn!(id, %message, "answer too large");
            let error = Response {
                id,
                status: Status::FRAME_TOO_LARGE,
                message: message.into(),
                payload: Bytes::new(),
            };
            let _ = sender.send(Frame::Response(error)).await;
        }
        // The connection is gone; the caller learns that from its own side.
        e => tracing::debug!(id, error = %e, "answer not sent"),
    }
}
