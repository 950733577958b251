//! Reading a proxy's access log in a test: a file per test, its JSON lines,
//! and waiting for the line a test expects.

use std::path::{Path, PathBuf};

use crate::eventually;

/// The access log file of one test, removed at the end.
#[derive(Debug)]
pub struct LogFile(PathBuf);

impl LogFile {
    /// A file in the temporary directory named after `name` and this process.
    pub fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("lacewing-access-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    /// Where the proxy is to write it (`access_log.path`).
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Every line written so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    /// The first line that `matches`, once it is there; panics naming `what`
    /// if it never comes.
    pub async fn find(
        &self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let find = || self.lines().into_iter().find(|l| matches(l));
        eventually(what, || async { find().is_some() }).await;
        find().unwrap()
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
