//! Where plugin log lines (`proxy_log`, a module's stdout and stderr) go.
//!
//! By default they are `tracing` events of the target
//! `lacewing_wasm::hostcalls::log` with a `plugin` field. A process that
//! writes its log as text (the `lacewing` binary) can instead hand them to a
//! [`LineQueue`] with [`queue_plugin_lines`]: the host then writes the line
//! itself, in the layout of `tracing`'s text format, and the queue's thread
//! makes the system call. A plugin that logs on every request (an access-log
//! line) then costs about a seventh of what the event did: `tracing`'s
//! formatter walks the message one character at a time to escape it.
//!
//! Either way, control characters a plugin writes (terminal escapes, and
//! line breaks that would forge a line of their own) reach the log escaped:
//! `\x1b`, `\x0a`, and `\u{9b}` for C1 controls. Invalid UTF-8 becomes U+FFFD.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::{LazyLock, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use lacewing_abi::LogLevel;
use lacewing_core::line_queue::LineQueue;
use prometheus::IntCounter;

/// The target plugin lines carry, in `tracing` filters and in the log.
pub const TARGET: &str = "lacewing_wasm::hostcalls::log";

/// Plugin lines dropped because the queue was full (the sink is behind).
pub(crate) static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "wasm_log_lines_dropped_total",
        "Plugin log lines dropped because the log writer was behind.",
    )
    .expect("valid metric definition")
});

struct QueuedLines {
    queue: LineQueue,
    /// Indexed by `LogLevel as usize`: whether lines of that level are written.
    enabled: [bool; 6],
}

static QUEUED: OnceLock<QueuedLines> = OnceLock::new();

/// Writes plugin log lines to `queue` from now on, those at the levels
/// `enabled` says (`enabled(level)` is asked once per level, here). Returns
/// `false`, changing nothing, when lines already go to a queue.
pub fn queue_plugin_lines(queue: LineQueue, enabled: impl Fn(LogLevel) -> bool) -> bool {
    let levels = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warn,
        LogLevel::Error,
        LogLevel::Critical,
    ];
    QUEUED
        .set(QueuedLines {
            queue,
            enabled: levels.map(enabled),
        })
        .is_ok()
}

/// Waits up to `timeout` for queued plugin lines to be written (before the
/// process exits). Returns at once when lines do not go to a queue.
pub fn flush(timeout: std::time::Duration) -> bool {
    QUEUED
        .get()
        .is_none_or(|queued| queued.queue.flush(timeout))
}

thread_local! {
    /// The date-and-time prefix of the last second seen on this thread.
    static CLOCK: RefCell<Clock> = RefCell::new(Clock::default());
}

/// Room reserved for a line beyond the message and the plugin's name: the
/// time, level, target and punctuation (about 80 bytes), and some escapes.
const LINE_OVERHEAD: usize = 128;

/// Writes one plugin log line.
pub(crate) fn emit(plugin: &str, level: LogLevel, message: &[u8]) {
    let Some(queued) = QUEUED.get() else {
        let message = String::from_utf8_lossy(message);
        let message = message.as_ref();
        match level {
            LogLevel::Trace => tracing::trace!(target: TARGET, plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: TARGET, plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: TARGET, plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: TARGET, plugin, "{message}"),
            LogLevel::Error | LogLevel::Critical => {
                tracing::error!(target: TARGET, plugin, "{message}")
            }
        }
        return;
    };
    if !queued.enabled[level as usize] {
        return;
    }
    // Written straight into the buffer the queue keeps: one allocation, no copy.
    let mut line = Vec::with_capacity(message.len() + plugin.len() + LINE_OVERHEAD);
    CLOCK.with_borrow_mut(|clock| {
        format_line(&mut line, clock, SystemTime::now(), plugin, level, message)
    });
    if queued.queue.send(line).is_err() {
        DROPPED.inc();
    }
}

/// `2026-12-01T05:02:40.123456Z  INFO lacewing_wasm::hostcalls::log: MESSAGE plugin="NAME"`,
/// as `tracing`'s text format writes it without colours.
fn format_line(
    out: &mut Vec<u8>,
    clock: &mut Clock,
    now: SystemTime,
    plugin: &str,
    level: LogLevel,
    message: &[u8],
) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    out.extend_from_slice(clock.date_and_time(since_epoch.as_secs()));
    let _ = write!(out, ".{:06}Z ", since_epoch.subsec_micros());
    out.extend_from_slice(match level {
        LogLevel::Trace => b"TRACE ",
        LogLevel::Debug => b"DEBUG ",
        LogLevel::Info => b" INFO ",
        LogLevel::Warn => b" WARN ",
        LogLevel::Error | LogLevel::Critical => b"ERROR ",
    });
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b": ");
    push_escaped(out, message);
    out.extend_from_slice(b" plugin=\"");
    push_escaped(out, plugin.as_bytes());
    out.extend_from_slice(b"\"\n");
}

