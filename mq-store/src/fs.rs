//! The file operations the store needs, behind a small trait.
//!
//! [`OsFs`] is the real file system; [`MemFs`] keeps files in memory (memory storage:
//! the same engine, no files); [`crate::fault::SimFs`] simulates a disk for tests: it
//! injects write and fsync errors, fills up, and loses what was not fsynced.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// A directory tree the store keeps its files in.
pub trait Fs: Send + Sync + fmt::Debug + 'static {
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and writing; with `create`, creates it and fails with
    /// `AlreadyExists` if it is there.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Renames a file or directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes `dir`'s entries durable: needed after creating, renaming or removing a file.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on the file `path` (created if missing) for as long as
    /// the returned guard lives; fails with `WouldBlock` if another holder has it. A
    /// file system no other process can see needs none: the default takes none.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let _ = path;
        Ok(Box::new(()))
    }
}

/// What [`Fs::lock`] returns: the lock is held until it is dropped.
pub trait LockGuard: Send + Sync + fmt::Debug {}

impl<T: Send + Sync + fmt::Debug> LockGuard for T {}

/// An open file, read and written at explicit offsets.
#[allow(clippy::len_without_is_empty)] // a fallible length; `len()? == 0` reads as well
pub trait File: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;

    /// Reads exactly `buf.len()` bytes at `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsFs;

#[derive(Debug)]
struct OsFile(std::fs::File);

impl Fs for OsFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        Ok(Arc::new(OsFile(file)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(dir)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::fs::File::open(dir)?.sync_all()
        }
        #[cfg(not(unix))]
        {
            let _ = dir; // directory entries cannot be synced apart from files here
            Ok(())
        }
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn LockGuard>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

impl File for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
        }
        #[cfg(windows)]
        {
            std::os::windows::fs::FileExt::seek_read(&self.0, buf, offset)
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
        }
        #[cfg(windows)]
        {
            let (mut buf, mut offset) = (buf, offset);
            while !buf.is_empty() {
                let n = std::os::windows::fs::FileExt::seek_write(&self.0, buf, offset)?;
                buf = &buf[n..];
                offset += n as u64;
            }
            Ok(())
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

/// Files kept in memory: memory storage, lost when the process ends.
///
/// ```
/// use std::path::Path;
/// use mq_store::fs::{Fs, MemFs};
/// let fs = MemFs::default();
/// fs.create_dir_all(Path::new("/s")).unwrap();
/// let file = fs.open(Path::new("/s/a"), true).unwrap();
/// file.write_all_at(b"hello", 0).unwrap();
/// assert_eq!(file.len().unwrap(), 5);
/// assert_eq!(fs.list(Path::new("/s")).unwrap(), vec!["a".to_string()]);
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemFs {
    entries: Arc<Mutex<BTreeMap<PathBuf, Entry>>>,
}

#[derive(Clone, Debug)]
enum Entry {
    Dir,
    File(Arc<MemFile>),
}

/// A file of a [`MemFs`].
#[derive(Debug, Default)]
struct MemFile {
    data: Mutex<Vec<u8>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: not found", path.display()),
    )
}

impl MemFs {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Fs for MemFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut entries = self.lock();
        for dir in dir.ancestors() {
            if !dir.as_os_str().is_empty() {
                entries.entry(dir.to_owned()).or_insert(Entry::Dir);
            }
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let entries = self.lock();
        if !matches!(entries.get(dir), Some(Entry::Dir)) {
            return Err(not_found(dir));
        }
        Ok(entries
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let mut entries = self.lock();
        match entries.get(path) {
            Some(_) if create => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists already", path.display()),
            )),
            Some(Entry::File(file)) => Ok(file.clone()),
            Some(Entry::Dir) => Err(io::Error::other(format!(
                "{} is a directory",
                path.display()
            ))),
            None if create => {
                let parent = path.parent().unwrap_or(Path::new(""));
                if !matches!(entries.get(parent), Some(Entry::Dir)) {
                    return Err(not_found(parent));
                }
                let file = Arc::new(MemFile::default());
                entries.insert(path.to_owned(), Entry::File(file.clone()));
                Ok(file)
            }
            None => Err(not_found(path)),
        }
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        match self.lock().remove(path) {
            Some(_) => Ok(()),
            None => Err(not_found(path)),
        }
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut entries = self.lock();
        if entries.remove(dir).is_none() {
            return Err(not_found(dir));
        }
        entries.retain(|path, _| !path.starts_with(dir));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut entries = self.lock();
        let moved: Vec<PathBuf> = entries
            .keys()
            .filter(|path| path.starts_with(from))
            .cloned()
            .collect();
        if moved.is_empty() {
            return Err(not_found(from));
        }
        for path in moved {
            let entry = entries.remove(&path).expect("listed above");
            let rest = path.strip_prefix(from).expect("listed above");
            entries.insert(to.join(rest), entry);
        }
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

impl MemFile {
    fn data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl File for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.data();
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data();
        let end = offset as usize + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data().resize(len as usize, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data().len() as u64)
    }
}
