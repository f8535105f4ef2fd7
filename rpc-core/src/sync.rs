//! Small synchronisation pieces used across courier: [`Latch`], a one-way flag that is
//! cheap to read and can be awaited, [`lock`], [`read`] and [`write`](fn@write), which go on
//! after a panic elsewhere, and [`sweep_deadlines`], one task's watch over many deadlines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A flag that goes from unset to set once, and stays set.
///
/// [`Latch::is_set`] is one atomic load: `CancellationToken::is_cancelled` takes the
/// token's mutex, which calls and sends on many tasks contended on when they checked it
/// on every operation. [`Latch::wait`] resolves once the latch is set.
///
/// ```
/// use rpc_core::sync::Latch;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let closed = Latch::new();
/// assert!(!closed.is_set());
/// closed.set();
/// assert!(closed.is_set());
/// closed.wait().await; // already set: resolves at once
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Latch {
    flag: AtomicBool,
    token: CancellationToken,
}

impl Latch {
    /// An unset latch.
    pub fn new() -> Self {
        Latch::default()
    }

    /// Sets the latch and wakes every waiter. Idempotent.
    pub fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the latch is set.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once the latch is set.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// A future that resolves once the latch is set, owning what it needs (to pin once
    /// and poll in a loop).
    pub fn wait_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }
}

/// A value on cache lines of its own. A value that every thread writes on every call
/// (an id counter, a lock, a count of queued bytes) makes each neighbour on its line a
/// cache miss for the other core's next read, though nobody wrote that neighbour
/// (false sharing). 128 bytes: x86 fetches lines in adjacent pairs.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CacheLine<T>(pub(crate) T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Locks `mutex`, going on after a panic in another holder. Every map and state courier
/// keeps behind a mutex is changed by single inserts, removals and replacements, never
/// left half-done, so a poisoned lock still guards a consistent value.
///
/// ```
/// use std::sync::Mutex;
/// let m = Mutex::new(1);
/// *rpc_core::sync::lock(&m) += 1;
/// assert_eq!(*rpc_core::sync::lock(&m), 2);
/// ```
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks `lock`, going on after a panic elsewhere (see [`lock`]).
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks `lock`, going on after a panic elsewhere (see [`lock`]).
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Watches many deadlines with one task and one timer, instead of a timer for each: the
/// loop of an RPC client connection's and a bus inbox's deadline sweeper. Until `next`
/// says to stop (`None`), it sleeps until the earliest deadline `next` gives (or `gap`
/// after the last sweep, if later; none: until woken), then calls `sweep` with the time
/// it woke at. `wake` is notified by whoever registers a deadline earlier than the one
/// last given (or wants `next` asked again); it is listened to before `next` is asked,
/// so such a deadline is not missed.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
/// use tokio::sync::Notify;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let start = Instant::now();
/// let deadlines = Arc::new(Mutex::new(vec![start + Duration::from_secs(2)]));
/// let wake = Arc::new(Notify::new());
/// let expired: Arc<Mutex<Vec<Instant>>> = Arc::default();
/// let sweeper = {
///     let (deadlines, wake, expired) = (deadlines.clone(), wake.clone(), expired.clone());
///     tokio::spawn(async move {
///         rpc_core::sync::sweep_deadlines(
///             &wake,
///             Duration::from_millis(1),
///             || {
///                 let deadlines = deadlines.lock().unwrap();
///                 // stop once every deadline passed
///                 (!deadlines.is_empty()).then(|| deadlines.iter().min().copied())
///             },
///             |now| {
///                 let mut deadlines = deadlines.lock().unwrap();
///                 expired.lock().unwrap().extend(deadlines.iter().filter(|at| **at <= now));
///                 deadlines.retain(|at| *at > now);
///             },
///         )
///         .await
///     })
/// };
/// tokio::task::yield_now().await; // the sweeper sleeps until the 2 s deadline
/// // an earlier deadline than the one slept for: the sweeper is woken for it
/// deadlines.lock().unwrap().push(start + Duration::from_secs(1));
/// wake.notify_one();
/// sweeper.await.unwrap();
/// let expired = expired.lock().unwrap();
/// assert_eq!(*expired, [start + Duration::from_secs(1), start + Duration::from_secs(2)]);
/// # }
/// ```
pub async fn sweep_deadlines(
    wake: &Notify,
    gap: Duration,
    mut next: impl FnMut() -> Option<Option<Instant>>,
    mut sweep: impl FnMut(Instant),
) {
    let mut not_before = Instant::now();
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match next() {
            None => return,
            Some(Some(at)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.max(not_before)) => {}
                    _ = woken => continue,
                }
            }
            Some(None) => {
                woken.await;
                continue;
            }
        }
        let now = Instant::now();
        not_before = now + gap;
        sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_latch_is_set() {
        let latch = std::sync::Arc::new(Latch::new());
        let waiter = tokio::spawn({
            let latch = latch.clone();
            async move { latch.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        latch.set();
        waiter.await.unwrap();
        assert!(latch.is_set());
    }
}
