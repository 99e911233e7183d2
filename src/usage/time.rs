//! `since`/`until` values: Unix seconds or an RFC 3339 date or date-time.

/// Seconds since the epoch for `s`: digits (Unix seconds), `YYYY-MM-DD` (midnight UTC), or
/// `YYYY-MM-DDTHH:MM[:SS[.frac]]` followed by `Z` or `±HH:MM`.
pub fn parse_instant(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        // 12 digits reach the year 33658: more is not a date.
        return if s.len() <= 12 {
            s.parse().map_err(|_| "not a number".into())
        } else {
            Err("too large".into())
        };
    }
    let b = s.as_bytes();
    if !b.is_ascii() || b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err("expected Unix seconds or an RFC 3339 date like 2025-01-31T12:00:00Z".into());
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    if !(1970..=9999).contains(&year) {
        return Err("year out of range (1970-9999)".into());
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err("no such date".into());
    }
    let mut secs = days_from_civil(year, month, day) * 86_400;
    let rest = &b[10..];
    if rest.is_empty() {
        return Ok(secs);
    }
    if !matches!(rest[0], b'T' | b't' | b' ') || rest.len() < 6 || rest[3] != b':' {
        return Err("expected a time like T12:00:00Z after the date".into());
    }
    let hour = digits(&rest[1..3])?;
    let minute = digits(&rest[4..6])?;
    let mut i = 6;
    let mut second = 0;
    if rest.get(i) == Some(&b':') {
        second = digits(rest.get(i + 1..i + 3).ok_or("seconds cut short")?)?;
        i += 3;
        if rest.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while rest.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return Err("empty fraction of a second".into());
            }
        }
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("no such time of day".into());
    }
    secs += hour * 3600 + minute * 60 + second;
    let offset = match &rest[i..] {
        [b'Z' | b'z'] => 0i64,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits(&[*h1, *h2])?;
            let m = digits(&[*m1, *m2])?;
            if h > 23 || m > 59 {
                return Err("no such UTC offset".into());
            }
            let o = i64::try_from(h * 3600 + m * 60).map_err(|_| "offset")?;
            if *sign == b'+' { o } else { -o }
        }
        [] => return Err("a time needs a zone: Z or ±HH:MM".into()),
        _ => return Err("malformed zone: use Z or ±HH:MM".into()),
    };
    let secs = i64::try_from(secs).map_err(|_| "out of range")? - offset;
    u64::try_from(secs).map_err(|_| "before 1970".into())
}

fn digits(b: &[u8]) -> Result<u64, String> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Err("expected digits".into());
    }
    Ok(b.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

fn leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date on or after it (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(parse_instant("0"), Ok(0));
        assert_eq!(parse_instant("1700000000"), Ok(1_700_000_000));
        assert_eq!(parse_instant("1970-01-01"), Ok(0));
        assert_eq!(parse_instant("2000-03-01"), Ok(951_868_800));
        assert_eq!(parse_instant("2024-02-29T12:30:00Z"), Ok(1_709_209_800));
        assert_eq!(parse_instant("2024-02-29T12:30:00.123Z"), Ok(1_709_209_800));
        assert_eq!(parse_instant("2024-02-29T14:30+02:00"), Ok(1_709_209_800));
        assert_eq!(parse_instant("2024-02-29 12:30:00Z"), Ok(1_709_209_800));
    }

    #[test]
    fn refused_forms() {
        for bad in [
            "",
            "yesterday",
            "-5",
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-01-32",
            "2024-01-01T25:00:00Z",
            "2024-01-01T12:00:00",
            "2024-01-01T12:00:00+25:00",
            "1969-12-31",
            "99999999999999999999",
            "2024-01-01T12:00:00Zjunk",
            "２０２４-01-01",
            "1970-01-01T00:00:00+01:00",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad:?}");
        }
    }
}
