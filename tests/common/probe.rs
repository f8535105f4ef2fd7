//! The abort probe: how a test sees handlers start, finish or be aborted, and holds them
//! until it lets them go. One for every test service (the Lab, the generated Kv).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

/// What a handler did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Started(u64),
    Finished(u64),
    /// Dropped before it finished: aborted by a cancel, a deadline or a shutdown.
    Aborted(u64),
}

/// A probe's two sides: the handlers report to the [`Reporter`], the test reads the
/// [`Probe`].
pub fn probe() -> (Reporter, Probe) {
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    (
        Reporter {
            events: tx,
            gate: gate.clone(),
        },
        Probe { events: rx, gate },
    )
}

/// The handlers' side of a probe.
#[derive(Clone, Debug)]
pub struct Reporter {
    events: mpsc::UnboundedSender<Event>,
    gate: Arc<Semaphore>,
}

impl Default for Reporter {
    /// A reporter nobody reads, for services whose test does not watch their handlers.
    fn default() -> Self {
        probe().0
    }
}

impl Reporter {
    /// Runs `work` as handler `tag`: reports `Started` now, then `Finished` when `work`
    /// completes, or `Aborted` if it is dropped before.
    pub async fn watch<F: Future>(&self, tag: u64, work: F) -> F::Output {
        let watch = Watch::start(tag, &self.events);
        let out = work.await;
        watch.finish();
        out
    }

    /// Waits for a permit of the gate ([`Probe::release`]).
    pub async fn held(&self) {
        self.gate.acquire().await.expect("gate closed").forget();
    }
}

/// The test's side of a probe.
#[derive(Debug)]
pub struct Probe {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub gate: Arc<Semaphore>,
}

impl Probe {
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(30), self.events.recv())
            .await
            .expect("no handler event within 30 s")
            .expect("reporter dropped")
    }

    /// Lets `n` held handlers go on.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

/// Reports `Aborted` when dropped before `finish`.
struct Watch {
    tag: u64,
    events: mpsc::UnboundedSender<Event>,
    done: bool,
}

impl Watch {
    fn start(tag: u64, events: &mpsc::UnboundedSender<Event>) -> Self {
        let _ = events.send(Event::Started(tag));
        Watch {
            tag,
            events: events.clone(),
            done: false,
        }
    }

    fn finish(mut self) {
        self.done = true;
        let _ = self.events.send(Event::Finished(self.tag));
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.events.send(Event::Aborted(self.tag));
        }
    }
}
