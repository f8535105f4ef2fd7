//! A subscription's bounded queue: many senders, one receiver, which takes out everything
//! queued in one go and hands it out from there.
//!
//! A connection's reader queues each message it reads, and the subscriber's task takes
//! them on the other core. Through tokio's `mpsc` every message cost both sides several
//! atomic operations on lines the other core had just written (the capacity semaphore,
//! the block's ready bits, the receiver's waker, the permit given back); at 1 KiB
//! messages on two cores they were among the hottest lines of a subscriber's profile.
//! Here a sender takes one lock per message, and the receiver one per batch: it swaps
//! the whole queue for its own empty one, so the two sides meet once per batch.
//!
//! The capacity still counts every message not yet handed out: those waiting in the
//! queue and those the receiver took but has not returned from
//! [`Receiver::poll_recv`] yet.
//!
//! This is the design of a connection's send queue (`rpc_core`'s `connection/queue.rs`),
//! with its lock for the same reason: parking_lot's mutex spins and yields before it
//! parks, where the standard library's parks a waiter at once when the holder was
//! preempted, as it often is on two cores.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A receiver's batch buffer larger than this is given back to the allocator once
/// drained, so that one burst does not keep its memory for the queue's life.
const KEEP_CAPACITY: usize = 1024;

/// A queue of at most `capacity` (at least 1) items.
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        queued: Mutex::new(Queued {
            items: VecDeque::new(),
            in_hand_at_take: 0,
            waker: None,
            closed: false,
            receiver_gone: false,
        }),
        in_hand: OwnLine(AtomicUsize::new(0)),
        room_wanted: AtomicBool::new(false),
        room: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver {
            shared,
            batch: VecDeque::new(),
        },
    )
}

struct Shared<T> {
    capacity: usize,
    queued: Mutex<Queued<T>>,
    /// Items the receiver took out and has not handed out yet. Written by the receiver
    /// alone, after each item it hands out; read by a sender only when the queue looks
    /// full (see [`Queued::in_hand_at_take`]).
    in_hand: OwnLine<AtomicUsize>,
    /// A sender waits for room ([`Sender::send_timeout`]): the receiver notifies `room`
    /// when it hands an item out.
    room_wanted: AtomicBool,
    room: Notify,
    /// Live [`Sender`]s; the queue closes when the last one is dropped.
    senders: AtomicUsize,
}

/// A value on cache lines of its own (x86 fetches lines in adjacent pairs): the
/// receiver writes `in_hand` after every item, and nothing a sender writes may share
/// its line.
#[repr(align(128))]
struct OwnLine<T>(T);

impl<T> std::ops::Deref for OwnLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

struct Queued<T> {
    items: VecDeque<T>,
    /// `in_hand` as it was when last read under this lock. It only falls between
    /// takes, and a take sets it anew, so it is never below the true figure: a sender
    /// that finds room by it needs no look at `in_hand` (the receiver's line).
    in_hand_at_take: usize,
    /// The receiver, waiting for an item.
    waker: Option<Waker>,
    /// No sender is left.
    closed: bool,
    /// The receiver was dropped.
    receiver_gone: bool,
}

/// Why [`Sender::try_send`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// What [`Sender::try_send_all`] did.
#[derive(Debug)]
pub(crate) struct SentAll<T> {
    /// Items queued.
    pub(crate) sent: usize,
    /// The item that did not fit, and why; `None` when every item was queued.
    pub(crate) refused: Option<TrySendError<T>>,
}

/// Why [`Sender::send_timeout`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendTimeoutError<T> {
    /// Still no room when the time was up.
    Timeout(T),
    /// The receiver is gone.
    Closed(T),
}

