//! When to try a failed request again: exponential backoff with jitter, or what the server
//! asked for in `Retry-After`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;

/// The longest `Retry-After` honoured; a server asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The wait before retry number `retry` (1 for the first retry): `first × 2^(retry − 1)`,
/// capped at `max`, then drawn uniformly from its upper half so that many clients that
/// failed together do not come back together. `unit` is a number in `[0, 1)`.
pub fn backoff(first: Duration, max: Duration, retry: usize, unit: f64) -> Duration {
    let exponent = retry.saturating_sub(1).min(30) as i32;
    let full = (first.as_secs_f64() * 2f64.powi(exponent)).min(max.as_secs_f64());
    Duration::from_secs_f64(full * (0.5 + 0.5 * unit.clamp(0.0, 1.0)))
}

/// How long the server asked the client to wait: `retry-after-ms` (milliseconds, sent by
/// OpenAI), else `Retry-After` as seconds or as an HTTP date; capped at [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let wait = if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    } else {
        let value = header("retry-after")?;
        match value.parse::<f64>() {
            Ok(seconds) if seconds.is_finite() => Duration::from_secs_f64(seconds.max(0.0)),
            _ => http_date(value)?
                .duration_since(now)
                .unwrap_or(Duration::ZERO),
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An HTTP date in its one current form, `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 §5.6.7).
fn http_date(text: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let year: i64 = year.parse().ok()?;
    let hms = time
        .split(':')
        .map(|p| p.parse::<i64>().ok())
        .collect::<Option<Vec<i64>>>()?;
    let [h, m, s] = hms[..] else {
        return None;
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let first = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        assert_eq!(backoff(first, max, 1, 1.0), first);
        assert_eq!(backoff(first, max, 3, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(first, max, 3, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(first, max, 20, 1.0), max);
        assert_eq!(backoff(first, max, usize::MAX, 0.0), max / 2);
    }

    #[test]
    fn retry_after_reads_milliseconds_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_770);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "9"), ("retry-after-ms", "250")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]),
                now
            ),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "86400")]), now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn civil_dates_count_days_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            http_date("Thu, 01 Jan 1970 00:01:40 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(100))
        );
    }
}
