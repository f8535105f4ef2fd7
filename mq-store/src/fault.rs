//! A simulated disk for fault tests: write and fsync errors, a full disk, and power loss.
//!
//! [`SimFs`] keeps two images of every file: what was written, and what an `fsync`
//! made durable. [`SimFs::power_loss`] throws away everything not made durable: bytes
//! written but not synced, and files created or removed without a directory sync. It
//! can also tear the first page past the durable end, keeping some of its 512-byte
//! sectors and garbage in the rest, as a disk that lost power mid-write does.
//!
//! Directories themselves are taken as durable once created.
//!
//! A hook ([`SimFs::set_hook`]) sees every operation that changes the disk just
//! before it is made: tests use it to crash at any one of them, to take the disk as a
//! killed process leaves it at a given moment, to record their order, or to hold the
//! caller inside a write.
//!
//! ```
//! use std::path::Path;
//! use mq_store::fault::SimFs;
//! use mq_store::fs::Fs;
//! let fs = SimFs::default();
//! fs.create_dir_all(Path::new("/d")).unwrap();
//! let file = fs.open(Path::new("/d/f"), true).unwrap();
//! file.write_all_at(b"synced", 0).unwrap();
//! file.sync_data().unwrap();
//! fs.sync_dir(Path::new("/d")).unwrap();
//! file.write_all_at(b" and not", 6).unwrap();
//! let after = fs.power_loss(None);
//! let file = after.open(Path::new("/d/f"), false).unwrap();
//! assert_eq!(file.len().unwrap(), 6);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::fs::{File, Fs};

/// A simulated disk; clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimFs {
    disk: Arc<Disk>,
}

/// An operation that changes a [`SimFs`], as its hook sees it, just before it is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SimOp<'a> {
    /// `create_dir_all`.
    CreateDir(&'a Path),
    /// `open` of a new file.
    Create(&'a Path),
    /// `remove_file`.
    Remove(&'a Path),
    /// `remove_dir_all`.
    RemoveDir(&'a Path),
    /// `rename(from, to)`.
    Rename(&'a Path, &'a Path),
    /// `sync_dir`.
    SyncDir(&'a Path),
    /// A write to a file.
    Write,
    /// An `fsync` of a file.
    Sync,
    /// A file's length set.
    SetLen,
}

/// What [`SimFs::set_hook`] takes: called with the disk and the operation about to be
/// made on it.
pub type Hook = Arc<dyn Fn(&SimFs, SimOp<'_>) + Send + Sync>;

#[derive(Default)]
struct HookSlot(Mutex<Option<Hook>>);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = lock(&self.0).is_some();
        f.debug_struct("Hook").field("set", &set).finish()
    }
}

#[derive(Debug, Default)]
struct Disk {
    state: Mutex<DiskState>,
    hook: HookSlot,
    writes: AtomicU64,
    syncs: AtomicU64,
    dir_syncs: AtomicU64,
    bytes_read: AtomicU64,
}

#[derive(Debug, Default)]
struct DiskState {
    dirs: BTreeSet<PathBuf>,
    files: BTreeMap<PathBuf, Arc<SimFile>>,
    durable_files: BTreeMap<PathBuf, Arc<SimFile>>,
    write_error: Option<io::ErrorKind>,
    sync_error: bool,
    dir_sync_error: bool,
    capacity: Option<u64>,
}

#[derive(Debug)]
struct SimFile {
    disk: std::sync::Weak<Disk>,
    data: Mutex<FileData>,
}

#[derive(Debug, Default)]
struct FileData {
    current: Vec<u8>,
    durable: Vec<u8>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: not found", path.display()),
    )
}

impl SimFs {
    fn state(&self) -> MutexGuard<'_, DiskState> {
        lock(&self.disk.state)
    }

    /// Calls `hook` just before every operation that changes this disk (`None`: no
    /// hook). The hook may inspect or snapshot the disk, or block.
    ///
    /// ```
    /// use std::path::Path;
    /// use std::sync::{Arc, Mutex};
    /// use mq_store::fault::{SimFs, SimOp};
    /// use mq_store::fs::Fs;
    /// let fs = SimFs::default();
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// fs.set_hook(Some(Arc::new(move |_: &SimFs, op: SimOp<'_>| {
    ///     log.lock().unwrap().push(format!("{op:?}"));
    /// })));
    /// fs.create_dir_all(Path::new("/d")).unwrap();
    /// fs.sync_dir(Path::new("/d")).unwrap();
    /// assert_eq!(*seen.lock().unwrap(), ["CreateDir(\"/d\")", "SyncDir(\"/d\")"]);
    /// ```
    pub fn set_hook(&self, hook: Option<Hook>) {
        *lock(&self.disk.hook.0) = hook;
    }

    fn before(&self, op: SimOp<'_>) {
        before(&self.disk, op);
    }

    /// From now on every write fails with `kind` (`None`: writes succeed again).
    pub fn fail_writes(&self, kind: Option<io::ErrorKind>) {
        self.state().write_error = kind;
    }

    /// From now on every `fsync` fails (`false`: they succeed again).
    pub fn fail_syncs(&self, fail: bool) {
        self.state().sync_error = fail;
    }

    /// From now on every directory sync fails (`false`: they succeed again); file
    /// syncs are not affected.
    pub fn fail_dir_syncs(&self, fail: bool) {
        self.state().dir_sync_error = fail;
    }

    /// Limits the bytes all files may hold together; a write past it stores what fits
    /// and fails with `StorageFull`. `None` removes the limit.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.state().capacity = capacity;
    }

    /// The bytes all files hold now.
    pub fn used(&self) -> u64 {
        let state = self.state();
        state
            .files
            .values()
            .map(|f| lock(&f.data).current.len() as u64)
            .sum()
    }

    /// How many bytes were read from files so far.
    pub fn bytes_read(&self) -> u64 {
        self.disk.bytes_read.load(Ordering::Relaxed)
    }

    /// How many writes, file syncs and directory syncs were made so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.disk.writes.load(Ordering::Relaxed),
            self.disk.syncs.load(Ordering::Relaxed),
            self.disk.dir_syncs.load(Ordering::Relaxed),
        )
    }

    /// Loses power: returns the disk as it comes back, with every file at its last
    /// synced bytes, and files whose directory entry was not synced gone (or back, if
    /// their removal was not synced). `self` is left as it was, so that a store still
    /// running on it cannot change what survived; drop it and open a store on the
    /// returned disk.
    ///
    /// With `tear: Some(seed)`, the first 4 KiB page past each file's durable end was
    /// being written: a prefix of its 512-byte sectors (chosen from `seed`) holds the
    /// new bytes and the rest of the page holds garbage.
    pub fn power_loss(&self, tear: Option<u64>) -> SimFs {
        let state = self.state();
        let after = SimFs::default();
        let mut seed = tear.unwrap_or(0);
        let mut files = BTreeMap::new();
        for (path, file) in &state.durable_files {
            let data = lock(&file.data);
            let durable = data.durable.clone();
            let mut image = durable.clone();
            if tear.is_some() && data.current.len() > durable.len() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let page_end = (durable.len() / 4096 + 1) * 4096;
                let sectors = (seed >> 33) as usize % 9; // 0..=8 sectors of 512 bytes
                let kept_end = (durable.len() / 512 + sectors) * 512;
                let kept_end = kept_end.clamp(durable.len(), page_end.min(data.current.len()));
                image.extend_from_slice(&data.current[durable.len()..kept_end]);
                let torn_end = page_end.min(data.current.len());
                image.extend((kept_end..torn_end).map(|i| (i as u8) ^ 0xA5));
            }
            let file = Arc::new(SimFile {
                disk: Arc::downgrade(&after.disk),
                data: Mutex::new(FileData {
                    current: image,
                    durable,
                }),
            });
            files.insert(path.clone(), file);
        }
        {
            let mut next = after.state();
            next.dirs = state.dirs.clone();
            next.durable_files = files.clone();
            next.files = files;
        }
        after
    }
}

