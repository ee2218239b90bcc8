//! Time as the gateway stores it: unix seconds, bucketed into hours for quota_data. A leaf:
//! every layer may use it, it uses nothing of the crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One hour in seconds: quota_data's bucket.
pub const HOUR: i64 = 3600;
pub const DAY: i64 = 24 * HOUR;

/// Start of the hour holding `t` (unix seconds).
pub fn hour_of(t: i64) -> i64 {
    t - t.rem_euclid(HOUR)
}

/// The current time in unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// Unix seconds as RFC 3339 UTC, or `-` for none.
pub fn rfc3339(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t as u64)).to_string()
}

/// Seconds as a readable duration (`2days 48m 20s`); negative as zero.
pub fn duration(seconds: i64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_start_on_the_hour_before_and_after_the_epoch() {
        assert_eq!(hour_of(7199), 3600);
        assert_eq!(hour_of(7200), 7200);
        assert_eq!(hour_of(-1), -3600);
    }

    #[test]
    fn times_and_durations_read_as_people_write_them() {
        assert_eq!(rfc3339(0), "-");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(duration(-5), "0s");
        assert_eq!(duration(3 * HOUR + 20), "3h 20s");
    }
}
