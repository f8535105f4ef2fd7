//! The frame queue between a connection's senders and its writer task.
//!
//! Bounded in frames, drained a batch at a time, and waking the writer only when it is
//! waiting. tokio's mpsc channel, which this replaced, wakes the receiver on every send:
//! each send writes the receiver's waker state and the block's ready bits, cache lines
//! that the writer, on another thread, writes as it takes frames and whenever it waits.
//! Under load most of a send's time went to moving those lines between cores. Here a
//! send takes a lock that the writer takes once per batch, for as long as it takes to
//! swap two deques, and wakes the writer only when it found it waiting.
//!
//! The lock is parking_lot's: it spins, then yields the thread a few times, before it
//! parks. On two cores a lock holder is often preempted, and the standard library's
//! mutex then parks its waiter on a futex at once (1 KiB fan-out lost 8% with it).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::frame::Frame;
use crate::sync::CacheLine;

/// What a sender queues for the writer.
#[derive(Debug)]
pub(super) enum Item {
    /// A frame, which the writer encodes.
    Frame(Frame),
    /// Whole frames their senders encoded already, length prefixes and all, counted as
    /// `cost` queued bytes in all, which the writer writes as they are: frames encoded
    /// into the queue one by one ([`Tx::try_append`]), or a batch queued as one
    /// ([`super::EncodedFrames`]), which later frames may join.
    Appended { frames: BytesMut, cost: usize },
}

/// Frames are appended to the encoded frames at the back of the queue while those hold
/// fewer bytes than this; then a new item starts.
const APPEND_MAX: usize = 64 * 1024;
/// An appended item's buffer is reused for the next one if it is no larger than this.
const APPEND_KEEP: usize = 2 * APPEND_MAX;

impl From<Frame> for Item {
    fn from(frame: Frame) -> Item {
        Item::Frame(frame)
    }
}

/// Room for this many frames is all a quiet queue keeps ([`Rx::shrink`]).
const KEEP_CAPACITY: usize = 64;

struct Queue {
    /// Every send and every take locks it: on lines of its own.
    inner: CacheLine<Mutex<Inner>>,
    /// Senders that found the queue full wait here; the writer notifies them when it
    /// takes frames from a queue that a sender found full.
    room: Notify,
    capacity: usize,
    /// Live [`Tx`] handles; the writer ends when the last one is gone.
    senders: AtomicUsize,
}

struct Inner {
    frames: VecDeque<Item>,
    /// The writer, when it waits for a frame.
    waiting: Option<Waker>,
    /// No more frames are taken: the writer stopped.
    closed: bool,
    /// A sender found the queue full since the writer last took frames.
    wanted_room: bool,
    /// A written item's buffer, empty, for the next frames appended.
    spare_buf: Option<BytesMut>,
}

/// Why an item was not queued; the item is handed back as it was given.
#[derive(Debug)]
pub(super) enum PushError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The writer stopped.
    Closed(T),
}

/// A sender's handle. Cloning it counts another sender.
pub(super) struct Tx {
    queue: Arc<Queue>,
}

/// The writer's handle. Dropping it closes the queue.
pub(super) struct Rx {
    queue: Arc<Queue>,
    /// An empty deque, swapped with the queue's when the writer takes every frame: the
    /// lock is held for the swap, not for moving the frames.
    spare: VecDeque<Item>,
    /// An appended item's buffer, written and cleared, given back to the queue at the
    /// next take.
    written_buf: Option<BytesMut>,
}

/// A queue for at most `capacity` frames (at least 1).
pub(super) fn queue(capacity: usize) -> (Tx, Rx) {
    let queue = Arc::new(Queue {
        inner: CacheLine(Mutex::new(Inner {
            frames: VecDeque::new(),
            waiting: None,
            closed: false,
            wanted_room: false,
            spare_buf: None,
        })),
        room: Notify::new(),
        capacity: capacity.max(1),
        senders: AtomicUsize::new(1),
    });
    (
        Tx {
            queue: queue.clone(),
        },
        Rx {
            queue,
            spare: VecDeque::new(),
            written_buf: None,
        },
    )
}