/// Calls `disk`'s hook, if any, outside every lock of the disk.
fn before(disk: &Arc<Disk>, op: SimOp<'_>) {
    let hook = lock(&disk.hook.0).clone();
    if let Some(hook) = hook {
        hook(&SimFs { disk: disk.clone() }, op);
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.before(SimOp::CreateDir(dir));
        let mut state = self.state();
        for dir in dir.ancestors() {
            if !dir.as_os_str().is_empty() {
                state.dirs.insert(dir.to_owned());
            }
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state();
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let dirs = state.dirs.iter();
        let files = state.files.keys();
        Ok(dirs
            .chain(files)
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        if create {
            self.before(SimOp::Create(path));
        }
        let mut state = self.state();
        if let Some(file) = state.files.get(path) {
            if create {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists already", path.display()),
                ));
            }
            return Ok(file.clone());
        }
        if !create {
            return Err(not_found(path));
        }
        if !state.dirs.contains(path.parent().unwrap_or(Path::new(""))) {
            return Err(not_found(path));
        }
        if let Some(kind) = state.write_error {
            return Err(io::Error::new(
                kind,
                "cannot create a file (injected fault)",
            ));
        }
        let file = Arc::new(SimFile {
            disk: Arc::downgrade(&self.disk),
            data: Mutex::default(),
        });
        state.files.insert(path.to_owned(), file.clone());
        Ok(file)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.before(SimOp::Remove(path));
        match self.state().files.remove(path) {
            Some(_) => Ok(()),
            None => Err(not_found(path)),
        }
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.before(SimOp::RemoveDir(dir));
        let mut state = self.state();
        if !state.dirs.remove(dir) {
            return Err(not_found(dir));
        }
        state.dirs.retain(|path| !path.starts_with(dir));
        state.files.retain(|path, _| !path.starts_with(dir));
        // Removing a whole tree is taken as durable, as the store syncs its parent next.
        state.durable_files.retain(|path, _| !path.starts_with(dir));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.before(SimOp::Rename(from, to));
        let mut state = self.state();
        let state = &mut *state;
        let moved = |path: &Path| to.join(path.strip_prefix(from).expect("under `from`"));
        if state.dirs.contains(from) {
            // a directory: its entries move with it, durably (the store syncs the parent)
            let dirs: Vec<PathBuf> = state
                .dirs
                .iter()
                .filter(|p| p.starts_with(from))
                .cloned()
                .collect();
            for dir in dirs {
                state.dirs.remove(&dir);
                state.dirs.insert(moved(&dir));
            }
            for files in [&mut state.files, &mut state.durable_files] {
                let paths: Vec<PathBuf> = files
                    .keys()
                    .filter(|p| p.starts_with(from))
                    .cloned()
                    .collect();
                for path in paths {
                    let file = files.remove(&path).expect("listed");
                    files.insert(moved(&path), file);
                }
            }
            return Ok(());
        }
        let file = state.files.remove(from).ok_or_else(|| not_found(from))?;
        state.files.insert(to.to_owned(), file);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.before(SimOp::SyncDir(dir));
        self.disk.dir_syncs.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        if state.sync_error || state.dir_sync_error {
            return Err(io::Error::other("directory fsync failed (injected fault)"));
        }
        let current: Vec<(PathBuf, Arc<SimFile>)> = state
            .files
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .map(|(path, file)| (path.clone(), file.clone()))
            .collect();
        state
            .durable_files
            .retain(|path, _| path.parent() != Some(dir));
        state.durable_files.extend(current);
        Ok(())
    }
}

