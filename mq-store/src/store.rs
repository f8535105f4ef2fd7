//! The store: a directory (or memory) holding streams, each in a directory of its own.
//!
//! ```text
//! <root>/streams/<name>/00000000000000000001.log   segments, named by first sequence
//! <root>/streams/<name>/00000000000000004097.log
//! <root>/streams/<name>/consumers/<consumer>.con  a durable consumer's state
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;

use crate::clock::{Clock, SystemClock};
use crate::config::StreamConfig;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerInfo};
use crate::error::StoreError;
use crate::fs::{Fs, MemFs, OsFs};
use crate::stream::{Stream, StreamInfo};

/// The file in a store's directory that one store at a time holds a lock on.
pub const LOCK_FILE: &str = "LOCK";

/// Streams kept in a directory, or in memory; clones share them.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use mq_store::{Publish, Store, StreamConfig};
/// let store = Store::memory();
/// let orders = store.create(StreamConfig::new("ORDERS", ["orders.>"])).unwrap();
/// let ack = orders.publish("orders.eu", &[], b"one", &Publish::default()).await.unwrap().await.unwrap();
/// assert_eq!((ack.stream.as_str(), ack.seq, ack.duplicate), ("ORDERS", 1, false));
/// assert_eq!(orders.get(1).unwrap().payload, &b"one"[..]);
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    fs: Arc<dyn Fs>,
    streams_dir: PathBuf,
    clock: Arc<dyn Clock>,
    streams: RwLock<BTreeMap<String, Stream>>,
    /// Streams whose files could not be opened, and why: their names stay taken
    /// until they are deleted.
    broken: Mutex<BTreeMap<String, StoreError>>,
    /// Held while streams are created, updated or deleted: one at a time.
    admin: Mutex<()>,
    /// The directory's lock, released when the store (and so every stream) is closed.
    _lock: Box<dyn crate::fs::LockGuard>,
    /// Raised by a stream whose configuration recovery changed: re-route.
    stale: Arc<AtomicBool>,
    /// (filter, stream) for every subject of every stream, to route publishes.
    routes: RwLock<Vec<(String, Stream)>>,
    /// Told of every dead letter (the bus hands them to its subscribers).
    dead_letters: RwLock<Option<Observer>>,
}

/// What [`Store::observe_dead_letters`] calls with each dead letter: its subject,
/// headers and payload.
pub type DeadLetterObserver = Arc<dyn Fn(&str, &[(&str, &[u8])], &Bytes) + Send + Sync>;

#[derive(Clone)]
struct Observer(DeadLetterObserver);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadLetterObserver")
    }
}

/// A consumer's way back to its store (for dead letters), which it does not keep
/// open.
#[derive(Clone, Debug)]
pub(crate) struct StoreRef(Weak<Inner>);

impl StoreRef {
    pub(crate) fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let streams = self.streams.get_mut().unwrap_or_else(|e| e.into_inner());
        for stream in streams.values() {
            stream.close();
        }
    }
}

