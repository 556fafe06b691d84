//! Backup file names: `omni_backup_YYYYMMDD_HHMMSS.sql`, UTC.
//!
//! A name is the only thing a client says about a file, so it is checked
//! here, on the decoded text, before anything touches the filesystem: exactly
//! the pattern `^omni_backup_[0-9]{8}_[0-9]{6}\.sql$`, pure ASCII, nothing
//! before or after. Every traversal trick (`..%2f`, double encoding,
//! backslashes, NUL, absolute paths, look-alike Unicode digits, a trailing
//! newline) fails this one test, so no other code needs to think about them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PREFIX: &str = "omni_backup_";
const SUFFIX: &str = ".sql";
/// `omni_backup_` + 8 digits + `_` + 6 digits + `.sql`.
const LENGTH: usize = PREFIX.len() + 8 + 1 + 6 + SUFFIX.len();

/// The pattern as the OpenAPI document and error messages state it.
pub const PATTERN: &str = r"^omni_backup_[0-9]{8}_[0-9]{6}\.sql$";

/// True when `name` is exactly a backup file name.
pub fn is_valid(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.len() != LENGTH || !name.is_ascii() || !name.starts_with(PREFIX) || !name.ends_with(SUFFIX) {
        return false;
    }
    let stamp = &bytes[PREFIX.len()..LENGTH - SUFFIX.len()];
    stamp.iter().enumerate().all(|(i, b)| if i == 8 { *b == b'_' } else { b.is_ascii_digit() })
}

/// The name of a backup taken at `time`.
pub fn for_time(time: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(time);
    format!("{PREFIX}{y:04}{mo:02}{d:02}_{h:02}{mi:02}{s:02}{SUFFIX}")
}

/// When the backup called `name` was taken, if its digits form a real date.
pub fn time_of(name: &str) -> Option<SystemTime> {
    if !is_valid(name) {
        return None;
    }
    let digits = &name[PREFIX.len()..LENGTH - SUFFIX.len()];
    let num = |range: std::ops::Range<usize>| digits[range].parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, s) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    let time = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?);
    // Reject dates such as 31 February, which would silently roll over.
    (for_time(time) == name).then_some(time)
}

/// `time` as RFC 3339 UTC, e.g. `2024-05-01T12:00:00Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(time);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Year, month, day, hour, minute, second (UTC) of `time`.
pub fn utc_parts(time: SystemTime) -> (i64, i64, i64, i64, i64, i64) {
    let secs = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, d) = civil_from_days(days);
    (y, mo, d, rest / 3600, rest % 3600 / 60, rest % 60)
}

// Howard Hinnant's civil calendar algorithms (public domain), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exactly_the_pattern() {
        assert!(is_valid("omni_backup_20240131_235959.sql"));
        for name in [
            "",
            "omni_backup_20240131_235959.sql\n",
            " omni_backup_20240131_235959.sql",
            "omni_backup_20240131_23595.sql",
            "omni_backup_2024013_1235959.sql",
            "omni_backup_20240131-235959.sql",
            "omni_backup_20240131_235959.SQL",
            "../omni_backup_20240131_235959.sql",
            "/omni_backup_20240131_235959.sql",
            "omni_backup_2024013١_235959.sql",
            "omni_backup_20240131_235959.sql\0",
            "omni_backup_20240131_235959.sq",
        ] {
            assert!(!is_valid(name), "{name:?}");
        }
    }

    #[test]
    fn names_round_trip_through_time() {
        let time = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        let name = for_time(time);
        assert_eq!(name, "omni_backup_20240229_235959.sql");
        assert_eq!(time_of(&name), Some(time));
        assert_eq!(rfc3339(time), "2024-02-29T23:59:59Z");
        assert_eq!(time_of("omni_backup_20230229_000000.sql"), None);
        assert_eq!(time_of("omni_backup_20231301_000000.sql"), None);
    }
}