impl SimFile {
    fn disk(&self) -> io::Result<Arc<Disk>> {
        self.disk
            .upgrade()
            .ok_or_else(|| io::Error::other("the simulated disk is gone"))
    }
}

impl File for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = lock(&self.data);
        let start = (offset as usize).min(data.current.len());
        let n = buf.len().min(data.current.len() - start);
        buf[..n].copy_from_slice(&data.current[start..start + n]);
        if let Ok(disk) = self.disk() {
            disk.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let disk = self.disk()?;
        before(&disk, SimOp::Write);
        disk.writes.fetch_add(1, Ordering::Relaxed);
        let (error, capacity, used) = {
            let state = lock(&disk.state);
            let used: u64 = match state.capacity {
                Some(_) => state
                    .files
                    .values()
                    .filter(|f| !std::ptr::eq(Arc::as_ptr(f), self))
                    .map(|f| lock(&f.data).current.len() as u64)
                    .sum(),
                None => 0,
            };
            (state.write_error, state.capacity, used)
        };
        if let Some(kind) = error {
            return Err(io::Error::new(kind, "write failed (injected fault)"));
        }
        let mut data = lock(&self.data);
        let end = offset as usize + buf.len();
        let mut fits = buf.len();
        if let Some(capacity) = capacity {
            let room = capacity.saturating_sub(used) as usize;
            if end.max(data.current.len()) > room {
                fits = room.saturating_sub(offset as usize).min(buf.len());
            }
        }
        let end_written = offset as usize + fits;
        if data.current.len() < end_written {
            data.current.resize(end_written, 0);
        }
        data.current[offset as usize..end_written].copy_from_slice(&buf[..fits]);
        if fits < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (simulated)",
            ));
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let disk = self.disk()?;
        before(&disk, SimOp::Sync);
        disk.syncs.fetch_add(1, Ordering::Relaxed);
        if lock(&disk.state).sync_error {
            return Err(io::Error::other("fsync failed (injected fault)"));
        }
        let mut data = lock(&self.data);
        data.durable = data.current.clone();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if let Ok(disk) = self.disk() {
            before(&disk, SimOp::SetLen);
        }
        lock(&self.data).current.resize(len as usize, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).current.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_bytes_and_unsynced_files_are_lost_on_power_loss() {
        let fs = SimFs::default();
        fs.create_dir_all(Path::new("/d")).unwrap();
        let kept = fs.open(Path::new("/d/kept"), true).unwrap();
        fs.sync_dir(Path::new("/d")).unwrap();
        let lost = fs.open(Path::new("/d/lost"), true).unwrap();
        kept.write_all_at(&[1; 5000], 0).unwrap();
        kept.sync_data().unwrap();
        kept.write_all_at(&[2; 5000], 5000).unwrap();
        lost.write_all_at(&[3; 10], 0).unwrap();
        lost.sync_data().unwrap();
        let fs = fs.power_loss(Some(7));
        assert_eq!(fs.list(Path::new("/d")).unwrap(), vec!["kept".to_string()]);
        let kept = fs.open(Path::new("/d/kept"), false).unwrap();
        let len = kept.len().unwrap();
        assert!((5000..=8192).contains(&len), "torn within one page: {len}");
        let mut head = vec![0; 5000];
        kept.read_exact_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|&b| b == 1));
    }

    #[test]
    fn a_full_disk_stores_what_fits_and_says_so() {
        let fs = SimFs::default();
        fs.create_dir_all(Path::new("/d")).unwrap();
        fs.set_capacity(Some(10));
        let file = fs.open(Path::new("/d/f"), true).unwrap();
        let err = file.write_all_at(&[0; 16], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(file.len().unwrap(), 10);
        fs.set_capacity(None);
        file.write_all_at(&[0; 16], 0).unwrap();
    }
}
