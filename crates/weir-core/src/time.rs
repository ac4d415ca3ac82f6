//! Timestamps and dates given on the command line.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeError {
    #[error(
        "cannot parse timestamp {0:?}: use RFC 3339 (2026-07-01T00:00:00Z), '2026-07-01 12:00:00[.ffffff][+02:00]' (UTC when no offset) or a date (midnight UTC)"
    )]
    Timestamp(String),
    #[error("cannot parse date {0:?}: use YYYY-MM-DD")]
    Date(String),
}

/// Parses an instant. Accepts RFC 3339, `YYYY-MM-DD HH:MM:SS[.ffffff][offset]` (UTC when the
/// offset is missing) and `YYYY-MM-DD` (midnight UTC). Sub-microsecond digits are refused,
/// as Postgres timestamps have microsecond precision.
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, TimeError> {
    let t = s.trim();
    let err = || TimeError::Timestamp(s.to_string());
    if let Some(frac) = t.split('.').nth(1) {
        let digits = frac.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits > 6 {
            return Err(err());
        }
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(dt) = DateTime::parse_from_str(t, fmt) {
            return Ok(dt.with_timezone(&Utc));
        }
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M"] {
        if let Ok(ndt) = NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(Utc.from_utc_datetime(&ndt));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).ok_or_else(err)?));
    }
    Err(err())
}

pub fn parse_date(s: &str) -> Result<NaiveDate, TimeError> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| TimeError::Date(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let want = Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap();
        assert_eq!(parse_timestamp("2026-07-01").unwrap(), want);
        assert_eq!(parse_timestamp("2026-07-01T00:00:00Z").unwrap(), want);
        assert_eq!(parse_timestamp("2026-07-01 02:00:00+02:00").unwrap(), want);
        assert_eq!(parse_timestamp("2026-07-01 00:00:00").unwrap(), want);
        let micro = parse_timestamp("2026-06-30 23:59:59.999999").unwrap();
        assert_eq!(micro.timestamp_micros(), want.timestamp_micros() - 1);
    }

    #[test]
    fn rejected_forms() {
        for bad in ["", "yesterday", "2026-13-01", "2026-07-01 25:00:00", "2026-07-01T00:00:00.1234567Z"] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
        assert!(parse_date("2026-02-30").is_err());
        assert_eq!(parse_date("2026-02-28").unwrap().to_string(), "2026-02-28");
    }
}
