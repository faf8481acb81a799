//! File helpers (feature `std`): atomic save, load, stale temp-file cleanup.
//!
//! `save` writes a temporary file beside the target, fsyncs it, renames it
//! over the target and fsyncs the directory, so that a crash or power loss
//! at any moment leaves the old file or the new one, never a torn one. The
//! temporary name (`.NAME.tmp.PID.N`) is unique per process and call, so two
//! writers never share one; a writer killed mid-save leaves its temp file
//! behind, which `load` never reads and [`clean_temp_files`] removes.
//!
//! The std ↔ `embedded_io` bridge is a small wrapper of our own rather than
//! the `embedded-io-adapters` crate: it keeps the original `std::io::Error`
//! (for [`Error::Io`] with context) and needs no extra dependency.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{AdapterFile, Fail, corrupt, read, write};
use crate::error::{Error, Result};

/// Buffer size for file reads and writes.
const BUF: usize = 64 << 10;

/// A `std::io` stream seen as an `embedded_io` one.
struct StdIo<T>(T);

/// `std::io::Error` as an `embedded_io` error, kept whole for the caller.
#[derive(Debug)]
struct IoError(std::io::Error);

impl core::fmt::Display for IoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

impl core::error::Error for IoError {}

impl embedded_io::Error for IoError {
    fn kind(&self) -> embedded_io::ErrorKind {
        // Only `Fail::Io` carries this, and it is unwrapped to the real error
        // below; the kind is never consulted.
        embedded_io::ErrorKind::Other
    }
}

impl<T> embedded_io::ErrorType for StdIo<T> {
    type Error = IoError;
}

impl<T: std::io::Read> embedded_io::Read for StdIo<T> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r.map_err(IoError),
            }
        }
    }
}

impl<T: std::io::Write> embedded_io::Write for StdIo<T> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, IoError> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r.map_err(IoError),
            }
        }
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.0.flush().map_err(IoError)
    }
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The directory holding `path` (`.` for a bare file name) and the file name.
fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    let name = path.file_name().ok_or_else(|| Error::Io {
        context: format!("saving adapter file {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

fn temp_prefix(name: &std::ffi::OsStr) -> OsString {
    let mut s = OsString::from(".");
    s.push(name);
    s.push(".tmp.");
    s
}

/// Creates a fresh temporary file beside the target.
fn create_temp(path: &Path, dir: &Path, name: &std::ffi::OsStr) -> Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut tmp_name = temp_prefix(name);
        tmp_name.push(format!(
            "{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            // A stale file from an earlier process that had our pid: next number.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io_error(format!(
                    "saving adapter file {}: creating temporary file {}",
                    path.display(),
                    tmp.display()
                ))(e));
            }
        }
    }
}

pub(super) fn save(file: &AdapterFile, path: &Path) -> Result<()> {
    crate::output::check_kind(path)?;
    let (dir, name) = split(path)?;
    let (tmp, f) = create_temp(path, dir, name)?;
    let written = write_synced(file, f, &tmp).and_then(|()| {
        fs::rename(&tmp, path).map_err(io_error(format!(
            "renaming {} over adapter file {}",
            tmp.display(),
            path.display()
        )))
    });
    if let Err(e) = written {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)?;
    // Temporaries of saves that were killed before their rename.
    let _ = clean_temp_files(path);
    Ok(())
}

/// Writes, flushes and fsyncs the temporary file.
fn write_synced(file: &AdapterFile, f: File, tmp: &Path) -> Result<()> {
    let context = || format!("writing adapter file {}", tmp.display());
    let mut w = StdIo(BufWriter::with_capacity(BUF, f));
    write::write_file(file, &mut w).map_err(|e| match e {
        Fail::Io(IoError(source)) => Error::Io { context: context(), source },
        Fail::Format(e) => e,
    })?;
    let f =
        w.0.into_inner().map_err(|e| Error::Io { context: context(), source: e.into_error() })?;
    f.sync_all().map_err(io_error(format!("syncing adapter file {}", tmp.display())))
}

/// Makes the rename itself durable. Only POSIX systems can fsync a directory.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(format!("syncing directory {}", dir.display())))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

pub(super) fn load(path: &Path) -> Result<AdapterFile> {
    let f =
        File::open(path).map_err(io_error(format!("opening adapter file {}", path.display())))?;
    let len = f
        .metadata()
        .map_err(io_error(format!("reading metadata of adapter file {}", path.display())))?
        .len();
    let mut r = StdIo(BufReader::with_capacity(BUF, f));
    let (file, used) = read::read_file(&mut r, Some(len)).map_err(|e| match e {
        Fail::Io(IoError(source)) => {
            Error::Io { context: format!("reading adapter file {}", path.display()), source }
        }
        Fail::Format(Error::Corrupt(msg)) => corrupt(format!("{}: {msg}", path.display())),
        Fail::Format(e) => e,
    })?;
    if used != len {
        return Err(corrupt(format!(
            "{}: {} unexpected bytes after the checksum",
            path.display(),
            len - used
        )));
    }
    Ok(file)
}

/// Removes the temporary files that interrupted [`AdapterFile::save`]s to
/// `path` left behind (`.NAME.tmp.*` beside it) and returns how many.
///
/// Every save calls it after its rename. Temporaries of another process that
/// is still running (its id is in the name) are left alone; on systems
/// without `/proc` every other process is assumed alive, so only this
/// process's own leftovers go.
pub fn clean_temp_files(path: &Path) -> Result<usize> {
    let (dir, name) = split(path)?;
    let prefix = temp_prefix(name);
    let prefix = prefix.as_encoded_bytes();
    let entries = fs::read_dir(dir).map_err(io_error(format!("listing {}", dir.display())))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("listing {}", dir.display())))?;
        let file = entry.file_name();
        if let Some(rest) = file.as_encoded_bytes().strip_prefix(prefix) {
            // `PID.N`: another live process's save in progress is left alone.
            let pid = std::str::from_utf8(rest)
                .ok()
                .and_then(|r| r.split('.').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && crate::output::process_alive(p)) {
                continue;
            }
            let p = entry.path();
            match fs::remove_file(&p) {
                Ok(()) => removed += 1,
                // Another cleaner got there first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(format!("removing {}", p.display()))(e)),
            }
        }
    }
    Ok(removed)
}
