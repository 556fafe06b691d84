//! One SQLite value → one PostgreSQL value, as the old product stored them
//! (OMNI_SCHEMA.md): booleans as 0/1 or '0'/'1', datetimes as UTC text with
//! or without a fraction, everything else as it is. Encoded straight into
//! PostgreSQL's binary COPY format, so a row goes from SQLite to the wire
//! without an intermediate value per column.
//!
//! A value that cannot be converted is a [`Rejected`] reason: the row is
//! skipped and counted under that reason, never silently changed.

use rusqlite::types::ValueRef;

use super::schema::{Column, Default, Kind};

/// Start of PostgreSQL's binary COPY stream: signature, flags, no extension.
pub const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// End of the stream: a field count of -1.
pub const COPY_TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Why a value, and so its row, was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejected {
    MissingRequired(&'static str),
    NotBoolean(&'static str),
    NotInteger(&'static str),
    NotDatetime(&'static str),
    NotText(&'static str),
    NulCharacter(&'static str),
    TooLong(&'static str, usize),
    NotAllowed(&'static str),
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::MissingRequired(c) => write!(f, "{c} is empty but required"),
            Rejected::NotBoolean(c) => write!(f, "{c} is not a boolean (0/1)"),
            Rejected::NotInteger(c) => write!(f, "{c} is not a 32-bit integer"),
            Rejected::NotDatetime(c) => write!(f, "{c} is not a datetime (YYYY-MM-DD HH:MM:SS[.ffffff])"),
            Rejected::NotText(c) => write!(f, "{c} is not UTF-8 text"),
            Rejected::NulCharacter(c) => write!(f, "{c} contains a NUL character, which PostgreSQL text cannot hold"),
            Rejected::TooLong(c, n) => write!(f, "{c} is longer than {n} characters"),
            Rejected::NotAllowed(c) => write!(f, "{c} is not one of the allowed values"),
        }
    }
}

/// Appends `value`, converted for `column`, as one binary COPY field.
/// `now` (Unix microseconds) stands in for a `now()` default; with
/// `fill_defaults` false a NULL stays NULL where the column has a default
/// (a staging table; the default is applied by the INSERT from it).
pub fn encode(out: &mut Vec<u8>, column: &Column, value: ValueRef<'_>, now: i64, fill_defaults: bool) -> Result<(), Rejected> {
    if matches!(value, ValueRef::Null) {
        return encode_null(out, column, now, fill_defaults);
    }
    let name = column.name;
    match column.kind {
        Kind::Int => put(out, &integer(value).ok_or(Rejected::NotInteger(name))?.to_be_bytes()),
        Kind::Bool => put(out, &[u8::from(boolean(value).ok_or(Rejected::NotBoolean(name))?)]),
        Kind::Timestamp => put(out, &(datetime(value).ok_or(Rejected::NotDatetime(name))? - PG_EPOCH_MICROS).to_be_bytes()),
        Kind::Text => {
            let number;
            let text: &str = match value {
                ValueRef::Text(bytes) | ValueRef::Blob(bytes) => std::str::from_utf8(bytes).map_err(|_| Rejected::NotText(name))?,
                ValueRef::Integer(i) => {
                    number = i.to_string();
                    &number
                }
                ValueRef::Real(r) => {
                    number = r.to_string();
                    &number
                }
                ValueRef::Null => unreachable!("handled above"),
            };
            if text.as_bytes().contains(&0) {
                return Err(Rejected::NulCharacter(name));
            }
            if let Some(max) = column.max_chars {
                if text.chars().count() > max {
                    return Err(Rejected::TooLong(name, max));
                }
            }
            if column.allowed.is_some_and(|allowed| !allowed.contains(&text)) {
                return Err(Rejected::NotAllowed(name));
            }
            put(out, text.as_bytes());
        }
    }
    Ok(())
}

/// A NULL where the column allows it; its default where the column is NOT
/// NULL and has one; otherwise the row cannot go in.
fn encode_null(out: &mut Vec<u8>, column: &Column, now: i64, fill_defaults: bool) -> Result<(), Rejected> {
    if !column.not_null || (!fill_defaults && column.default != Default::None) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return Ok(());
    }
    match column.default {
        Default::None => return Err(Rejected::MissingRequired(column.name)),
        Default::Text(text) => put(out, text.as_bytes()),
        Default::Bool(b) => put(out, &[u8::from(b)]),
        Default::Int(i) => put(out, &i.to_be_bytes()),
        Default::Now => put(out, &(now - PG_EPOCH_MICROS).to_be_bytes()),
    }
    Ok(())
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An integer stored as an integer, as decimal text, or as a whole real.
pub fn integer(value: ValueRef<'_>) -> Option<i32> {
    match value {
        ValueRef::Integer(i) => i32::try_from(i).ok(),
        ValueRef::Real(r) if r.fract() == 0.0 && r >= i32::MIN as f64 && r <= i32::MAX as f64 => Some(r as i32),
        ValueRef::Text(t) => std::str::from_utf8(t).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// 0/1 as integers, or the strings '0'/'1' a server default left (and the
/// spellings SQLAlchemy or a hand edit might have: true/false, t/f).
pub fn boolean(value: ValueRef<'_>) -> Option<bool> {
    match value {
        ValueRef::Integer(0) => Some(false),
        ValueRef::Integer(1) => Some(true),
        ValueRef::Real(r) => match r {
            0.0 => Some(false),
            1.0 => Some(true),
            _ => None,
        },
        ValueRef::Text(t) => match std::str::from_utf8(t).ok()?.trim().to_ascii_lowercase().as_str() {
            "0" | "false" | "f" => Some(false),
            "1" | "true" | "t" => Some(true),
            _ => None,
        },
        _ => None,
    }
}

/// Microseconds since the Unix epoch of a UTC datetime: text
/// `YYYY-MM-DD HH:MM:SS[.f…]` (a `T` separator, a `Z` or `+00:00` suffix
/// accepted too; fractions beyond microseconds truncated), or an integer
/// number of Unix seconds.
pub fn datetime(value: ValueRef<'_>) -> Option<i64> {
    match value {
        ValueRef::Integer(seconds) => seconds.checked_mul(1_000_000),
        ValueRef::Text(t) => parse_datetime(std::str::from_utf8(t).ok()?.trim()),
        _ => None,
    }
}

fn parse_datetime(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z').or_else(|| text.strip_suffix("+00:00")).unwrap_or(text);
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (mut hour, mut minute, mut second, mut micros) = (0, 0, 0, 0);
    if b.len() > 10 {
        if !(b[10] == b' ' || b[10] == b'T') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
            return None;
        }
        (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        if b.len() > 19 {
            let fraction = b.get(20..).filter(|f| b[19] == b'.' && !f.is_empty() && f.iter().all(u8::is_ascii_digit))?;
            micros = fraction.iter().take(6).fold(0i64, |n, d| n * 10 + i64::from(d - b'0')) * 10i64.pow(6u32.saturating_sub(fraction.len() as u32));
        }
    }
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(seconds * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> ValueRef<'_> {
        ValueRef::Text(s.as_bytes())
    }

    #[test]
    fn reads_booleans_as_the_old_product_stored_them() {
        assert_eq!(boolean(ValueRef::Integer(1)), Some(true));
        assert_eq!(boolean(ValueRef::Integer(0)), Some(false));
        assert_eq!(boolean(text("1")), Some(true));
        assert_eq!(boolean(text("0")), Some(false));
        assert_eq!(boolean(text("true")), Some(true));
        assert_eq!(boolean(ValueRef::Integer(2)), None);
        assert_eq!(boolean(text("yes please")), None);
    }

    #[test]
    fn reads_datetimes_with_and_without_fractions() {
        let base = 1_700_000_000 * 1_000_000; // 2023-11-14 22:13:20 UTC
        assert_eq!(datetime(text("2023-11-14 22:13:20")), Some(base));
        assert_eq!(datetime(text("2023-11-14 22:13:20.123456")), Some(base + 123_456));
        assert_eq!(datetime(text("2023-11-14 22:13:20.5")), Some(base + 500_000));
        assert_eq!(datetime(text("2023-11-14T22:13:20.1234567Z")), Some(base + 123_456));
        assert_eq!(datetime(text("2023-11-14 22:13:20+00:00")), Some(base));
        assert_eq!(datetime(text("2023-11-14")), Some(base - (22 * 3600 + 13 * 60 + 20) * 1_000_000));
        assert_eq!(datetime(text("2000-01-01 00:00:00")), Some(PG_EPOCH_MICROS));
        assert_eq!(datetime(text("1969-12-31 23:59:59")), Some(-1_000_000));
        assert_eq!(datetime(ValueRef::Integer(1_700_000_000)), Some(base));
        for bad in ["2023-02-30 00:00:00", "2023-11-14 25:00:00", "yesterday", "2023-11-14 22:13:20.", "2023-11-14 22:13"] {
            assert_eq!(datetime(text(bad)), None, "{bad}");
        }
    }

    #[test]
    fn reads_integers_from_integers_text_and_whole_reals() {
        assert_eq!(integer(ValueRef::Integer(42)), Some(42));
        assert_eq!(integer(text(" 7 ")), Some(7));
        assert_eq!(integer(ValueRef::Real(3.0)), Some(3));
        assert_eq!(integer(ValueRef::Real(3.5)), None);
        assert_eq!(integer(ValueRef::Integer(1 << 40)), None);
    }

    #[test]
    fn a_null_takes_the_default_only_where_the_target_forbids_null() {
        let nullable = Column { name: "c", kind: Kind::Bool, not_null: false, default: Default::Bool(true), max_chars: None, allowed: None };
        let mut out = Vec::new();
        encode(&mut out, &nullable, ValueRef::Null, 0, true).unwrap();
        assert_eq!(out, (-1i32).to_be_bytes());
        let required = Column { not_null: true, ..nullable };
        out.clear();
        encode(&mut out, &required, ValueRef::Null, 0, true).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 1]);
        let no_default = Column { default: Default::None, ..required };
        assert_eq!(encode(&mut out, &no_default, ValueRef::Null, 0, true), Err(Rejected::MissingRequired("c")));
    }

    #[test]
    fn text_keeps_payloads_verbatim_and_refuses_what_postgresql_cannot_hold() {
        let column = Column { name: "t", kind: Kind::Text, not_null: false, default: Default::None, max_chars: Some(5), allowed: None };
        let mut out = Vec::new();
        encode(&mut out, &column, text("eJwr"), 0, true).unwrap();
        assert_eq!(out, [0, 0, 0, 4, b'e', b'J', b'w', b'r']);
        assert_eq!(encode(&mut out, &column, text("a\0b"), 0, true), Err(Rejected::NulCharacter("t")));
        assert_eq!(encode(&mut out, &column, text("toolong"), 0, true), Err(Rejected::TooLong("t", 5)));
        assert_eq!(encode(&mut out, &column, ValueRef::Blob(&[0xff, 0xfe]), 0, true), Err(Rejected::NotText("t")));
    }
}
