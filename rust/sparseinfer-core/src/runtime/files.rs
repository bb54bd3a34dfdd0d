//! Opening the files of a model directory, which is untrusted input.
//!
//! Every path a checkpoint names (config.json, the shard index and the shards it lists) must resolve inside
//! the directory: relative, without `..`, and, with symbolic links resolved, still under the directory. A Hugging
//! Face hub cache snapshot (`.../models--org--name/snapshots/<revision>/`, whose files are links into
//! `.../blobs/`) may also resolve to a file directly in that `blobs` folder; a directory that merely sits in some
//! folder called `snapshots` gains no second root. Only regular files are opened (a FIFO would block, a device would never
//! end), with `O_NONBLOCK` so that a file swapped for a FIFO after the check cannot block the open either, and
//! checked again on the open handle. On Linux the handle's own path (`/proc/self/fd`) must pass the same
//! containment check, so a directory swapped for a link between the check and the open is caught too. JSON files
//! are read up to a size cap. Errors name the file, never its contents.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

const OP: &str = "load";
/// Largest JSON file read (config.json, model.safetensors.index.json: the index of a 400B-parameter model is
/// about 2 MB). A parsed `serde_json::Value` takes several times its text.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// Folder prefixes of a Hugging Face hub cache repository (`<cache>/models--org--name/{blobs,snapshots}`).
const HUB_REPO_PREFIXES: [&str; 3] = ["models--", "datasets--", "spaces--"];

/// The canonical blobs folder of the hub cache repository whose snapshot `real` (canonical) is, if it is one.
fn hub_blobs(real: &Path) -> Option<PathBuf> {
    let snapshots = real.parent()?;
    let repo = snapshots.parent()?;
    let repo_name = repo.file_name()?.to_str()?;
    if snapshots.file_name()? != "snapshots" || !HUB_REPO_PREFIXES.iter().any(|p| repo_name.starts_with(p)) {
        return None;
    }
    repo.join("blobs").canonicalize().ok().filter(|b| b.is_dir())
}

/// A model directory whose files are opened by name, confined to it.
pub struct ModelDir {
    /// The directory as the caller named it (for messages).
    shown: PathBuf,
    /// The canonical directory.
    root: PathBuf,
    /// For a hub cache snapshot, the canonical blobs folder its links may resolve into (files directly in it).
    blobs: Option<PathBuf>,
}

impl ModelDir {
    /// The directory at `dir`; an error if it is not one.
    pub fn new(dir: &Path) -> Result<ModelDir> {
        let real = dir
            .canonicalize()
            .map_err(|e| Error::invalid(OP, format!("{}: cannot open the model directory: {e}", dir.display())))?;
        if !real.is_dir() {
            return Err(Error::invalid(OP, format!("{} is not a directory", dir.display())));
        }
        let blobs = hub_blobs(&real);
        Ok(ModelDir { shown: dir.to_path_buf(), root: real, blobs })
    }

    /// The canonical directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `name` joined to the directory as the caller named it (for messages).
    pub fn shown(&self, name: &str) -> String {
        self.shown.join(name).display().to_string()
    }