impl Tx {
    /// Queues `frame` (a frame, or frames encoded already) if there is room now, waking
    /// the writer if it waits. Every item takes one place, whatever it holds.
    // Handed back by value, as tokio's `TrySendError<T>` does: boxing it would allocate.
    #[allow(clippy::result_large_err)]
    pub(super) fn try_push<T: Into<Item>>(&self, frame: T) -> Result<(), PushError<T>> {
        let queue = &*self.queue;
        let mut inner = queue.inner.lock();
        if inner.closed {
            return Err(PushError::Closed(frame));
        }
        if inner.frames.len() >= queue.capacity {
            inner.wanted_room = true;
            return Err(PushError::Full(frame));
        }
        inner.frames.push_back(frame.into());
        let writer = inner.waiting.take();
        drop(inner);
        if let Some(writer) = writer {
            writer.wake();
        }
        Ok(())
    }

    /// Queues one frame that `encode` writes (length prefix and all), counted as `cost`
    /// queued bytes: appended to the encoded frames at the back of the queue if there
    /// are some and they hold less than [`APPEND_MAX`] bytes, otherwise as a new item if
    /// there is room for one, in which case `new_item` is called first, under the lock
    /// (the sender counts the item pending before the writer can see it). `encode` is not
    /// called when the frame is refused. A sender's frames are encoded here, on its own
    /// thread: nothing of the frame is left for the writer to encode or to free.
    pub(super) fn try_append(
        &self,
        cost: usize,
        encode: impl FnOnce(&mut BytesMut),
        new_item: impl FnOnce(),
    ) -> Result<(), PushError<()>> {
        let queue = &*self.queue;
        let mut inner = queue.inner.lock();
        if inner.closed {
            return Err(PushError::Closed(()));
        }
        if let Some(Item::Appended { frames, cost: all }) = inner.frames.back_mut()
            && frames.len() < APPEND_MAX
        {
            // The writer was woken when this item was queued, and has not taken it yet.
            encode(frames);
            *all += cost;
            return Ok(());
        }
        if inner.frames.len() >= queue.capacity {
            inner.wanted_room = true;
            return Err(PushError::Full(()));
        }
        let mut frames = inner.spare_buf.take().unwrap_or_default();
        encode(&mut frames);
        new_item();
        inner.frames.push_back(Item::Appended { frames, cost });
        let writer = inner.waiting.take();
        drop(inner);
        if let Some(writer) = writer {
            writer.wake();
        }
        Ok(())
    }

    /// Waits until the queue has room for a frame (`true`) or is closed (`false`). Room
    /// is not reserved: a sender that then finds the queue full again waits again.
    pub(super) async fn room(&self) -> bool {
        let queue = &*self.queue;
        loop {
            // Registered before the check, so that frames taken in between wake it.
            let taken = queue.room.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let mut inner = queue.inner.lock();
                if inner.closed {
                    return false;
                }
                if inner.frames.len() < queue.capacity {
                    return true;
                }
                inner.wanted_room = true;
            }
            taken.await;
        }
    }
}

impl Clone for Tx {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::Relaxed);
        Tx {
            queue: self.queue.clone(),
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The writer writes what is left, then ends. It reads the count after it
            // left its waker, under the lock: either it sees 0, or its waker is here.
            let writer = self.queue.inner.lock().waiting.take();
            if let Some(writer) = writer {
                writer.wake();
            }
        }
    }
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx")
            .field("capacity", &self.queue.capacity)
            .finish_non_exhaustive()
    }
}

