//! The one check every output path goes through before any work starts and
//! again at the atomic rename: the target must be a regular file or not exist
//! yet (never a directory, a device node, a FIFO or a socket, which a rename
//! would replace), must not be one of the run's inputs (the base model, the
//! adapter, the data), and its folder must take a new file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether process `pid` is running (Linux: `/proc`; elsewhere assumed so,
/// which only means a stale temporary file stays): the sweeps of killed
/// writers' temporaries leave a live process's alone.
pub(crate) fn process_alive(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new("/proc").join(pid.to_string()).exists()
}

fn refuse(path: &Path, why: impl Into<String>) -> Error {
    Error::Config(format!("refusing to write {}: {}", path.display(), why.into()))
}

/// Refuses `path` unless it is a regular file or absent, in an existing folder.
pub fn check_kind(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(refuse(path, "it is a directory")),
        Ok(m) if !m.is_file() => {
            Err(refuse(path, "it is not a regular file (a device, FIFO or socket)"))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io { context: format!("checking {}", path.display()), source: e }),
    }
}

/// `path` resolved: the file itself if it exists, else its folder resolved
/// and the name joined (two outputs that do not exist yet may still clash).
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(path.file_name()?))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((resolved(a), resolved(b)), (Some(a), Some(b)) if a == b)
}

/// Checks an output path before a command starts: its kind, that it is none
/// of `inputs`, and that its folder exists and accepts a new file (probed by
/// creating and removing one).
pub fn check_output(path: &Path, inputs: &[&Path]) -> Result<()> {
    check_kind(path)?;
    if let Some(i) = inputs.iter().find(|i| same_file(path, i)) {
        return Err(refuse(path, format!("it is an input of this command ({})", i.display())));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let probe = dir.join(format!(".hydra-edge-write-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Io {
            context: format!("cannot create files in {}", dir.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_directories_and_special_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("hydra-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("model.onnx");
        std::fs::write(&input, b"x").unwrap();
        assert!(check_output(&input, &[&input]).is_err());
        assert!(check_output(&dir.join("./model.onnx"), &[&input]).is_err());
        assert!(check_output(&dir, &[]).is_err());
        assert!(check_output(&dir.join("new.onnx"), &[&input]).is_ok());
        assert!(check_output(&dir.join("missing/new.onnx"), &[]).is_err());
        #[cfg(unix)]
        {
            assert!(check_output(Path::new("/dev/null"), &[]).is_err());
            // A FIFO: a rename would replace it with a regular file.
            let fifo = dir.join("pipe");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                let e = check_output(&fifo, &[]).unwrap_err();
                assert!(e.to_string().contains("not a regular file"), "{e}");
                assert!(check_kind(&fifo).is_err(), "checked again at the rename");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
