//! Durations (`250ms`, `10s`, `1m`) and byte sizes (`64KiB`, `1MiB`) as written in config files.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration written as a number and a unit: `ms`, `s`, `m`, `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

/// A byte count written as a number and an optional unit: `B`, `KiB`, `MiB`, `GiB` (also `KB`/`MB`/`GB`, powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(pub u64);

/// Why a duration or size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("`{0}` is not a duration: write a number and a unit, e.g. 250ms, 10s, 1m")]
    Duration(String),
    #[error("`{0}` is not a size: write a number and a unit, e.g. 512KiB, 1MiB")]
    Size(String),
}

fn split_number(text: &str) -> Option<(f64, &str)> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number: f64 = text[..end].parse().ok()?;
    (number.is_finite() && number >= 0.0).then_some((number, text[end..].trim()))
}

impl Dur {
    /// Parses `250ms`, `10s`, `1.5m`, `1h`.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let err = || UnitError::Duration(text.to_string());
        let (number, unit) = split_number(text).ok_or_else(err)?;
        let seconds = match unit {
            "ms" => number / 1000.0,
            "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            _ => return Err(err()),
        };
        Duration::try_from_secs_f64(seconds)
            .map(Dur)
            .map_err(|_| err())
    }
}

impl Size {
    /// Parses `4096`, `64KiB`, `1MiB`, `2GB`.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let err = || UnitError::Size(text.to_string());
        let (number, unit) = split_number(text).ok_or_else(err)?;
        let factor: f64 = match unit {
            "" | "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            _ => return Err(err()),
        };
        let bytes = number * factor;
        if bytes > u64::MAX as f64 {
            return Err(err());
        }
        Ok(Size(bytes as u64))
    }

    /// The size as `usize`, saturating.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            // Sub-millisecond precision, written so that it parses back.
            write!(f, "{}ms", self.0.as_secs_f64() * 1000.0)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1024 * 1024;
        match self.0 {
            n if n >= MIB && n % MIB == 0 => write!(f, "{}MiB", n / MIB),
            n if n >= 1024 && n % 1024 == 0 => write!(f, "{}KiB", n / 1024),
            n => write!(f, "{n}"),
        }
    }
}

/// Accepts a bare number or a string and hands it to `parse_text` / `parse_number`.
///
/// A visitor (rather than an untagged enum) keeps the YAML deserializer's
/// position on the value itself, so errors point at the right line.
struct UnitVisitor<T> {
    expecting: &'static str,
    parse_number: fn(u64) -> Result<T, String>,
    parse_text: fn(&str) -> Result<T, UnitError>,
}

impl<T> de::Visitor<'_> for UnitVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        (self.parse_number)(n).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format!("`{n}` is negative"))),
        }
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<T, E> {
        Err(E::custom(format!("`{n}` is not {}", self.expecting)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse_text)(text).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            expecting: "a duration such as 250ms, 10s or 1m",
            parse_number: |n| Err(format!("`{n}` has no unit: write e.g. {n}s or {n}ms")),
            parse_text: Dur::parse,
        })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            expecting: "a size such as 4096, 64KiB or 1MiB",
            parse_number: |n| Ok(Size(n)),
            parse_text: Size::parse,
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("10s").unwrap().0, Duration::from_secs(10));
        assert_eq!(Dur::parse("1.5m").unwrap().0, Duration::from_secs(90));
        assert!(Dur::parse("10").is_err());
        assert!(Dur::parse("-1s").is_err());
        assert!(Dur::parse("1e400s").is_err());
    }

    #[test]
    fn durations_display_so_they_parse_back() {
        for text in ["250ms", "10s", "90s", "1.5ms"] {
            let parsed = Dur::parse(text).unwrap();
            assert_eq!(parsed.to_string(), text);
            assert_eq!(Dur::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("64KiB").unwrap().0, 65536);
        assert_eq!(Size::parse("1MiB").unwrap().0, 1 << 20);
        assert_eq!(Size::parse("100").unwrap().0, 100);
        assert!(Size::parse("1 parsec").is_err());
    }
}