impl Rx {
    /// Moves up to `max` queued frames, oldest first, into `batch`; returns how many.
    /// With none queued: `Ready(0)` once every sender is gone, `Pending` otherwise (the
    /// next frame queued wakes the task). Spends a unit of the task's coop budget per
    /// batch.
    pub(super) fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut Vec<Item>,
        max: usize,
    ) -> Poll<usize> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let n = self.take(batch, max, Some(cx.waker()));
        if n > 0 {
            coop.made_progress();
            return Poll::Ready(n);
        }
        if self.queue.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(0);
        }
        Poll::Pending
    }

    /// [`Rx::poll_recv_many`] as a future.
    pub(super) async fn recv_many(&mut self, batch: &mut Vec<Item>, max: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_recv_many(cx, batch, max)).await
    }

    /// Moves up to `max` frames queued now into `batch`, without waiting; returns how
    /// many.
    pub(super) fn try_recv_many(&mut self, batch: &mut Vec<Item>, max: usize) -> usize {
        self.take(batch, max, None)
    }

    /// Keeps the buffer of an appended item once its frames are written, to give it back
    /// to the queue at the next take (unless it grew past [`APPEND_KEEP`]).
    pub(super) fn written(&mut self, mut frames: BytesMut) {
        if self.written_buf.is_none() && frames.capacity() <= APPEND_KEEP {
            frames.clear();
            self.written_buf = Some(frames);
        }
    }

    /// Takes up to `max` frames into `batch`; with none queued, leaves `waker` to be
    /// woken by the next frame.
    fn take(&mut self, batch: &mut Vec<Item>, max: usize, waker: Option<&Waker>) -> usize {
        let mut inner = self.queue.inner.lock();
        if inner.spare_buf.is_none() {
            inner.spare_buf = self.written_buf.take();
        }
        let n = inner.frames.len().min(max);
        if n == 0 {
            if let Some(waker) = waker {
                match &inner.waiting {
                    Some(waiting) if waiting.will_wake(waker) => {}
                    _ => inner.waiting = Some(waker.clone()),
                }
            }
            return 0;
        }
        let all = n == inner.frames.len();
        if all {
            std::mem::swap(&mut inner.frames, &mut self.spare);
        } else {
            batch.extend(inner.frames.drain(..n));
        }
        let wanted_room = std::mem::take(&mut inner.wanted_room);
        drop(inner);
        if all {
            batch.extend(self.spare.drain(..));
        }
        if wanted_room {
            // waiters registered before they checked: none misses this
            self.queue.room.notify_waiters();
        }
        n
    }

    /// Gives back the room a burst left, beyond [`KEEP_CAPACITY`] frames, and the buffer
    /// kept for appended frames: for the writer to call once the connection has been
    /// quiet for a while, so that a busy one does not reallocate its queue after every
    /// batch.
    pub(super) fn shrink(&mut self) {
        self.spare.shrink_to(KEEP_CAPACITY);
        self.written_buf = None;
        let mut inner = self.queue.inner.lock();
        inner.spare_buf = None;
        if inner.frames.is_empty() {
            inner.frames.shrink_to(KEEP_CAPACITY);
        }
    }

    /// Takes no more frames: later sends fail as closed, waiting ones wake, and frames
    /// still queued are dropped.
    pub(super) fn close(&mut self) {
        let frames = {
            let mut inner = self.queue.inner.lock();
            inner.closed = true;
            inner.waiting = None;
            std::mem::take(&mut inner.frames)
        };
        drop(frames);
        self.queue.room.notify_waiters();
    }
}

impl Drop for Rx {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn cancel(id: u64) -> Frame {
        Frame::Cancel { id }
    }

