//! The on-disk cache of precompiled modules. Loading an artifact maps native
//! code into the proxy, so one is handed to wasmtime only when it is provably
//! the proxy's own: it sits in a directory owned by the proxy's user with no
//! access for anyone else, it is a regular 0600 file of that user, and its
//! content digest equals the one the proxy recorded (in a 0600 sidecar file)
//! when it wrote it. The bytes checked are the bytes deserialized: the file is
//! read into memory once, never mapped from disk after the check.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::hex;

/// Permission bits of the cache directory: only its owner may list, read or write it.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Permission bits of artifacts and their digest files.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Suffix of the sidecar file holding an artifact's sha256 (64 hex digits).
const DIGEST_SUFFIX: &str = ".sha256";

/// Why no artifact was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Nothing cached under this name yet (the normal first run).
    Absent,
    /// Something is there but is not provably the proxy's own; the reason is logged.
    Untrusted(String),
}

/// The artifact directory of one engine.
#[derive(Debug)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    euid: u32,
}

impl ArtifactCache {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            euid: rustix::process::geteuid().as_raw(),
        }
    }

    /// The cache directory, created 0700 when missing; an error says why it
    /// cannot be trusted (then nothing is read from or written to it).
    pub fn trusted_dir(&self) -> Result<&Path, String> {
        let dir = &self.dir;
        match fs::metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?,
            Err(e) => return Err(format!("cache directory {}: {e}", dir.display())),
            Ok(_) => {}
        }
        let meta =
            fs::metadata(dir).map_err(|e| format!("cache directory {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!(
                "cache directory {} is not a directory",
                dir.display()
            ));
        }
        if meta.uid() != self.euid {
            return Err(format!(
                "cache directory {} is owned by uid {}, not by the proxy's uid {}",
                dir.display(),
                meta.uid(),
                self.euid
            ));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            self.tighten(mode)?;
        }
        Ok(dir)
    }

    /// Makes a loose directory of the proxy's own private again, when it holds
    /// nothing but cache files (so it is provably a cache directory, not one
    /// a user pointed at by mistake). Its files are deleted: while it was
    /// loose, nothing in it can be proved to be the proxy's own.
    fn tighten(&self, mode: u32) -> Result<(), String> {
        let dir = &self.dir;
        let refuse = |why: String| {
            format!(
                "cache directory {} has mode {mode:04o}; it must give no access to group or others (0700), \
                 and it is not repaired because {why}",
                dir.display()
            )
        };
        let entries: Vec<_> = fs::read_dir(dir)
            .and_then(|entries| entries.collect::<Result<_, _>>())
            .map_err(|e| refuse(format!("it cannot be listed: {e}")))?;
        if let Some(other) = entries.iter().find(|entry| !is_cache_file(entry)) {
            return Err(refuse(format!(
                "it holds {}, which is not a cache file",
                other.file_name().to_string_lossy()
            )));
        }
        // Closed first, so nothing new appears while the old files go.
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| refuse(format!("its mode cannot be changed: {e}")))?;
        for entry in &entries {
            fs::remove_file(entry.path())
                .map_err(|e| refuse(format!("{}: {e}", entry.path().display())))?;
        }
        tracing::warn!(
            dir = %dir.display(),
            "cache directory had mode {mode:04o}; set to 0700 and its {} file(s) discarded",
            entries.len()
        );
        Ok(())
    }

    /// The bytes of artifact `name`, if the proxy provably wrote them.
    pub fn load(&self, name: &str) -> Result<Vec<u8>, Refusal> {
        let dir = self.trusted_dir().map_err(Refusal::Untrusted)?;
        let path = dir.join(name);
        let Some(mut file) = self.open_own(&path)? else {
            return Err(Refusal::Absent);
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| Refusal::Untrusted(format!("{}: {e}", path.display())))?;
        let digest_path = dir.join(format!("{name}{DIGEST_SUFFIX}"));
        let Some(digest_file) = self.open_own(&digest_path)? else {
            return Err(Refusal::Untrusted(format!(
                "{}: no recorded digest",
                path.display()
            )));
        };
        let mut recorded = String::new();
        digest_file
            .take(DIGEST_HEX_LEN as u64 + 2)
            .read_to_string(&mut recorded)
            .map_err(|e| Refusal::Untrusted(format!("{}: {e}", digest_path.display())))?;
        if recorded.trim_end() != hex(&Sha256::digest(&bytes)) {
            return Err(Refusal::Untrusted(format!(
                "{}: content differs from the digest recorded when it was written",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Opens `path` for reading if it is a regular file of the proxy's user,
    /// mode 0600, with no other name; `None` when it does not exist. The checks
    /// are made on the opened file, so they hold for the bytes read from it.
    fn open_own(&self, path: &Path) -> Result<Option<File>, Refusal> {
        let untrusted = |why: String| Refusal::Untrusted(format!("{}: {why}", path.display()));
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(no_follow())
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(untrusted(format!("cannot open: {e}"))),
        };
        let meta = file
            .metadata()
            .map_err(|e| untrusted(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(untrusted("not a regular file".into()));
        }
        if meta.uid() != self.euid {
            return Err(untrusted(format!(
                "owned by uid {}, not by the proxy's uid {}",
                meta.uid(),
                self.euid
            )));
        }
        let mode = meta.mode() & 0o7777;
        if mode != FILE_MODE {
            return Err(untrusted(format!("mode {mode:04o}, not 0600")));
        }
        if meta.nlink() != 1 {
            return Err(untrusted(format!(
                "has {} names (hard links)",
                meta.nlink()
            )));
        }
        Ok(Some(file))
    }

    /// Writes artifact `name` and then its digest file, each through a fresh
    /// 0600 temporary file renamed into place, so a reader sees either the old
    /// or the new file whole (and a mismatched pair is refused, not used).
    pub fn store(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let dir = self.trusted_dir()?;
        write_atomically(dir, name, bytes)?;
        let digest = hex(&Sha256::digest(bytes));
        write_atomically(dir, &format!("{name}{DIGEST_SUFFIX}"), digest.as_bytes())
    }
}

/// Length of a sha256 digest in hex.
const DIGEST_HEX_LEN: usize = 64;

/// Whether `entry` is a file this cache writes: an artifact, its digest,
/// or a temporary file of an interrupted write.
fn is_cache_file(entry: &fs::DirEntry) -> bool {
    let name = entry.file_name();
    let name = name.to_string_lossy();
    let regular = entry.file_type().is_ok_and(|t| t.is_file());
    regular
        && (name.ends_with(".cwasm")
            || name.ends_with(DIGEST_SUFFIX)
            || (name.starts_with('.') && name.contains(".tmp")))
}

fn no_follow() -> i32 {
    // The flag is a small positive constant on every Unix.
    i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0)
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(no_follow())
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes))
        .and_then(|()| fs::rename(&tmp, dir.join(name)));
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {e}", dir.join(name).display())
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A fresh path under the temp directory, removed with everything below it on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            Self(std::env::temp_dir().join(format!(
                "lacewing-artifacts-{label}-{}-{}",
                std::process::id(),
                crate::host::next_uid()
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A cache on a fresh directory, removed when the guard drops.
    fn fresh_cache(label: &str) -> (TempDir, PathBuf, ArtifactCache) {
        let tmp = TempDir::new(label);
        let root = tmp.0.clone();
        let cache = ArtifactCache::new(root.clone());
        (tmp, root, cache)
    }

    /// Why `cache` will not use artifact `m`; panics if it would.
    fn refusal(cache: &ArtifactCache) -> String {
        match cache.load("m") {
            Err(Refusal::Untrusted(why)) => why,
            other => panic!("artifact `m` not refused as untrusted: {other:?}"),
        }
    }

    #[test]
    fn directory_is_created_private_and_round_trips() {
        let tmp = TempDir::new("create");
        let root = tmp.0.clone();
        let cache = ArtifactCache::new(root.join("a").join("cache"));
        assert_eq!(cache.load("m"), Err(Refusal::Absent));
        let dir = cache.trusted_dir().unwrap().to_path_buf();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, DIR_MODE);
        cache.store("m", b"native code").unwrap();
        let meta = fs::metadata(dir.join("m")).unwrap();
        assert_eq!(meta.mode() & 0o777, FILE_MODE);
        let digest = fs::metadata(dir.join("m.sha256")).unwrap();
        assert_eq!(digest.mode() & 0o777, FILE_MODE);
        assert_eq!(cache.load("m").unwrap(), b"native code");
    }

    #[test]
    fn loose_directory_of_cache_files_is_tightened_and_emptied() {
        let tmp = TempDir::new("loose");
        let root = tmp.0.clone();
        for mode in [0o777, 0o755, 0o705] {
            let cache = ArtifactCache::new(root.clone());
            cache.store("m.cwasm", b"x").unwrap();
            fs::set_permissions(&root, fs::Permissions::from_mode(mode)).unwrap();
            let again = ArtifactCache::new(root.clone());
            assert_eq!(
                again.load("m.cwasm"),
                Err(Refusal::Absent),
                "old files discarded"
            );
            assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, DIR_MODE);
            again.store("m.cwasm", b"x").unwrap();
            assert_eq!(again.load("m.cwasm").unwrap(), b"x");
        }
    }

    #[test]
    fn loose_directory_with_other_files_is_not_trusted_nor_touched() {
        let tmp = TempDir::new("mode");
        let root = tmp.0.clone();
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("notes.txt"), b"mine").unwrap();
        for mode in [0o777, 0o750, 0o705] {
            fs::set_permissions(&root, fs::Permissions::from_mode(mode)).unwrap();
            let cache = ArtifactCache::new(root.clone());
            let err = cache.trusted_dir().unwrap_err();
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
            assert!(err.contains("notes.txt"), "{err}");
            refusal(&cache);
            assert!(cache.store("m", b"x").is_err());
            assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, mode);
        }
        assert_eq!(
            fs::read_dir(&root).unwrap().count(),
            1,
            "nothing written or removed"
        );
    }

    #[test]
    fn directory_of_another_user_is_not_trusted() {
        let tmp = TempDir::new("owner");
        let root = tmp.0.clone();
        let dir = if rustix::process::geteuid().is_root() {
            fs::create_dir_all(&root).unwrap();
            fs::set_permissions(&root, fs::Permissions::from_mode(DIR_MODE)).unwrap();
            std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
            root.clone()
        } else {
            // Owned by root; the owner is checked before the mode.
            PathBuf::from("/")
        };
        let err = ArtifactCache::new(dir).trusted_dir().unwrap_err();
        assert!(err.contains("is owned by uid"), "{err}");
    }

    #[test]
    fn artifact_with_another_mode_or_a_second_name_is_not_trusted() {
        let (_tmp, root, cache) = fresh_cache("file");
        cache.store("m", b"native code").unwrap();
        fs::set_permissions(root.join("m"), fs::Permissions::from_mode(0o644)).unwrap();
        let why = refusal(&cache);
        assert!(why.contains("mode 0644"), "{why}");

        cache.store("m", b"native code").unwrap();
        assert!(cache.load("m").is_ok());
        fs::hard_link(root.join("m"), root.join("other")).unwrap();
        let why = refusal(&cache);
        assert!(why.contains("hard links"), "{why}");
    }

    #[test]
    fn tampered_or_unrecorded_artifact_is_not_trusted() {
        let (_tmp, root, cache) = fresh_cache("digest");
        cache.store("m", b"native code").unwrap();
        // Rewritten in place, keeping its owner, mode and single name.
        fs::write(root.join("m"), b"other code!").unwrap();
        let why = refusal(&cache);
        assert!(why.contains("differs from the digest"), "{why}");

        fs::remove_file(root.join("m.sha256")).unwrap();
        let why = refusal(&cache);
        assert!(why.contains("no recorded digest"), "{why}");
    }

    #[test]
    fn symlinked_artifact_is_not_followed() {
        let (_tmp, root, cache) = fresh_cache("link");
        cache.store("real", b"native code").unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("m")).unwrap();
        fs::copy(root.join("real.sha256"), root.join("m.sha256")).unwrap();
        let why = refusal(&cache);
        assert!(why.contains("cannot open"), "{why}");
    }
}