/// The sending side; cloned for each place that delivers to the queue.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = {
                let mut queued = self.shared.queued.lock();
                queued.closed = true;
                queued.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` if there is room now.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let sent = self.try_send_all(&mut std::iter::once(item));
        match sent.refused {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    /// Queues what `items` yields while there is room, under one lock and with one
    /// wake-up of the receiver. The first item that does not fit comes back in
    /// [`SentAll::refused`]; the rest stay in `items`.
    pub(crate) fn try_send_all(&self, items: &mut impl Iterator<Item = T>) -> SentAll<T> {
        let mut sent = SentAll {
            sent: 0,
            refused: None,
        };
        let waker = {
            let mut queued = self.shared.queued.lock();
            for item in items.by_ref() {
                if queued.receiver_gone {
                    sent.refused = Some(TrySendError::Closed(item));
                    break;
                }
                if !self.has_room(&mut queued) {
                    sent.refused = Some(TrySendError::Full(item));
                    break;
                }
                queued.items.push_back(item);
                sent.sent += 1;
            }
            if sent.sent == 0 {
                return sent;
            }
            queued.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        sent
    }

    /// Whether one more item fits.
    fn has_room(&self, queued: &mut Queued<T>) -> bool {
        if queued.items.len() + queued.in_hand_at_take < self.shared.capacity {
            return true;
        }
        // Full by the figure of the last look; the receiver may have handed items out
        // since.
        let in_hand = self.shared.in_hand.load(Ordering::SeqCst);
        queued.in_hand_at_take = in_hand;
        queued.items.len() + in_hand < self.shared.capacity
    }

    /// Queues `item`, waiting up to `timeout` for room.
    pub(crate) async fn send_timeout(
        &self,
        mut item: T,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<T>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Listening before saying so, and saying so before looking again: the
            // receiver stores `in_hand` and then reads `room_wanted` (both SeqCst), so
            // either this look sees the room it made or it sees this wish and notifies.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.shared.room_wanted.store(true, Ordering::SeqCst);
            item = match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(item)) => return Err(SendTimeoutError::Closed(item)),
                Err(TrySendError::Full(item)) => item,
            };
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return Err(SendTimeoutError::Timeout(item));
            }
        }
    }
}

/// The receiving side.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Taken out of the queue, not handed out yet.
    batch: VecDeque<T>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.shared.capacity)
            .field("in_hand", &self.batch.len())
            .finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and nothing is left.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item, or a wake-up of `cx` when one is queued or the queue closes.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.batch.is_empty() {
            if self.batch.capacity() > KEEP_CAPACITY {
                self.batch = VecDeque::new();
            }
            let mut queued = self.shared.queued.lock();
            if queued.items.is_empty() {
                if queued.closed {
                    return Poll::Ready(None);
                }
                match &mut queued.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            // Everything queued, in one go; the queue gets this side's empty buffer.
            std::mem::swap(&mut queued.items, &mut self.batch);
            queued.in_hand_at_take = self.batch.len();
            self.shared
                .in_hand
                .store(self.batch.len(), Ordering::SeqCst);
        }
        let item = self.batch.pop_front();
        self.handed_out();
        Poll::Ready(item)
    }

    /// One item left this side: its room in the queue is free.
    fn handed_out(&self) {
        self.shared
            .in_hand
            .store(self.batch.len(), Ordering::SeqCst);
        if self.shared.room_wanted.load(Ordering::SeqCst) {
            self.shared.room_wanted.store(false, Ordering::SeqCst);
            self.shared.room.notify_waiters();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut queued = self.shared.queued.lock();
            queued.receiver_gone = true;
            std::mem::take(&mut queued.items)
        };
        // Dropped outside the lock; senders waiting for room learn it is gone.
        drop(items);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll<T>(rx: &mut Receiver<T>) -> Poll<Option<T>> {
        rx.poll_recv(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn items_come_out_in_order_and_the_queue_ends_with_its_last_sender() {
        let (tx, mut rx) = channel(8);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        tx2.try_send(2).unwrap();
        assert_eq!(poll(&mut rx), Poll::Ready(Some(1)));
        tx.try_send(3).unwrap();
        assert_eq!(poll(&mut rx), Poll::Ready(Some(2)));
        assert_eq!(poll(&mut rx), Poll::Ready(Some(3)));
        assert_eq!(poll(&mut rx), Poll::Pending);
        drop(tx);
        assert_eq!(poll(&mut rx), Poll::Pending, "one sender is left");
        tx2.try_send(4).unwrap();
        drop(tx2);
        assert_eq!(
            poll(&mut rx),
            Poll::Ready(Some(4)),
            "queued before the close"
        );
        assert_eq!(poll(&mut rx), Poll::Ready(None));
    }

    #[test]
    fn items_taken_out_but_not_handed_out_count_against_the_capacity() {
        let (tx, mut rx) = channel(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        // The receiver takes all three out and hands one out: one place is free.
        assert_eq!(poll(&mut rx), Poll::Ready(Some(0)));
        tx.try_send(3).unwrap();
        assert_eq!(tx.try_send(4), Err(TrySendError::Full(4)));
        assert_eq!(poll(&mut rx), Poll::Ready(Some(1)));
        assert_eq!(poll(&mut rx), Poll::Ready(Some(2)));
        tx.try_send(4).unwrap();
        tx.try_send(5).unwrap();
        assert_eq!(tx.try_send(6), Err(TrySendError::Full(6)));
        for i in 3..6 {
            assert_eq!(poll(&mut rx), Poll::Ready(Some(i)));
        }
        assert_eq!(poll(&mut rx), Poll::Pending);
    }

    #[test]
    fn sending_all_queues_what_fits_and_gives_back_the_first_that_does_not() {
        let (tx, mut rx) = channel(3);
        tx.try_send(0).unwrap();
        let mut items = 1..6;
        let sent = tx.try_send_all(&mut items);
        assert_eq!(sent.sent, 2);
        assert_eq!(sent.refused, Some(TrySendError::Full(3)));
        assert_eq!(items.collect::<Vec<_>>(), vec![4, 5], "the rest stay");
        for i in 0..3 {
            assert_eq!(poll(&mut rx), Poll::Ready(Some(i)));
        }
        let sent = tx.try_send_all(&mut (6..8));
        assert_eq!((sent.sent, sent.refused), (2, None));
        drop(rx);
        let sent = tx.try_send_all(&mut (8..9));
        assert_eq!(
            (sent.sent, sent.refused),
            (0, Some(TrySendError::Closed(8)))
        );
    }

    #[test]
    fn a_dropped_receiver_refuses_items_and_frees_what_was_queued() {
        let (tx, rx) = channel(4);
        let held = Arc::new(());
        tx.try_send(held.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&held), 1, "the queued item was dropped");
        assert!(matches!(tx.try_send(held), Err(TrySendError::Closed(_))));
    }

    /// A queue whose receiver polled it empty, and the flag its waker sets.
    fn waiting_receiver() -> (Sender<u8>, Receiver<u8>, Arc<Flag>) {
        let (tx, mut rx) = channel::<u8>(4);
        let woken = Arc::new(Flag::default());
        let waker = Waker::from(woken.clone());
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        assert!(!woken.0.load(Ordering::SeqCst));
        (tx, rx, woken)
    }

    #[test]
    fn a_queued_item_wakes_the_waiting_receiver() {
        let (tx, mut rx, woken) = waiting_receiver();
        tx.try_send(7).unwrap();
        assert!(woken.0.load(Ordering::SeqCst));
        assert_eq!(poll(&mut rx), Poll::Ready(Some(7)));
    }

    #[test]
    fn the_last_sender_leaving_wakes_the_waiting_receiver() {
        let (tx, mut rx, woken) = waiting_receiver();
        drop(tx);
        assert!(woken.0.load(Ordering::SeqCst));
        assert_eq!(poll(&mut rx), Poll::Ready(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waiting_for_room_gets_it_when_the_receiver_hands_an_item_out() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        let waiting = tokio::spawn(async move {
            let sent = tx.send_timeout(2, Duration::from_secs(60)).await;
            (sent, tx)
        });
        tokio::task::yield_now().await;
        assert_eq!(rx.recv().await, Some(1));
        let (sent, _tx) = waiting.await.unwrap();
        assert_eq!(sent, Ok(()));
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waiting_for_room_gives_up_after_its_timeout() {
        let (tx, _rx) = channel(1);
        tx.try_send(1).unwrap();
        let started = tokio::time::Instant::now();
        let sent = tx.send_timeout(2, Duration::from_millis(50)).await;
        assert_eq!(sent, Err(SendTimeoutError::Timeout(2)));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waiting_for_room_learns_the_receiver_left() {
        let (tx, rx) = channel(1);
        tx.try_send(1).unwrap();
        let waiting =
            tokio::spawn(async move { tx.send_timeout(2, Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(SendTimeoutError::Closed(2)));
    }

    #[test]
    fn many_senders_on_threads_lose_nothing_and_keep_each_senders_order() {
        const PER_SENDER: u64 = 20_000;
        let (tx, mut rx) = channel(64);
        let threads: Vec<_> = (0..3u64)
            .map(|s| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_SENDER {
                        let mut item = (s, i);
                        loop {
                            match tx.try_send(item) {
                                Ok(()) => break,
                                Err(TrySendError::Full(back)) => {
                                    item = back;
                                    std::thread::yield_now();
                                }
                                Err(TrySendError::Closed(_)) => panic!("receiver gone"),
                            }
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u64; 3];
        let mut received = 0;
        let mut most_in_hand = 0;
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            match rx.poll_recv(&mut cx) {
                Poll::Ready(Some((s, i))) => {
                    assert_eq!(i, next[s as usize], "sender {s} out of order");
                    next[s as usize] += 1;
                    received += 1;
                    most_in_hand = most_in_hand.max(rx.batch.len() + 1);
                }
                Poll::Ready(None) => break,
                Poll::Pending => std::thread::yield_now(),
            }
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(received, 3 * PER_SENDER);
        assert!(
            most_in_hand <= 64,
            "took {most_in_hand} out of a queue of 64"
        );
        println!("received {received} of {}, lost 0", 3 * PER_SENDER);
    }

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}