/// Appends `text` with control characters escaped and invalid UTF-8
/// replaced; runs that need neither are copied at once.
fn push_escaped(out: &mut Vec<u8>, text: &[u8]) {
    // An ASCII start (often the whole line) is checked and escaped in one
    // pass; checking UTF-8 first and then scanning took two.
    let ascii = push_escaped_run(out, text, true);
    let text = &text[ascii..];
    if text.is_empty() {
        return;
    }
    // Valid UTF-8 (the usual case) is checked a word at a time, then
    // scanned by bytes; decoding characters cost 18 instructions a byte.
    if std::str::from_utf8(text).is_ok() {
        push_escaped_run(out, text, false);
        return;
    }
    for chunk in text.utf8_chunks() {
        push_escaped_run(out, chunk.valid().as_bytes(), false);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
}

/// Appends valid UTF-8 `text` with its controls escaped: ASCII bytes (C0 but
/// tab, and DEL) and the C1 characters, encoded `C2 80` to `C2 9F`. With
/// `ascii_only`, stops at the first byte above 0x7f. Returns how far it went.
fn push_escaped_run(out: &mut Vec<u8>, text: &[u8], ascii_only: bool) -> usize {
    let mut plain_from = 0;
    let mut at = 0;
    while at < text.len() {
        // Eight plain bytes at a time (a byte at a time took 8 instructions a byte).
        if let Some(word) = text.get(at..at + 8) {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            let plain = if ascii_only {
                is_printable_ascii(word)
            } else {
                !may_need_escape(word)
            };
            if plain {
                at += 8;
                continue;
            }
        }
        let byte = text[at];
        let (code, width) = match byte {
            0x00..=0x08 | 0x0a..=0x1f | 0x7f => (u32::from(byte), 1),
            0x80.. if ascii_only => break,
            0xc2 => match text.get(at + 1) {
                Some(&next @ 0x80..=0x9f) => (u32::from(next), 2),
                _ => {
                    at += 1;
                    continue;
                }
            },
            _ => {
                at += 1;
                continue;
            }
        };
        out.extend_from_slice(&text[plain_from..at]);
        if width == 1 {
            let _ = write!(out, "\\x{code:02x}");
        } else {
            let _ = write!(out, "\\u{{{code:x}}}");
        }
        at += width;
        plain_from = at;
    }
    out.extend_from_slice(&text[plain_from..at]);
    at
}

/// Whether every byte of `word` is printable ASCII (0x20 to 0x7e): one test
/// for the three of [`may_need_escape`] and the ASCII one (about a third of
/// the instructions a word, on an access-log line).
fn is_printable_ascii(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte below 0x20 has its high bit set after subtracting 0x20; 0x7f
    // after adding 1; 0x80 and above before. A borrow or a carry into the
    // next byte only comes from a byte already caught, so it can only flag
    // a neighbour of a byte that needs the slow path anyway.
    (word.wrapping_sub(ONES * 0x20) | word.wrapping_add(ONES) | word) & HIGHS == 0
}

/// Whether any byte of `word` is below 0x20, 0x7f or 0xc2 (the bytes
/// [`push_escaped_run`] looks at one by one).
fn may_need_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte is zero, or below n (n ≤ 0x80), exactly when subtracting
    // leaves its high bit set where it was clear.
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGHS != 0;
    below(word, 0x20) || below(word ^ (ONES * 0x7f), 1) || below(word ^ (ONES * 0xc2), 1)
}

/// The `YYYY-MM-DDTHH:MM:SS` text of one second, kept until the clock moves on.
#[derive(Default)]
struct Clock {
    second: Option<u64>,
    text: [u8; 19],
}

