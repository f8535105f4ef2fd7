//! The broker side of the bus protocol for one connection: a connect first, then `Pub`,
//! `Sub`, `Unsub` and `GoAway` frames, one function each.

use std::collections::HashMap;
use std::sync::Arc;

use rpc_core::connection::FrameReader;
use rpc_core::frame::{Connect, Frame, GoAway, Message as MsgFrame, Publish, Subscribe};
use rpc_core::{ConnectionError, ProtocolError, Utf8Bytes};

use super::Shared;
use super::connection::Conn;
use super::fanout::{Batches, PublishRoutes, Route};
use super::streams::{Captured, StreamSession};
use crate::lock;
use crate::message::{SUBSCRIPTION_REFUSED, counted_size, status_headers};
use crate::subject;
use crate::sublist::Sublist;

/// A subscription as its connection knows it.
struct SessionSub {
    filter: Utf8Bytes,
    queue: Option<Utf8Bytes>,
    /// Its key in the broker's index, assigned by the broker (sids are the client's).
    key: u64,
}

/// One connection's protocol state.
pub(super) struct Session<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a Arc<Conn>,
    /// sid → this connection's subscription.
    subs: HashMap<u64, SessionSub>,
    /// Its durable publishes, fetches and ephemeral consumers.
    streams: StreamSession,
    /// Its last publish subject and what that matched.
    routes: PublishRoutes,
    /// The messages its publishes of the current read routed, sent when the read is
    /// done.
    batches: Batches,
}

impl<'a> Session<'a> {
    pub(super) fn new(shared: &'a Arc<Shared>, conn: &'a Arc<Conn>, id: u64) -> Self {
        Session {
            shared,
            conn,
            subs: HashMap::new(),
            streams: StreamSession::new(id),
            routes: PublishRoutes::default(),
            batches: Batches::default(),
        }
    }

    /// Runs the protocol until the peer leaves (`Ok`) or breaks it (`Err`, after telling
    /// the peer why). The messages of the publishes accepted before either are sent.
    pub(super) async fn run<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<(), ConnectionError> {
        self.on_connect(reader).await?;
        let result = self.serve(reader).await;
        self.shared.flush(&mut self.batches).await;
        result
    }

