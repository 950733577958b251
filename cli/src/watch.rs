//! `lacewing proxy --config FILE --watch`: looks at FILE's content, and at
//! the identity files the live configuration names, every second and
//! reloads FILE when any content changes, as SIGHUP does.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the file is read and compared.
const EVERY: Duration = Duration::from_secs(1);

/// Watches `file` on a thread of its own until `stop` is set; calls
/// `reload` each time the file's bytes, followed by those of the files
/// `also()` names (the live configuration's identity files), differ from
/// the last ones seen.
/// `seen` is the content the running generation was read from (`None` if it
/// could not be read again), so a change made while the proxy started is not
/// missed.
///
/// Comparing content rather than the modification time catches two writes
/// within the clock's granularity and ignores a `touch`. A file that cannot
/// be read (for example between an editor's delete and rename) is not a
/// change: the live generation stays and the next readable content is
/// compared with the last one seen.
pub(crate) fn spawn(
    file: PathBuf,
    seen: Option<Vec<u8>>,
    stop: Arc<AtomicBool>,
    also: impl Fn() -> Vec<PathBuf> + Send + 'static,
    reload: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("lacewing-watch".into())
        .spawn(move || {
            let mut seen = seen;
            let mut unreadable = false;
            // The identity files as the proxy read them at start.
            let mut seen_also = read_all(&also());
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EVERY);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match std::fs::read(&file) {
                    Ok(content) => {
                        unreadable = false;
                        let others = read_all(&also());
                        let others_changed = seen_also != others;
                        seen_also = others;
                        if others_changed && seen.as_ref() == Some(&content) {
                            tracing::info!(file = %file.display(), "identity files changed: reloading");
                            reload();
                        } else if seen.as_ref() != Some(&content) {
                            seen = Some(content);
                            tracing::info!(file = %file.display(), "configuration file changed: reloading");
                            reload();
                        }
                    }
                    Err(e) => {
                        if !unreadable {
                            tracing::warn!(file = %file.display(), error = %e, "cannot read the configuration file; the live generation stays");
                        }
                        unreadable = true;
                    }
                }
            }
        })
        .map(drop)
}

/// The bytes of `files` one after the other; an unreadable file reads as
/// its error, so a file that comes back is a change.
fn read_all(files: &[PathBuf]) -> Vec<u8> {
    let mut all = Vec::new();
    for file in files {
        match std::fs::read(file) {
            Ok(content) => all.extend_from_slice(&content),
            Err(e) => all.extend_from_slice(e.to_string().as_bytes()),
        }
        all.push(0);
    }
    all
}
