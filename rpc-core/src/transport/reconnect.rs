//! [`Backoff`] and [`reconnect`]: how every client (RPC, bus) gets a connection again.

use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff with jitter between reconnect attempts.
///
/// Attempt `n` (from 1) waits a random time between half and all of
/// `min(initial × multiplierⁿ⁻¹, max)`, so that many clients of one restarted server do
/// not reconnect in lockstep.
///
/// ```
/// use std::time::Duration;
/// use rpc_core::client::Backoff;
///
/// let mut backoff = Backoff::default();
/// backoff.initial = Duration::from_millis(100);
/// let third = backoff.delay(3);
/// assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// The first delay. Default 50 ms.
    pub initial: Duration,
    /// The largest delay. Default 5 s.
    pub max: Duration,
    /// Growth per attempt. Default 2.
    pub multiplier: u32,
    /// Give up after this many failed attempts in a row (`None`: never give up).
    /// Default `None`.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            multiplier: 2,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt` (counted from 1), jitter included.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .max(1)
            .saturating_pow(attempt.saturating_sub(1));
        let full = self.initial.saturating_mul(factor).min(self.max);
        // std's RandomState is seeded randomly per instance: enough randomness for jitter
        // without a dependency.
        let random = std::collections::hash_map::RandomState::new().hash_one(attempt);
        let half = full / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(random % spread.saturating_add(1))
    }

    /// Whether to stop after `failures` failed attempts in a row.
    pub(crate) fn exhausted(&self, failures: u32) -> bool {
        self.max_attempts.is_some_and(|max| failures >= max)
    }
}

/// How [`reconnect`] ended.
#[derive(Debug)]
pub enum Reconnected<T, E> {
    /// An attempt succeeded.
    Connected(T),
    /// `stop` was cancelled first.
    Stopped,
    /// [`Backoff::max_attempts`] attempts failed in a row; the last error.
    GaveUp(E),
}

/// Calls `attempt` until it succeeds: at once, then after each failure waits
/// [`Backoff::delay`] of the failures so far. `failed(error, failures, next_delay)` is
/// told about every failure (`next_delay` is `None` when giving up). Each success starts
/// the count afresh, since a caller calls this again for its next connection.
///
/// ```
/// use rpc_core::transport::{reconnect, Reconnected};
/// use rpc_core::client::Backoff;
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let mut tries = 0;
/// let outcome = reconnect(&Backoff::default(), &CancellationToken::new(), || {
///     tries += 1;
///     let n = tries;
///     async move { if n < 3 { Err("refused") } else { Ok(n) } }
/// }, |_, _, _| {}).await;
/// assert!(matches!(outcome, Reconnected::Connected(3)));
/// # }
/// ```
pub async fn reconnect<T, E, F, Fut>(
    backoff: &Backoff,
    stop: &CancellationToken,
    mut attempt: F,
    mut failed: impl FnMut(&E, u32, Option<Duration>),
) -> Reconnected<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            outcome = attempt() => outcome,
            _ = stop.cancelled() => return Reconnected::Stopped,
        };
        let error = match outcome {
            Ok(connected) => return Reconnected::Connected(connected),
            Err(error) => error,
        };
        failures = failures.saturating_add(1);
        if backoff.exhausted(failures) {
            failed(&error, failures, None);
            return Reconnected::GaveUp(error);
        }
        let delay = backoff.delay(failures);
        failed(&error, failures, Some(delay));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Reconnected::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stop_at_the_maximum() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
            ..Backoff::default()
        };
        for (attempt, full) in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (40, 100)] {
            let d = b.delay(attempt);
            let full = Duration::from_millis(full);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
    }

    #[test]
    fn max_attempts_bounds_the_retries() {
        let b = Backoff {
            max_attempts: Some(3),
            ..Backoff::default()
        };
        assert!(!b.exhausted(2));
        assert!(b.exhausted(3));
        assert!(!Backoff::default().exhausted(u32::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_gives_up_after_max_attempts_with_the_last_error() {
        let b = Backoff {
            max_attempts: Some(3),
            ..Backoff::default()
        };
        let mut seen = Vec::new();
        let mut n = 0;
        let outcome: Reconnected<(), u32> = reconnect(
            &b,
            &CancellationToken::new(),
            || {
                n += 1;
                let n = n;
                async move { Err(n) }
            },
            |e, failures, next| seen.push((*e, failures, next.is_some())),
        )
        .await;
        assert!(matches!(outcome, Reconnected::GaveUp(3)));
        assert_eq!(seen, [(1, 1, true), (2, 2, true), (3, 3, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_stops_when_told_to() {
        let stop = CancellationToken::new();
        stop.cancel();
        let outcome: Reconnected<(), ()> = reconnect(
            &Backoff::default(),
            &stop,
            std::future::pending,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(outcome, Reconnected::Stopped));
    }
}