    async fn serve<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<(), ConnectionError> {
        loop {
            let pending = self.streams.has_deferred() || !self.batches.is_empty();
            let frame = if pending && !reader.may_have_more() {
                // The read brought less than it had room for, and its frames are done:
                // most likely nothing more is on the socket, and asking would delay
                // these messages by a read that finds nothing.
                self.end_of_read().await;
                reader.next().await
            } else {
                let mut next = std::pin::pin!(reader.next());
                if pending {
                    // The messages routed and the durable publishes of this read are sent
                    // and written once the next frame is not at hand (nothing more
                    // buffered or ready on the socket): one write per subscriber, and
                    // one for the stream, for all that one burst from the peer brought.
                    // Asked without waiting; a ping or pong consumed on the way counts
                    // as nothing at hand.
                    match super::poll_now(next.as_mut()) {
                        Some(frame) => frame,
                        None => {
                            self.end_of_read().await;
                            next.await
                        }
                    }
                } else {
                    next.await
                }
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            match frame? {
                Frame::Pub(publish) => self.on_pub(publish).await?,
                other => {
                    // Anything else is answered after the messages routed before it.
                    self.shared.flush(&mut self.batches).await;
                    match other {
                        Frame::Sub(sub) => self.on_sub(sub).await?,
                        Frame::Unsub { sid } => self.on_unsub(sid),
                        Frame::GoAway(g) => self.on_go_away(&g),
                        other => {
                            return Err(reader.protocol_violation(ProtocolError::UnexpectedFrame {
                                kind: other.kind(),
                                context: "a broker accepts pub, sub, unsub and go-away frames after connect",
                            }));
                        }
                    }
                }
            }
            // ... or once MAX_DEFERRED of them wait: then their answers go out before
            // the rest of the burst is read (the writers woken by them run first), so
            // that a publisher's window refills while the broker works through the rest
            if self.streams.many_deferred() {
                self.end_of_read().await;
                tokio::task::yield_now().await;
            }
        }
    }

    /// Sends what this read routed, then writes its durable publishes (whose
    /// acknowledgements follow the messages to subscribers).
    async fn end_of_read(&mut self) {
        self.shared.flush(&mut self.batches).await;
        self.streams
            .commit_deferred(self.shared, &mut self.batches)
            .await;
    }

    /// The first frame must be a connect, within the handshake timeout, with the token
    /// when one is required. The broker answers with its own connect, stating its limits,
    /// and from then on sends this client no frame over the limit it stated.
    async fn on_connect<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<(), ConnectionError> {
        let config = &self.shared.config;
        let first = match tokio::time::timeout(config.handshake_timeout, reader.next()).await {
            Err(_) => {
                let message = format!(
                    "no connect frame within {:?} (handshake_timeout)",
                    config.handshake_timeout
                );
                return Err(self.violation(GoAway::PROTOCOL_ERROR, message));
            }
            Ok(None) => {
                return Err(ConnectionError::Closed {
                    reason: "closed before connect".into(),
                });
            }
            Ok(Some(first)) => first?,
        };
        let Frame::Connect(hello) = first else {
            return Err(reader.protocol_violation(ProtocolError::UnexpectedFrame {
                kind: first.kind(),
                context: "a broker expects a connect frame first",
            }));
        };
        if let Some(token) = &config.token
            && hello.token.as_str() != token
        {
            let message = if hello.token.is_empty() {
                "authorization required: this broker needs a token"
            } else {
                "authorization failed: wrong token"
            };
            return Err(self.violation(GoAway::AUTHORIZATION, message.into()));
        }
        *lock(&self.conn.name) = hello.name.to_string();
        self.conn
            .sender
            .limit_frame_len(hello.max_frame_len as usize);
        self.streams.limit_frames(self.conn.sender.max_frame_len());
        tracing::debug!(peer = %self.conn.peer, name = %hello.name, max_frame_len = hello.max_frame_len, "client connected");
        self.conn
            .sender
            .send_or_abort(Frame::Connect(Connect {
                max_frame_len: config.connection.max_frame_len.min(u32::MAX as usize) as u32,
                max_payload: config.max_payload.min(u32::MAX as usize) as u32,
                name: config.name.clone().into(),
                token: Utf8Bytes::default(),
            }))
            .await
    }

    /// A publish: checked, then handed to the fan-out.
    async fn on_pub(&mut self, publish: Publish) -> Result<(), ConnectionError> {
        if let Err(e) = self.routes.check(&publish.subject) {
            return Err(self.violation(GoAway::PROTOCOL_ERROR, e.to_string()));
        }
        if !publish.reply.is_empty()
            && let Err(e) = subject::validate_subject(&publish.reply)
        {
            return Err(self.violation(GoAway::PROTOCOL_ERROR, e.to_string()));
        }
        let max = self.shared.config.max_payload;
        let size = counted_size(&publish.headers, &publish.payload);
        if size > max {
            let message = format!(
                "payload and headers of {size} bytes exceed the broker's maximum payload of {max} bytes (max_payload)"
            );
            return Err(self.violation(GoAway::LIMIT_EXCEEDED, message));
        }
        // Accepted means deliverable: subjects are at most 4 KiB and headers count in
        // max_payload, so the Msg frame fits the frame limit (BrokerConfig::validate).
        if publish.subject.starts_with('$') {
            // a stream request is answered after the messages routed before it
            self.shared.flush(&mut self.batches).await;
            if self.streams.on_system(self.shared, &publish).await {
                self.shared.count_in();
                return Ok(());
            }
        }
        let (routes, batches) = (&mut self.routes, &mut self.batches);
        match self.streams.capture(self.shared, &publish).await {
            Captured::Deliver => self.shared.publish(&publish, routes, batches).await,
            Captured::DeliverThis(stripped) => {
                self.shared.publish(&stripped, routes, batches).await
            }
            Captured::Nothing => self.shared.count_in(),
        }
        Ok(())
    }

    /// A subscription, or its refusal: a status message and an unsubscribe for its sid.
    async fn on_sub(&mut self, sub: Subscribe) -> Result<(), ConnectionError> {
        let queue = (!sub.queue.is_empty()).then_some(sub.queue);
        // A repeated sid replaces the earlier subscription.
        self.on_unsub(sub.sid);
        let limit = self.shared.config.max_subscriptions;
        let refusal = if self.subs.len() >= limit {
            format!(
                "too many subscriptions: this connection has {}, the broker's limit is {limit} (max_subscriptions)",
                self.subs.len()
            )
        } else {
            let route = Route {
                conn: self.conn.clone(),
                sid: sub.sid,
            };
            let key = self.shared.next_id();
            match self
                .shared
                .subs
                .insert(&sub.subject, queue.as_deref(), key, route)
            {
                Ok(()) => {
                    let entry = SessionSub {
                        filter: sub.subject,
                        queue,
                        key,
                    };
                    self.subs.insert(sub.sid, entry);
                    return Ok(());
                }
                Err(e) => e.to_string(),
            }
        };
        tracing::info!(peer = %self.conn.peer, subject = %sub.subject, reason = %refusal, "subscription refused");
        let headers = status_headers(SUBSCRIPTION_REFUSED, refusal);
        // A peer that never reads its refusals is cut off after keepalive_timeout.
        self.conn
            .sender
            .send_or_abort(Frame::Msg(MsgFrame {
                sid: sub.sid,
                subject: sub.subject,
                reply: Utf8Bytes::default(),
                headers,
                payload: bytes::Bytes::new(),
            }))
            .await?;
        self.conn
            .sender
            .send_or_abort(Frame::Unsub { sid: sub.sid })
            .await
    }

    fn on_unsub(&mut self, sid: u64) {
        if let Some(sub) = self.subs.remove(&sid) {
            self.shared
                .subs
                .remove(&sub.filter, sub.queue.as_deref(), sub.key);
        }
    }

    fn on_go_away(&self, g: &GoAway) {
        tracing::debug!(peer = %self.conn.peer, code = g.code, message = %g.message, "client is going away");
    }

    /// Removes every subscription of this connection (it is closing).
    /// A connection may hold 65,536 subscriptions: they go in batches, letting other
    /// connections' tasks run (and match) between batches.
    pub(super) async fn remove_all(&mut self) {
        self.streams.close(self.shared);
        let subs: Vec<SessionSub> = std::mem::take(&mut self.subs).into_values().collect();
        for batch in subs.chunks(Sublist::<Route>::REMOVE_BATCH) {
            self.shared.subs.remove_many(
                batch
                    .iter()
                    .map(|sub| (sub.filter.as_str(), sub.queue.as_deref(), sub.key)),
            );
            tokio::task::yield_now().await;
        }
    }

    /// Tells the peer why with a go-away and closes the connection.
    fn violation(&self, code: u16, message: String) -> ConnectionError {
        tracing::warn!(peer = %self.conn.peer, %message, "closing connection");
        let error = ConnectionError::Closed {
            reason: message.clone().into(),
        };
        self.conn
            .sender
            .close_with(GoAway::new(code, message), &error);
        error
    }
}
