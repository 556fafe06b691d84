//! Durations as operators write them in settings: `30m`, `6h`, `1d`, `90s`.
//!
//! `OMNI_BACKUP_INTERVAL` is read by the gateway (to refuse a bad value before
//! anything starts) and by the worker (to run the schedule); both call this.

use std::time::Duration;

/// `30m`, `6h`, `1d`, `90s` or a bare number of seconds; `None` if invalid or zero.
pub fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&text[..i], &text[i..]),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// The canonical spelling handed from the gateway to the worker (`3600s`).
pub fn format(every: Duration) -> String {
    format!("{}s", every.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_intervals() {
        assert_eq!(parse("6h"), Some(Duration::from_secs(21_600)));
        assert_eq!(parse("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse("45"), Some(Duration::from_secs(45)));
        for bad in ["", "0s", "h", "6x", "-1h", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_handed_over_spelling_parses_back() {
        let every = Duration::from_secs(21_600);
        assert_eq!(parse(&format(every)), Some(every));
    }
}