impl Store {
    /// Opens (or creates) a store in `dir` on the real file system, recovering every
    /// stream in it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(Arc::new(OsFs), dir.as_ref(), Arc::new(SystemClock))
    }

    /// A store in memory: the same engine over files that live in memory.
    pub fn memory() -> Store {
        Store::open_with(
            Arc::new(MemFs::default()),
            Path::new("/memory"),
            Arc::new(SystemClock),
        )
        .expect("a memory store opens")
    }

    /// Opens a store on any file system (a fault-injecting one in tests) and clock.
    pub fn open_with(
        fs: Arc<dyn Fs>,
        dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Store, StoreError> {
        let streams_dir = dir.join("streams");
        fs.create_dir_all(&streams_dir)
            .and_then(|()| fs.sync_dir(dir))
            .map_err(|e| StoreError::io("create directory", &streams_dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
            && let Err(e) = fs.sync_dir(parent)
        {
            // the store's own directory entry, if it was just created; a parent that
            // cannot be opened (no read permission) is not a reason to refuse
            tracing::warn!(dir = %parent.display(), "syncing the store's parent directory: {e}");
        }
        // One store per directory: two would write the same segments.
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs.lock(&lock_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => StoreError::Locked(dir.to_owned()),
            _ => StoreError::io("lock", &lock_path, e),
        })?;
        let mut streams = BTreeMap::new();
        let mut broken = BTreeMap::new();
        let mut names = fs
            .list(&streams_dir)
            .map_err(|e| StoreError::io("list", &streams_dir, e))?;
        names.sort();
        for name in names {
            let path = streams_dir.join(&name);
            if name.ends_with(".deleted") {
                // (no early return from here on: streams opened already would be left
                // running without the directory's lock)
                if let Err(e) = fs.remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), "removing a deleted stream's files: {e}");
                }
                continue;
            }
            if crate::config::validate_name(&name).is_err() {
                tracing::warn!(path = %path.display(), "ignoring an entry that is not a stream");
                continue;
            }
            match Stream::open(fs.clone(), path.clone(), clock.clone()) {
                Ok(Some(stream)) => {
                    streams.insert(name, stream);
                }
                Err(e) => {
                    // One stream that cannot be opened does not keep the others down.
                    tracing::error!(path = %path.display(), "stream `{name}` cannot be opened: {e}");
                    broken.insert(name, e);
                }
                Ok(None) => {
                    tracing::warn!(
                        path = %path.display(),
                        "a stream directory without a configuration record (its creation did not complete) is removed"
                    );
                    if let Err(e) = fs.remove_dir_all(&path) {
                        let e = StoreError::io("remove", &path, e);
                        tracing::error!("{e}");
                        broken.insert(name, e);
                    }
                }
            }
        }
        let store = Store {
            inner: Arc::new(Inner {
                fs,
                streams_dir,
                clock,
                streams: RwLock::new(streams),
                broken: Mutex::new(broken),
                _lock: lock,
                admin: Mutex::new(()),
                stale: Arc::new(AtomicBool::new(false)),
                routes: RwLock::new(Vec::new()),
                dead_letters: RwLock::new(None),
            }),
        };
        let opened: Vec<Stream> = store
            .inner
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for stream in &opened {
            store.open_consumers(stream);
        }
        for stream in store
            .inner
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            stream.watch_config(store.inner.stale.clone());
        }
        store.reroute();
        Ok(store)
    }

    fn reroute(&self) {
        let streams = self.inner.streams.read().unwrap_or_else(|e| e.into_inner());
        let routes = streams
            .values()
            .flat_map(|s| s.config().subjects.into_iter().map(move |f| (f, s.clone())))
            .collect();
        *self.inner.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
    }

    /// Refuses `config` if a subject of it overlaps one of another stream, as that
    /// stream is configured now (an update in flight included).
    fn check_overlap(&self, config: &StreamConfig) -> Result<(), StoreError> {
        let streams = self.inner.streams.read().unwrap_or_else(|e| e.into_inner());
        for other in streams.values().filter(|s| s.name() != config.name) {
            for filter in other.config().subjects {
                for subject in &config.subjects {
                    if crate::subject::overlaps(subject, &filter) {
                        return Err(StoreError::SubjectOverlap {
                            subject: subject.clone(),
                            other: other.name().to_owned(),
                            other_subject: filter,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates a stream; its files are durable when this returns. Creating one that
    /// exists with the same configuration returns it.
    pub fn create(&self, config: StreamConfig) -> Result<Stream, StoreError> {
        config.validate().map_err(StoreError::InvalidConfig)?;
        let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = self.broken(&config.name) {
            return Err(e);
        }
        let existing = self
            .inner
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&config.name)
            .cloned();
        if let Some(stream) = existing {
            return if stream.config() == config {
                Ok(stream)
            } else {
                Err(StoreError::StreamExists(config.name))
            };
        }
        self.check_overlap(&config)?;
        let dir = self.inner.streams_dir.join(&config.name);
        let fs = &self.inner.fs;
        let created = Stream::create(fs.clone(), dir.clone(), self.inner.clock.clone(), config)
            .and_then(|stream| match self.sync_streams_dir() {
                Ok(()) => Ok(stream),
                Err(e) => {
                    stream.close();
                    Err(e)
                }
            });
        let stream = match created {
            Ok(stream) => stream,
            Err(e) => {
                // nothing half-made stays behind to block a retry or come back later
                let _ = fs.remove_dir_all(&dir);
                let _ = self.sync_streams_dir();
                return Err(e);
            }
        };
        stream.watch_config(self.inner.stale.clone());
        self.inner
            .streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stream.name().to_owned(), stream.clone());
        self.reroute();
        Ok(stream)
    }

    /// Changes a stream's configuration; lowered limits apply at once.
    pub async fn update(&self, config: StreamConfig) -> Result<StreamInfo, StoreError> {
        config.validate().map_err(StoreError::InvalidConfig)?;
        let stream = self.stream(&config.name)?;
        stream.heal(true).await?;
        let settled = {
            // checked and applied under the admin lock: no create or update between
            // (the overlap check sees the stream's new subjects from here on)
            let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
            self.check_overlap(&config)?;
            stream.update_now(config)?
        };
        let fsync = stream.config().fsync;
        for consumer in stream.consumers().values() {
            consumer.set_fsync(fsync);
        }
        let settled = stream.settle(settled).await;
        self.reroute(); // to the subjects the update left in force, whether or not it held
        settled?;
        Ok(stream.info())
    }

    /// Why the stream named `name` could not be opened, if it could not.
    fn broken(&self, name: &str) -> Option<StoreError> {
        let broken = self.inner.broken.lock().unwrap_or_else(|e| e.into_inner());
        broken.get(name).cloned()
    }

    /// Deletes a stream and its files; also one whose files could not be opened.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self
            .inner
            .streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let dir = match removed {
            Some(stream) => {
                self.reroute();
                stream.close();
                stream.dir().to_owned()
            }
            None => {
                let broken = self.inner.broken.lock().unwrap_or_else(|e| e.into_inner());
                if !broken.contains_key(name) {
                    return Err(StoreError::StreamNotFound(name.to_owned()));
                }
                self.inner.streams_dir.join(name)
            }
        };
        let fs = &self.inner.fs;
        let nanos = self.inner.clock.now();
        let gone = self
            .inner
            .streams_dir
            .join(format!("{name}.{nanos}.deleted"));
        fs.rename(&dir, &gone)
            .map_err(|e| StoreError::io("rename", &dir, e))?;
        // its files are out of the way: the name is free (if it was a broken stream's)
        self.inner
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.sync_streams_dir()?;
        fs.remove_dir_all(&gone)
            .map_err(|e| StoreError::io("remove", &gone, e))?;
        self.sync_streams_dir()
    }

    fn sync_streams_dir(&self) -> Result<(), StoreError> {
        let dir = &self.inner.streams_dir;
        self.inner
            .fs
            .sync_dir(dir)
            .map_err(|e| StoreError::io("sync directory", dir, e))
    }

    /// The stream named `name`; for a stream whose files could not be opened, why.
    pub fn stream(&self, name: &str) -> Result<Stream, StoreError> {
        if let Some(e) = self.broken(name) {
            return Err(e);
        }
        self.inner
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::StreamNotFound(name.to_owned()))
    }

    /// Every stream's configuration and counts, by name.
    pub fn list(&self) -> Vec<StreamInfo> {
        let streams = self.inner.streams.read().unwrap_or_else(|e| e.into_inner());
        streams.values().map(Stream::info).collect()
    }

    /// The stream that captures `subject`, if any.
    pub fn stream_for(&self, subject: &str) -> Option<Stream> {
        // (per captured publish: a plain load, the swap only when it is raised)
        let stale = &self.inner.stale;
        if stale.load(Ordering::Relaxed) && stale.swap(false, Ordering::AcqRel) {
            self.reroute();
        }
        let routes = self.inner.routes.read().unwrap_or_else(|e| e.into_inner());
        routes
            .iter()
            .find(|(filter, _)| crate::subject::matches(filter, subject))
            .map(|(_, stream)| stream.clone())
    }

    /// Opens the durable consumers of `stream`; one that cannot be opened is logged
    /// and left on disk, and the others go on.
    fn open_consumers(&self, stream: &Stream) {
        let dir = stream.dir().join("consumers");
        let Ok(mut names) = self.inner.fs.list(&dir) else {
            return; // none yet
        };
        names.sort();
        for name in names {
            let path = dir.join(&name);
            if name.ends_with(".con.new") {
                let _ = self.inner.fs.remove_file(&path); // a compaction that did not finish
                continue;
            }
            if !name.ends_with(".con") {
                continue; // kept aside, or not ours
            }
            match Consumer::open(stream, self.weak(), &path) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::warn!(path = %path.display(), "removing a consumer whose creation did not complete");
                    let _ = self.inner.fs.remove_file(&path);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "consumer cannot be opened: {e}");
                }
            }
        }
    }

    fn weak(&self) -> StoreRef {
        StoreRef(Arc::downgrade(&self.inner))
    }

    /// Creates a consumer on stream `stream`, or returns the durable one of that name
    /// if its configuration is the same. A durable consumer's state file is durable
    /// when this returns.
    pub fn create_consumer(
        &self,
        stream: &str,
        config: ConsumerConfig,
    ) -> Result<Consumer, StoreError> {
        // under the admin lock: the stream cannot be deleted (or replaced) meanwhile
        let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        let stream = self.stream(stream)?;
        Consumer::create(&stream, self.weak(), config)
    }

    /// The durable consumer `name` of stream `stream`.
    pub fn consumer(&self, stream: &str, name: &str) -> Result<Consumer, StoreError> {
        let s = self.stream(stream)?;
        let found = s.consumers().get(name).cloned();
        found.ok_or_else(|| StoreError::ConsumerNotFound {
            stream: stream.to_owned(),
            consumer: name.to_owned(),
        })
    }

    /// Every durable consumer of stream `stream`, by name.
    pub fn consumers(&self, stream: &str) -> Result<Vec<ConsumerInfo>, StoreError> {
        let s = self.stream(stream)?;
        let consumers: Vec<Consumer> = s.consumers().values().cloned().collect();
        Ok(consumers.iter().map(Consumer::info).collect())
    }

    /// Deletes a durable consumer and its state file.
    pub fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), StoreError> {
        let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.stream(stream)?;
        let removed = s.consumers().remove(name);
        let dir = s.dir().join("consumers");
        let path = dir.join(format!("{name}.con"));
        match removed {
            Some(consumer) => consumer.close(),
            // one whose state file could not be opened is deleted too
            None if crate::config::validate_name(name).is_ok()
                && self.inner.fs.open(&path, false).is_ok() => {}
            None => {
                return Err(StoreError::ConsumerNotFound {
                    stream: stream.to_owned(),
                    consumer: name.to_owned(),
                });
            }
        }
        self.inner
            .fs
            .remove_file(&path)
            .map_err(|e| StoreError::io("remove", &path, e))?;
        self.inner
            .fs
            .sync_dir(&dir)
            .map_err(|e| StoreError::io("sync directory", &dir, e))
    }

    /// Calls `observer` with every dead letter any consumer publishes (whether or not
    /// a stream stores it): the bus hands them to its subscribers.
    pub fn observe_dead_letters(&self, observer: DeadLetterObserver) {
        *self
            .inner
            .dead_letters
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Observer(observer));
    }

    pub(crate) fn observe_dead_letter(
        &self,
        subject: &str,
        headers: &[(&str, &[u8])],
        payload: &Bytes,
    ) {
        let observer = self
            .inner
            .dead_letters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(Observer(observer)) = observer {
            observer(subject, headers, payload);
        }
    }

    /// Whether the store has no stream (so no publish needs routing).
    pub fn is_empty(&self) -> bool {
        self.inner
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}
