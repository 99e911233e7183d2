//! The date and time placeholders of system prompts, formatted as Open WebUI's
//! `prompt_template` does (`%Y-%m-%d`, `%I:%M:%S %p`), in UTC.

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formatted pieces of an instant.
pub struct Now {
    pub date: String,
    pub time: String,
    pub weekday: &'static str,
}

pub fn at(epoch_secs: u64) -> Now {
    const WEEKDAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let secs = i64::try_from(epoch_secs).unwrap_or(i64::MAX);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil(days);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let h12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let ampm = if hour < 12 { "AM" } else { "PM" };
    Now {
        date: format!("{year:04}-{month:02}-{day:02}"),
        time: format!("{h12:02}:{minute:02}:{second:02} {ampm}"),
        weekday: WEEKDAYS[usize::try_from(days.rem_euclid(7)).unwrap_or(0)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_strftime() {
        let n = at(0);
        assert_eq!(
            (n.date.as_str(), n.time.as_str(), n.weekday),
            ("1970-01-01", "12:00:00 AM", "Thursday")
        );
        // 2024-02-29 13:05:09 UTC, a leap day.
        let n = at(1_709_211_909);
        assert_eq!(
            (n.date.as_str(), n.time.as_str(), n.weekday),
            ("2024-02-29", "01:05:09 PM", "Thursday")
        );
        let n = at(951_782_400); // 2000-02-29 00:00:00
        assert_eq!(n.date, "2000-02-29");
        let n = at(4_102_444_799); // 2099-12-31 23:59:59
        assert_eq!(
            (n.date.as_str(), n.time.as_str()),
            ("2099-12-31", "11:59:59 PM")
        );
    }
}