    fn ids(batch: &[Item]) -> Vec<u64> {
        batch
            .iter()
            .map(|item| match item {
                Item::Frame(Frame::Cancel { id }) => *id,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn frames_come_out_in_the_order_they_went_in_a_batch_at_a_time() {
        let (tx, mut rx) = queue(8);
        for id in 0..5 {
            assert!(tx.try_push(cancel(id)).is_ok());
        }
        let mut batch = Vec::new();
        assert_eq!(rx.try_recv_many(&mut batch, 3), 3);
        assert_eq!(rx.try_recv_many(&mut batch, 3), 2);
        assert_eq!(ids(&batch), [0, 1, 2, 3, 4]);
        assert_eq!(rx.try_recv_many(&mut batch, 3), 0);
    }

    #[test]
    fn encoded_frames_take_one_place_and_keep_it_among_frames() {
        let encoded = || Item::Appended {
            frames: BytesMut::from(&b"encoded"[..]),
            cost: 7,
        };
        let (tx, mut rx) = queue(3);
        assert!(tx.try_push(cancel(0)).is_ok());
        assert!(tx.try_push(encoded()).is_ok());
        assert!(tx.try_push(cancel(1)).is_ok());
        assert!(matches!(
            tx.try_push(encoded()),
            Err(PushError::Full(Item::Appended { cost: 7, .. }))
        ));
        let mut batch = Vec::new();
        assert_eq!(rx.try_recv_many(&mut batch, 8), 3);
        assert!(matches!(
            &batch[..],
            [
                Item::Frame(Frame::Cancel { id: 0 }),
                Item::Appended { frames, cost: 7 },
                Item::Frame(Frame::Cancel { id: 1 }),
            ] if &frames[..] == b"encoded"
        ));
    }

    fn append(tx: &Tx, bytes: &[u8], new_items: &mut usize) -> Result<(), PushError<()>> {
        tx.try_append(
            bytes.len(),
            |buf| buf.extend_from_slice(bytes),
            || *new_items += 1,
        )
    }

    #[test]
    fn appended_frames_join_the_encoded_frames_at_the_back_and_a_frame_between_starts_anew() {
        let (tx, mut rx) = queue(2);
        let mut new_items = 0;
        append(&tx, b"ab", &mut new_items).unwrap();
        append(&tx, b"cd", &mut new_items).unwrap();
        assert_eq!(new_items, 1, "the second joined the first");
        assert!(tx.try_push(cancel(9)).is_ok());
        // Two items queued: a frame after them needs a place of its own, and finds none.
        assert!(matches!(
            append(&tx, b"ef", &mut new_items),
            Err(PushError::Full(()))
        ));
        let mut batch = Vec::new();
        assert_eq!(rx.try_recv_many(&mut batch, 8), 2);
        assert!(matches!(
            &batch[..],
            [
                Item::Appended { frames, cost: 4 },
                Item::Frame(Frame::Cancel { id: 9 }),
            ] if &frames[..] == b"abcd"
        ));
        // The written buffer goes back to the queue for the next appended frames.
        let Item::Appended { frames, .. } = batch.remove(0) else {
            unreachable!()
        };
        rx.written(frames);
        assert_eq!(rx.try_recv_many(&mut batch, 8), 0);
        assert!(rx.queue.inner.lock().spare_buf.is_some());
        append(&tx, b"ef", &mut new_items).unwrap();
        assert_eq!(new_items, 2);
        assert!(rx.queue.inner.lock().spare_buf.is_none(), "reused");
        rx.close();
        assert!(matches!(
            append(&tx, b"gh", &mut new_items),
            Err(PushError::Closed(()))
        ));
    }

    #[test]
    fn a_full_queue_hands_the_frame_back_until_the_writer_takes_some() {
        let (tx, mut rx) = queue(2);
        assert!(tx.try_push(cancel(0)).is_ok());
        assert!(tx.try_push(cancel(1)).is_ok());
        assert!(matches!(
            tx.try_push(cancel(2)),
            Err(PushError::Full(Frame::Cancel { id: 2 }))
        ));
        assert_eq!(rx.try_recv_many(&mut Vec::new(), 1), 1);
        assert!(tx.try_push(cancel(2)).is_ok());
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_wakes_when_the_writer_takes_frames() {
        let (tx, mut rx) = queue(1);
        assert!(tx.try_push(cancel(0)).is_ok());
        let room = tx.room();
        tokio::pin!(room);
        assert!(room.as_mut().now_or_never().is_none(), "full: it waits");
        assert_eq!(rx.try_recv_many(&mut Vec::new(), 8), 1);
        assert!(room.await, "room after the take");
    }

    #[tokio::test]
    async fn the_writer_sleeps_until_a_frame_comes_and_sees_the_end_when_every_sender_is_gone() {
        let (tx, mut rx) = queue(4);
        let mut batch = Vec::new();
        assert!(
            rx.recv_many(&mut batch, 8).now_or_never().is_none(),
            "nothing queued: it waits"
        );
        let waiting = tokio::spawn(async move {
            let mut batch = Vec::new();
            let first = rx.recv_many(&mut batch, 8).await;
            let end = rx.recv_many(&mut batch, 8).await;
            (first, end, ids(&batch))
        });
        tokio::task::yield_now().await;
        let other = tx.clone();
        assert!(tx.try_push(cancel(7)).is_ok());
        drop(tx);
        drop(other);
        assert_eq!(waiting.await.unwrap(), (1, 0, vec![7]));
    }

    #[tokio::test]
    async fn a_closed_queue_refuses_frames_and_releases_the_senders_waiting_for_room() {
        let (tx, mut rx) = queue(1);
        assert!(tx.try_push(cancel(0)).is_ok());
        let waiter = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.room().await })
        };
        tokio::task::yield_now().await;
        rx.close();
        assert!(!waiter.await.unwrap(), "told the queue closed");
        assert!(matches!(tx.try_push(cancel(1)), Err(PushError::Closed(_))));
        assert!(!tx.room().await);
    }

    #[test]
    fn a_quiet_queue_gives_back_the_room_a_burst_left() {
        let (tx, mut rx) = queue(4096);
        for round in 0..2 {
            for id in 0..1000 {
                assert!(tx.try_push(cancel(id)).is_ok());
            }
            assert_eq!(
                rx.try_recv_many(&mut Vec::new(), usize::MAX),
                1000,
                "{round}"
            );
        }
        assert!(rx.spare.capacity() >= 1000 || rx.queue.inner.lock().frames.capacity() >= 1000);
        rx.shrink();
        assert!(rx.spare.capacity() <= KEEP_CAPACITY);
        assert!(rx.queue.inner.lock().frames.capacity() <= KEEP_CAPACITY);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn senders_on_other_threads_get_every_frame_through_a_small_queue_in_order() {
        // A queue of 4 frames: senders fill it and wait for room over and over, and the
        // writer empties it and waits for frames as often. A wake-up lost on either side
        // would stall the test.
        const SENDERS: u64 = 3;
        const EACH: u64 = 20_000;
        let (tx, mut rx) = queue(4);
        let mut senders = Vec::new();
        for who in 0..SENDERS {
            let tx = tx.clone();
            senders.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let mut frame = cancel(who * EACH + i);
                    loop {
                        match tx.try_push(frame) {
                            Ok(()) => break,
                            Err(PushError::Full(back)) => {
                                frame = back;
                                assert!(tx.room().await);
                            }
                            Err(PushError::Closed(_)) => panic!("closed"),
                        }
                    }
                }
            }));
        }
        drop(tx);
        let writer = tokio::spawn(async move {
            let mut next = [0u64; SENDERS as usize];
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 3).await > 0 {
                for id in ids(&batch) {
                    let who = (id / EACH) as usize;
                    assert_eq!(id % EACH, next[who], "sender {who} in order");
                    next[who] += 1;
                }
                batch.clear();
            }
            next
        });
        let next = tokio::time::timeout(std::time::Duration::from_secs(60), writer)
            .await
            .expect("no lost wake-up")
            .unwrap();
        for sender in senders {
            sender.await.unwrap();
        }
        println!("frames through a 4-frame queue: {:?}", next);
        assert_eq!(next, [EACH; SENDERS as usize]);
    }
}
