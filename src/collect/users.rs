//! The users' side of the gateway's second ledger: the sums of `users.used_quota` and
//! `users.request_count`, which every charged request raises (no per-user label: users are
//! unbounded).
//!
//! One short aggregate over the table per poll. Soft-deleted users keep their history, so they
//! count too. A value beyond 2^50 (far past what any gateway charges one user) is left out of
//! the sum, so that it cannot overflow, and counted as a rejected row.

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::plausible::Reason;
use super::{Collector, Context};
use crate::db::{Sources, Value};
use crate::metrics::{self as m, Family};

/// Largest value one user's column may hold and still be summed.
const MAX_USER_AMOUNT: i64 = 1 << 50;

#[derive(Debug, Default)]
pub struct UsersCollector {
    /// (used_quota, request_count) sums; None for a column the table lacks.
    sums: Option<(Option<i64>, Option<i64>)>,
}

impl Collector for UsersCollector {
    fn name(&self) -> &'static str {
        "users"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let Some(cols) = ctx.schema.users.clone() else {
            return Ok(());
        };
        let db = src.main();
        let d = db.dialect();
        let sound = |c: &str| format!("{c} BETWEEN -{MAX_USER_AMOUNT} AND {MAX_USER_AMOUNT}");
        let column = |name: &str| {
            cols.has(name).then(|| {
                let c = d.ident(name);
                (
                    d.sum_int(&format!("CASE WHEN {} THEN {c} ELSE 0 END", sound(&c))),
                    format!("CASE WHEN {} THEN 0 ELSE 1 END", sound(&c)),
                )
            })
        };
        let (used, requests) = (column("used_quota"), column("request_count"));
        if used.is_none() && requests.is_none() {
            return Ok(());
        }
        let none = ("NULL".to_string(), "0".to_string());
        let (u, r) = (
            used.clone().unwrap_or(none.clone()),
            requests.clone().unwrap_or(none),
        );
        let sql = format!(
            "SELECT COUNT(*), {}, {}, {} FROM users",
            u.0,
            r.0,
            d.sum_int(&format!(
                "CASE WHEN {} = 1 OR {} = 1 THEN 1 ELSE 0 END",
                u.1, r.1
            )),
        );
        let rows = db.query(&sql, &[])?;
        let cell = |i: usize| {
            rows.first()
                .and_then(|row| row.get(i))
                .and_then(Value::as_i64)
        };
        ctx.count_rows("users", cell(0).unwrap_or(0).max(0) as u64);
        let rejected = cell(3).unwrap_or(0);
        if rejected > 0 {
            ctx.reject("users", Reason::AmountOutOfRange, 0, rejected as u64);
        }
        // SUM over no rows is NULL: an empty table sums to 0.
        self.sums = Some((
            used.map(|_| cell(1).unwrap_or(0)),
            requests.map(|_| cell(2).unwrap_or(0)),
        ));
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let Some((used, requests)) = self.sums else {
            return;
        };
        let mut used_quota = Family::of(&m::USERS_USED_QUOTA);
        let mut request_count = Family::of(&m::USERS_REQUESTS);
        if let Some(v) = used {
            used_quota.sample(&[], v as f64);
        }
        if let Some(v) = requests {
            request_count.sample(&[], v as f64);
        }
        used_quota.finish(out);
        request_count.finish(out);
    }
}
