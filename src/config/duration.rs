//! Durations as Open WebUI writes them (`4w`, `1h30m`, `500ms`), plus plain seconds.

use std::time::Duration;

/// Parses a sum of number+unit pairs (`ms`, `s`, `m`, `h`, `d`, `w`), or a bare number of
/// seconds. `"-1"` and `"0"` mean "never" and give `Ok(None)`, as Open WebUI's
/// `JWT_EXPIRES_IN` does.
pub fn parse(input: &str) -> Result<Option<Duration>, String> {
    let s = input.trim();
    if s == "-1" || s == "0" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok(Some(Duration::from_secs_f64(secs)));
        }
        return Err(format!("invalid duration {input:?}: must be positive"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("invalid duration {input:?}: number without a unit"))?;
        if digits == 0 {
            return Err(format!("invalid duration {input:?}: expected a number"));
        }
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {input:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_secs = match rest[..unit_len].trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 604_800.0,
            other => {
                return Err(format!(
                    "invalid duration {input:?}: unknown unit {other:?} (use ms, s, m, h, d or w)"
                ));
            }
        };
        total += Duration::from_secs_f64(value * unit_secs);
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Ok(None);
    }
    Ok(Some(total))
}

/// Like [`parse`], but "never" is an error: for timeouts and TTLs that must be finite.
pub fn parse_finite(input: &str) -> Result<Duration, String> {
    parse(input)?.ok_or_else(|| format!("invalid duration {input:?}: must be greater than zero"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sums_and_units() {
        assert_eq!(parse("4w").unwrap(), Some(Duration::from_secs(4 * 604_800)));
        assert_eq!(parse("1h30m").unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(parse("500ms").unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(parse("2").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(parse("-1").unwrap(), None);
        assert_eq!(parse("0").unwrap(), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("").is_err());
        assert!(parse("5y").is_err());
        assert!(parse("h").is_err());
        assert!(parse("10 parsecs").is_err());
        assert!(parse_finite("-1").is_err());
    }
}
