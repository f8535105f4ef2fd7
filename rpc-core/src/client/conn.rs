//! One client connection: the calls pending on it, the task that reads their answers,
//! and the task that ends the calls whose deadline passed.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use rustc_hash::FxHashMap;
use tokio::io::AsyncRead;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::connection::{FrameReader, FrameSender};
use crate::error::{ConnectionError, ProtocolError, RpcError};
use crate::frame::{Frame, GoAway, Response, Status};
use crate::sync::{CacheLine, Latch};
use crate::transport::PeerAddr;

/// How a pending call ends, as its caller learns it. Small (40 bytes): the read loop
/// writes it on one thread and the caller reads it on another, often the other core.
#[derive(Debug)]
pub(super) enum Answer {
    /// The server answered `OK` with this payload.
    Ok(Bytes),
    /// The server answered otherwise.
    Response(Box<Response>),
    /// The connection failed or closed first.
    Failed(Box<RpcError>),
    /// The call's deadline passed first (the server was sent a cancel).
    TimedOut,
}

impl Answer {
    fn of(response: Response) -> Answer {
        if response.status == Status::OK {
            Answer::Ok(response.payload)
        } else {
            Answer::Response(Box::new(response))
        }
    }
}

/// Deadline sweeps this close together at most: a connection whose calls time out one
/// after another is swept once per millisecond, not once per call. Tokio's timer has
/// the same resolution.
const SWEEP_GAP: Duration = Duration::from_millis(1);

/// The answers of one read whose callers are looked up under one lock of the pending
/// map, at most. Every call takes that lock as it registers, on either core; taking it
/// for each answer as well made two contended acquisitions per call. Measured
/// (`courier bench rpc`, 16 B, alternating pairs): `multi_conn` +5.4% and +7.3% calls/s
/// in two sets of 8 (11 of 16 faster), `concurrent` +1.2% (3 of 6). Bounded, so that
/// the first callers of a long read are not kept waiting for the rest to be decoded.
const ANSWERS_PER_LOCK: usize = 16;

/// A call waiting for its answer.
#[derive(Debug)]
struct Waiter {
    reply: oneshot::Sender<Answer>,
    deadline: Instant,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) sender: FrameSender,
    pub(super) peer: PeerAddr,
    /// Every call and every answer takes this lock: on lines of its own, apart from
    /// `sender` and `retired`, which every call only reads.
    pending: CacheLine<Mutex<Pending>>,
    /// Wakes the sweeper: a call with an earlier deadline than it sleeps for, or the
    /// connection closed.
    sweep: Notify,
    /// Set when this connection takes no new calls: it closed, or the server is draining
    /// it. Every call reads it.
    retired: Latch,
}

#[derive(Debug, Default)]
struct Pending {
    /// By call id. The ids are this client's own sequence, not a peer's choice, so a
    /// fast unkeyed hash (FxHash) is safe here (SipHash showed in the client's profile).
    calls: FxHashMap<u64, Waiter>,
    /// No call's deadline is earlier than this (it may be earlier than every call's: a
    /// call answered leaves it be); `None` when no call registered since the last sweep
    /// found none left.
    earliest: Option<Instant>,
    /// Set once the connection closed; no call can register after that.
    closed: Option<Arc<str>>,
    /// The last call id given out. Ids are taken under this lock, which every call takes
    /// anyway: a counter of its own was one more cache line that every call, on either
    /// core, wrote.
    last_id: u64,
}

