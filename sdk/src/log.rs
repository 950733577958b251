//! Logging through `proxy_log`: `trace!` .. `error!` take `format!` arguments.
//! A failed log call is dropped (there is nowhere else to report it).

pub use lacewing_abi::LogLevel;

/// Logs `message` at `level`, ignoring a host refusal.
pub fn log(level: LogLevel, message: &str) {
    let _ = crate::hostcalls::log(level, message);
}

/// Logs at trace level: `trace!("seen {}", n)`.
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::log::log($crate::log::LogLevel::Trace, &::std::format!($($t)*)) }; }
/// Logs at debug level.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::log::LogLevel::Debug, &::std::format!($($t)*)) }; }
/// Logs at info level.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::log::LogLevel::Info, &::std::format!($($t)*)) }; }
/// Logs at warn level.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::log::LogLevel::Warn, &::std::format!($($t)*)) }; }
/// Logs at error level.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::log::LogLevel::Error, &::std::format!($($t)*)) }; }