    /// The canonical path of `name`, `None` when it does not exist. Refuses absolute names, `..` and links
    /// that resolve outside the directory.
    pub fn resolve(&self, name: &str) -> Result<Option<PathBuf>> {
        let rel = Path::new(name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(Error::invalid(
                OP,
                format!("{}: {name:?} is not a relative path inside the model directory", self.shown.display()),
            ));
        }
        let real = match self.root.join(rel).canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::invalid(OP, format!("{}: cannot be resolved: {e}", self.shown(name)))),
        };
        self.check_inside(name, &real)?;
        Ok(Some(real))
    }

    /// Refuses a canonical path `real` (of `name`) outside the directory and its hub blobs folder.
    fn check_inside(&self, name: &str, real: &Path) -> Result<()> {
        let in_blobs = self.blobs.as_deref().is_some_and(|b| real.parent() == Some(b));
        if !(real.starts_with(&self.root) || in_blobs) {
            return Err(Error::invalid(
                OP,
                format!("{}: resolves to {}, outside the model directory", self.shown(name), real.display()),
            ));
        }
        Ok(())
    }

    /// Refuses an opened `file` (for `name`) that is not inside the directory: the path the kernel resolved
    /// for the handle, which no later change to the directory's links can move.
    fn check_opened(&self, name: &str, file: &File) -> Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // Without /proc (a bare container), the checks before the open are what there is.
            if let Ok(actual) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
                return self.check_inside(name, &actual);
            }
        }
        let _ = (name, file);
        Ok(())
    }

    /// Opens `name` for reading if it exists: inside the directory, a regular file.
    pub fn open(&self, name: &str) -> Result<Option<File>> {
        let Some(real) = self.resolve(name)? else { return Ok(None) };
        let shown = self.shown(name);
        let not_regular = || Error::invalid(OP, format!("{shown}: not a regular file"));
        let meta = std::fs::metadata(&real).map_err(|e| Error::Io { op: format!("reading {shown}"), source: e })?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let file =
            open_nonblocking(&real, false).map_err(|e| Error::Io { op: format!("opening {shown}"), source: e })?;
        let meta = file.metadata().map_err(|e| Error::Io { op: format!("reading {shown}"), source: e })?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        self.check_opened(name, &file)?;
        Ok(Some(file))
    }

    /// Opens `name`, which must exist.
    pub fn open_required(&self, name: &str) -> Result<File> {
        self.open(name)?.ok_or_else(|| Error::invalid(OP, format!("{}: no such file", self.shown(name))))
    }

    /// The JSON in `name` (at most `limit` bytes), `None` when the file does not exist.
    pub fn read_json(&self, name: &str, limit: u64) -> Result<Option<serde_json::Value>> {
        let Some(file) = self.open(name)? else { return Ok(None) };
        let shown = self.shown(name);
        let bytes = read_capped(file, limit, &shown)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::invalid(OP, format!("{shown}: not valid JSON: {e}")))
    }

    /// Names of the directory's entries that end with `.{ext}`, sorted (no filtering by type: [`Self::open`]
    /// checks each one).
    pub fn names_with_extension(&self, ext: &str) -> Result<Vec<String>> {
        let io = |e| Error::Io { op: format!("listing {}", self.shown.display()), source: e };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|x| x == ext) {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| Error::invalid(OP, format!("{}: a file name is not UTF-8", self.shown.display())))?;
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Reads all of `file`, refusing more than `limit` bytes (`shown` names it in errors).
pub fn read_capped(file: File, limit: u64, shown: &str) -> Result<Vec<u8>> {
    let io = |e| Error::Io { op: format!("reading {shown}"), source: e };
    let len = file.metadata().map_err(io)?.len();
    if len > limit {
        return Err(Error::invalid(OP, format!("{shown}: {len} bytes is over the limit of {limit}")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(Error::invalid(OP, format!("{shown}: more than the limit of {limit} bytes")));
    }
    Ok(bytes)
}

/// Opens `path` read-only without waiting for a FIFO's writer. Without `follow`, a link in the last
/// component is refused (for canonical paths: a link there now was put there after the check).
pub fn open_nonblocking(path: &Path, follow: bool) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | if follow { 0 } else { libc::O_NOFOLLOW });
    }
    #[cfg(not(unix))]
    let _ = follow;
    opts.open(path)
}

/// Opens a file the caller named directly (not through a model directory): a regular file only.
pub fn open_regular(path: &Path) -> Result<File> {
    let shown = path.display().to_string();
    let file = open_nonblocking(path, true).map_err(|e| Error::Io { op: format!("opening {shown}"), source: e })?;
    let meta = file.metadata().map_err(|e| Error::Io { op: format!("reading {shown}"), source: e })?;
    if !meta.is_file() {
        return Err(Error::invalid(OP, format!("{shown}: not a regular file")));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_handle_to_a_file_outside_the_directory_is_refused() {
        let base = std::env::temp_dir().join(format!("sparseinfer-files-{}", std::process::id()));
        let (inside, outside) = (base.join("model"), base.join("elsewhere"));
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("config.json"), "{}").unwrap();
        std::fs::write(outside.join("secret.json"), "{}").unwrap();
        let dir = ModelDir::new(&inside).unwrap();
        // What an open through a directory swapped for a link after the check would have returned.
        let stray = File::open(outside.join("secret.json")).unwrap();
        let e = dir.check_opened("config.json", &stray).unwrap_err().to_string();
        assert!(e.contains("outside the model directory"), "{e}");
        let own = File::open(inside.join("config.json")).unwrap();
        dir.check_opened("config.json", &own).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