impl Conn {
    pub(super) fn new(sender: FrameSender, peer: PeerAddr) -> Self {
        Conn {
            sender,
            peer,
            pending: CacheLine::default(),
            sweep: Notify::new(),
            retired: Latch::new(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Inserts and removes only: a panic elsewhere cannot leave the map half-updated.
        crate::sync::lock(&self.pending.0)
    }

    /// Registers a call under a new id, unique on this connection, and returns the id;
    /// its answer, the connection's failure or the passing of `deadline` arrives on the
    /// receiver. Also says whether it is the only call pending, a lone call that its
    /// sender may write itself.
    ///
    /// One task per connection ([`Conn::sweep_deadlines`]) watches the deadlines, instead
    /// of a timer per call: registering and deregistering a tokio timer showed as ~4% of
    /// a client's CPU at 16 B calls (issue 16).
    pub(super) fn register(
        &self,
        deadline: Instant,
    ) -> Result<(u64, oneshot::Receiver<Answer>, bool), RpcError> {
        let (reply, rx) = oneshot::channel();
        let mut pending = self.pending();
        if let Some(reason) = &pending.closed {
            return Err(RpcError::ConnectionClosed {
                reason: reason.clone(),
            });
        }
        pending.last_id += 1;
        let id = pending.last_id;
        pending.calls.insert(id, Waiter { reply, deadline });
        let lone = pending.calls.len() == 1;
        if pending.earliest.is_none_or(|earliest| deadline < earliest) {
            pending.earliest = Some(deadline);
            drop(pending);
            self.sweep.notify_one();
        }
        Ok((id, rx, lone))
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
        self.sweep.notify_one();
        for (_, waiter) in calls {
            let _ = waiter
                .reply
                .send(Answer::Failed(Box::new(RpcError::ConnectionClosed {
                    reason: reason.clone(),
                })));
        }
    }

    /// Ends every call whose deadline passed, until the connection closes: each is
    /// answered [`Answer::TimedOut`] and the server is sent a cancel. Sleeps until the
    /// earliest deadline, or [`SWEEP_GAP`] after the last sweep if later.
    pub(super) async fn sweep_deadlines(self: Arc<Self>) {
        crate::sync::sweep_deadlines(
            &self.sweep,
            SWEEP_GAP,
            || {
                let pending = self.pending();
                pending.closed.is_none().then_some(pending.earliest)
            },
            |now| {
                let expired: Vec<(u64, Waiter)> = {
                    let mut pending = self.pending();
                    let expired = pending
                        .calls
                        .extract_if(|_, waiter| waiter.deadline <= now)
                        .collect();
                    pending.earliest = pending.calls.values().map(|waiter| waiter.deadline).min();
                    expired
                };
                for (id, waiter) in expired {
                    let _ = waiter.reply.send(Answer::TimedOut);
                    // Never waits: a full queue takes it from a task. The server stops
                    // the handler at the deadline it was told anyway.
                    let _ = self.sender.send_soon(Frame::Cancel { id });
                }
            },
        )
        .await;
    }

    /// Hands each of `answers` (which it leaves empty) to its caller: their waiters are
    /// taken out of the map under one lock, then answered. Unknown ids are answers to
    /// calls that timed out or were dropped.
    fn answer(&self, answers: &mut Vec<(u64, Answer)>, answered: &mut Vec<(Waiter, Answer)>) {
        {
            let mut pending = self.pending();
            for (id, answer) in answers.drain(..) {
                if let Some(waiter) = pending.calls.remove(&id) {
                    answered.push((waiter, answer));
                }
            }
        }
        for (waiter, answer) in answered.drain(..) {
            let _ = waiter.reply.send(answer);
        }
    }

    /// Takes the answers already buffered after one just read, up to
    /// [`ANSWERS_PER_LOCK`] in all, without waiting; returns the frame read after them
    /// that is not an answer, if one was.
    async fn gather<R: AsyncRead + Unpin>(
        reader: &mut FrameReader<R>,
        answers: &mut Vec<(u64, Answer)>,
    ) -> Option<Option<Result<Frame, ConnectionError>>> {
        while answers.len() < ANSWERS_PER_LOCK && reader.has_frame() {
            // Buffered: read without waiting.
            let read = match reader.take_ok_response() {
                Some((id, payload)) => Read::Answer(id, Answer::Ok(payload)),
                None => Read::of(reader.next().await),
            };
            match read {
                Read::Answer(id, answer) => answers.push((id, answer)),
                Read::Other(frame) => return Some(frame),
            }
        }
        None
    }

    /// Reads answers until the connection ends, then fails what is still pending.
    pub(super) async fn read_loop<R: AsyncRead + Unpin>(
        self: Arc<Self>,
        mut reader: FrameReader<R>,
    ) {
        let mut going_away: Option<RpcError> = None;
        // The answers already read, whose callers are found under one lock (see
        // ANSWERS_PER_LOCK), and a frame read after them that is not an answer.
        let mut answers: Vec<(u64, Answer)> = Vec::new();
        let mut answered: Vec<(Waiter, Answer)> = Vec::new();
        let mut after = None;
        let error = loop {
            // An answer with status OK and no message is taken from the read buffer as
            // it lies, with no `Frame` made (`take_ok_response`).
            let read = match after.take() {
                Some(frame) => Read::Other(frame),
                None => match reader.take_ok_response() {
                    Some((id, payload)) => Read::Answer(id, Answer::Ok(payload)),
                    None => Read::of(reader.next().await),
                },
            };
            let frame = match read {
                Read::Answer(id, answer) => {
                    answers.push((id, answer));
                    after = Self::gather(&mut reader, &mut answers).await;
                    self.answer(&mut answers, &mut answered);
                    continue;
                }
                Read::Other(frame) => frame,
            };
            match frame {
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

/// What a client's read loop reads: an answer, or anything else (another frame, the
/// end of the connection, an error).
enum Read {
    Answer(u64, Answer),
    Other(Option<Result<Frame, ConnectionError>>),
}

impl Read {
    /// A frame read: an answer, or something else.
    fn of(frame: Option<Result<Frame, ConnectionError>>) -> Read {
        match frame {
            Some(Ok(Frame::Response(response))) => Read::Answer(response.id, Answer::of(response)),
            other => Read::Other(other),
        }
    }
}
