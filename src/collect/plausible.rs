//! What a row of the gateway's may plausibly hold, and the reasons one is set aside.
//!
//! A fork that writes millisecond timestamps, a hand-edited row or an import gone wrong must not
//! stall the exporter or skew its figures. Every read bounds its range by these limits, and a
//! row outside them is counted in `newapi_exporter_rows_rejected_total{table,reason}`, logged
//! once per reason, and left out of the reconciliation; the usage counters still count a row
//! whose only fault is its time.

/// 2020-01-01T00:00:00Z: older than any new-api or one-api row.
pub const MIN_TIME: i64 = 1_577_836_800;
/// How far in the future a row may be dated (clock skew between nodes, a time zone slip).
pub const FUTURE_SLACK: i64 = 86_400;
/// The largest amount the gateway writes: quota and tokens are clamped to 32 bits (a quota
/// computation that overflows is saturated there and flagged `quota_saturation`).
pub const MAX_AMOUNT: i64 = i32::MAX as i64;

/// Why a row was set aside; the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// `created_at` in milliseconds (a fork's or an import's).
    TimestampMilliseconds,
    /// `created_at` before 2020, zero or negative.
    TimestampBefore2020,
    /// `created_at` more than [`FUTURE_SLACK`] ahead of now (and not milliseconds).
    TimestampFuture,
    /// A quota, token or count beyond what the gateway can write.
    AmountOutOfRange,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TimestampMilliseconds => "timestamp_milliseconds",
            Reason::TimestampBefore2020 => "timestamp_before_2020",
            Reason::TimestampFuture => "timestamp_future",
            Reason::AmountOutOfRange => "amount_out_of_range",
        }
    }

    /// The code the SQL flag column gives this reason (0 is a plausible row).
    fn code(self) -> i64 {
        match self {
            Reason::TimestampBefore2020 => 1,
            Reason::TimestampMilliseconds => 2,
            Reason::TimestampFuture => 3,
            Reason::AmountOutOfRange => 4,
        }
    }

    /// The reason an SQL flag value stands for; `None` for a plausible row.
    pub fn of_flag(flag: i64) -> Option<Reason> {
        [
            Reason::TimestampBefore2020,
            Reason::TimestampMilliseconds,
            Reason::TimestampFuture,
            Reason::AmountOutOfRange,
        ]
        .into_iter()
        .find(|r| r.code() == flag)
    }

    /// Whether a row set aside for this reason still counts in the usage counters (its amounts
    /// are sound, only its time is not).
    pub fn still_counted(self) -> bool {
        self != Reason::AmountOutOfRange
    }

    /// The reason a row with these values is set aside, or `None`: the same rules as
    /// [`Limits::flag_sql`], for rows read one by one.
    pub fn of_row(created_at: i64, amounts: &[i64], now: i64) -> Option<Reason> {
        if amounts
            .iter()
            .any(|a| !(-MAX_AMOUNT..=MAX_AMOUNT).contains(a))
        {
            return Some(Reason::AmountOutOfRange);
        }
        if created_at < MIN_TIME {
            return Some(Reason::TimestampBefore2020);
        }
        if created_at > now.saturating_add(FUTURE_SLACK) {
            let latest_ms = now.saturating_add(FUTURE_SLACK).saturating_mul(1000);
            return Some(if (MIN_TIME * 1000..=latest_ms).contains(&created_at) {
                Reason::TimestampMilliseconds
            } else {
                Reason::TimestampFuture
            });
        }
        None
    }
}

/// The limits in force for one poll.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The latest plausible `created_at`.
    pub latest: i64,
}

impl Limits {
    pub fn at(now: i64) -> Self {
        Limits {
            latest: now.saturating_add(FUTURE_SLACK),
        }
    }

    /// SQL that is true when every amount in `amounts` is within [`MAX_AMOUNT`] (NULL counts
    /// as zero, as the sums read it).
    pub fn amounts_ok_sql(amounts: &[String]) -> String {
        let parts: Vec<String> = amounts
            .iter()
            .map(|a| format!("COALESCE({a}, 0) BETWEEN {} AND {MAX_AMOUNT}", -MAX_AMOUNT))
            .collect();
        format!("({})", parts.join(" AND "))
    }

    /// An SQL expression giving each row its reason code (0: plausible). Two parameters:
    /// [`Limits::flag_params`].
    pub fn flag_sql(created_at: &str, amounts: &[String]) -> String {
        format!(
            "CASE WHEN NOT {ok} THEN {amount} \
                  WHEN {created_at} < {MIN_TIME} THEN {before} \
                  WHEN {created_at} > ? THEN \
                    CASE WHEN {created_at} BETWEEN {min_ms} AND ? THEN {ms} ELSE {future} END \
                  ELSE 0 END",
            ok = Self::amounts_ok_sql(amounts),
            amount = Reason::AmountOutOfRange.code(),
            before = Reason::TimestampBefore2020.code(),
            min_ms = MIN_TIME * 1000,
            ms = Reason::TimestampMilliseconds.code(),
            future = Reason::TimestampFuture.code(),
        )
    }

    /// The parameters of [`Limits::flag_sql`], in order.
    pub fn flag_params(&self) -> [i64; 2] {
        [self.latest, self.latest.saturating_mul(1000)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_judged_by_time_and_amount() {
        let now = 1_800_000_000;
        assert_eq!(Reason::of_row(now, &[100, 5], now), None);
        assert_eq!(
            Reason::of_row(1_795_999_694_000, &[1], now),
            Some(Reason::TimestampMilliseconds)
        );
        assert_eq!(
            Reason::of_row(i64::MAX, &[1], now),
            Some(Reason::TimestampFuture)
        );
        assert_eq!(
            Reason::of_row(now + 2 * FUTURE_SLACK, &[1], now),
            Some(Reason::TimestampFuture)
        );
        assert_eq!(Reason::of_row(now + 3600, &[1], now), None);
        assert_eq!(
            Reason::of_row(-5, &[1], now),
            Some(Reason::TimestampBefore2020)
        );
        assert_eq!(
            Reason::of_row(now, &[i64::MAX - 1], now),
            Some(Reason::AmountOutOfRange)
        );
        assert_eq!(
            Reason::of_row(now, &[-MAX_AMOUNT - 1], now),
            Some(Reason::AmountOutOfRange)
        );
        for r in [
            Reason::TimestampBefore2020,
            Reason::TimestampMilliseconds,
            Reason::TimestampFuture,
            Reason::AmountOutOfRange,
        ] {
            assert_eq!(Reason::of_flag(r.code()), Some(r));
        }
        assert_eq!(Reason::of_flag(0), None);
    }
}
