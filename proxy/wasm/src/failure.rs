//! Why a callback or a VM failed, classified from wasmtime's error.

use wasmtime::Trap;

/// Why a callback or a VM failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The module trapped (including `proc_exit`).
    Trap,
    /// The callback ran past its CPU deadline.
    Deadline,
    /// The module needed more memory than allowed.
    Memory,
    /// A start callback said no, or an export is unusable.
    Rejected,
    /// The VM is broken or cannot be (re)created now.
    Unavailable,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Rejected,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Unavailable,
            message: message.into(),
        }
    }

    pub(crate) fn classify(
        what: &str,
        error: wasmtime::Error,
        note: Option<String>,
        memory_hit: bool,
        cap: usize,
    ) -> Self {
        if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return Self {
                kind: FailureKind::Deadline,
                message: format!("{what} exceeded its CPU deadline"),
            };
        }
        if memory_hit {
            return Self {
                kind: FailureKind::Memory,
                message: format!(
                    "{what} exceeded the memory limit of {cap} bytes: {}",
                    error_text(&error)
                ),
            };
        }
        if let Some(note) = note {
            return Self {
                kind: FailureKind::Trap,
                message: format!("{what}: {note}"),
            };
        }
        Self {
            kind: FailureKind::Trap,
            message: format!("{what} trapped: {}", error_text(&error)),
        }
    }
}

/// An error's message with its causes on one line, and for a trap the
/// innermost wasm function it happened in.
pub(crate) fn error_text(error: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(trap) = error.downcast_ref::<Trap>() {
        parts.push(trap.to_string());
    }
    for cause in error.chain() {
        if cause.is::<Trap>() {
            continue;
        }
        let text = cause.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches(':')
            .to_string();
        if !first.is_empty()
            && !first.starts_with("error while executing")
            && !parts.contains(&first)
        {
            parts.push(first);
        }
    }
    // The innermost frame, demangled as the backtrace prints it ("  0: 0x1f - name").
    if let Some(frame) = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| {
            bt.to_string()
                .lines()
                .find_map(|l| l.split_once(" - ").map(|(_, f)| f.trim().to_string()))
        })
    {
        parts.push(format!("in {frame}"));
    }
    parts.join(": ")
}