impl Clock {
    fn date_and_time(&mut self, unix_seconds: u64) -> &[u8] {
        if self.second != Some(unix_seconds) {
            let days = unix_seconds / 86_400;
            let in_day = unix_seconds % 86_400;
            let (year, month, day) = civil_date(days);
            let mut text = [0u8; 19];
            let _ = write!(
                &mut text[..],
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
                in_day / 3600,
                in_day % 3600 / 60,
                in_day % 60
            );
            self.text = text;
            self.second = Some(unix_seconds);
        }
        &self.text
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since
/// 1970-01-01, by eras of 400 years (146,097 days each).
fn civil_date(days_since_epoch: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so a leap day ends its year.
    let days = days_since_epoch + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March: 0 = March … 11 = February.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(at: SystemTime, level: LogLevel, message: &[u8]) -> String {
        let mut out = Vec::new();
        format_line(&mut out, &mut Clock::default(), at, "authz", level, message);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_line_has_the_layout_of_the_text_log() {
        let at = UNIX_EPOCH + Duration::from_micros(1_796_101_360_123_456);
        assert_eq!(
            line(at, LogLevel::Info, b"{\"status\":200}"),
            "2026-12-01T05:02:40.123456Z  INFO lacewing_wasm::hostcalls::log: {\"status\":200} plugin=\"authz\"\n"
        );
        assert!(line(at, LogLevel::Critical, b"x").contains("Z ERROR lacewing_wasm"));
        assert!(line(at, LogLevel::Trace, b"x").contains("Z TRACE lacewing_wasm"));
    }

    #[test]
    fn dates_match_the_calendar() {
        let mut clock = Clock::default();
        for (seconds, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (951_868_799, "2000-02-29T23:59:59"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (1_709_164_800, "2024-02-29T00:00:00"),
            (1_735_689_599, "2024-12-31T23:59:59"),
        ] {
            assert_eq!(clock.date_and_time(seconds), text.as_bytes(), "{seconds}");
        }
    }

    #[test]
    fn a_word_with_a_byte_to_look_at_is_never_skipped() {
        for looked_at in (0u8..0x20).chain([0x7f, 0xc2]) {
            for at in 0..8 {
                let mut word = *b"abcdefgh";
                word[at] = looked_at;
                assert!(
                    may_need_escape(u64::from_le_bytes(word)),
                    "{looked_at:#x} at {at}"
                );
            }
        }
        assert!(!may_need_escape(u64::from_le_bytes(*b"GET /api")));
        assert!(!may_need_escape(u64::from_le_bytes(
            *b"\xc3\xa9\xc3\xa9 ~\x80\xff"
        )));
    }

    #[test]
    fn controls_are_escaped_and_invalid_utf8_replaced() {
        let mut out = Vec::new();
        push_escaped(&mut out, b"a\x1b[31mred\nnext\tok \xc2\x9b\xff end\x7f");
        let long = "a long plain run, then: \u{1b}[0m and a longer plain tail of text";
        let mut escaped = Vec::new();
        push_escaped(&mut escaped, long.as_bytes());
        assert_eq!(
            String::from_utf8(escaped).unwrap(),
            long.replace('\u{1b}', "\\x1b")
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\x1b[31mred\\x0anext\tok \\u{9b}\u{fffd} end\\x7f"
        );
        let mut out = Vec::new();
        push_escaped(&mut out, "plain — ünïcode".as_bytes());
        assert_eq!(out, "plain — ünïcode".as_bytes());
    }

    /// What `push_escaped` must write, a character at a time.
    fn escaped_by_chars(text: &[u8]) -> String {
        let mut out = String::new();
        for c in String::from_utf8_lossy(text).chars() {
            match c {
                '\t' => out.push(c),
                '\0'..='\u{1f}' | '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
                '\u{80}'..='\u{9f}' => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                _ => out.push(c),
            }
        }
        out
    }

    #[test]
    fn printable_ascii_words_are_told_apart_from_every_other_byte() {
        for fill in [b' ', b'a', b'~'] {
            for at in 0..8 {
                for byte in 0..=u8::MAX {
                    let mut word = [fill; 8];
                    word[at] = byte;
                    assert_eq!(
                        is_printable_ascii(u64::from_le_bytes(word)),
                        (0x20..=0x7e).contains(&byte),
                        "{word:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_special_byte_at_every_offset_is_escaped_as_by_characters() {
        let specials: [&[u8]; 8] = [
            b"\x1b",
            b"\n",
            b"\t",
            b"\x7f",
            "é".as_bytes(),
            "\u{9b}".as_bytes(),
            b"\xff",
            b"\xc2",
        ];
        for len in 0..20 {
            for at in 0..=len {
                for special in specials {
                    for tail in [&b""[..], "ü".as_bytes(), b"\x01"] {
                        let mut text = vec![b'a'; len];
                        text.splice(at..at, special.iter().copied());
                        text.extend_from_slice(tail);
                        let mut out = Vec::new();
                        push_escaped(&mut out, &text);
                        assert_eq!(
                            String::from_utf8(out).unwrap(),
                            escaped_by_chars(&text),
                            "{text:?}"
                        );
                    }
                }
            }
        }
    }
}
