//! Engine facts: how each engine spells what differs (quoting, integer sums, byte-exact text
//! comparison, float casts). The one place that knows them.

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Mysql,
    Postgres,
    /// Only ever `logs` (`LOG_SQL_DSN`).
    Clickhouse,
}

/// SQL spelling that differs between engines: the engine, and on MySQL and MariaDB the binary
/// collation without trailing-space padding that the server has (MariaDB 10.2 on,
/// MySQL 8.0.17 on), which groups text byte for byte faster than a cast to binary.
#[derive(Debug, Clone, Copy)]
pub struct Dialect(pub Engine, pub Option<&'static str>);

impl Dialect {
    /// An engine's spelling without a server-specific collation.
    pub fn of(engine: Engine) -> Self {
        Dialect(engine, None)
    }
}

impl Dialect {
    /// Quotes an identifier; needed for the gateway's reserved-word columns `group` and `key`.
    pub fn ident(&self, name: &str) -> String {
        match self.0 {
            Engine::Sqlite | Engine::Mysql | Engine::Clickhouse => format!("`{name}`"),
            Engine::Postgres => format!("\"{name}\""),
        }
    }

    /// `SUM` of an integer expression, typed as a 64-bit integer on every engine (MySQL and
    /// PostgreSQL widen integer sums to DECIMAL/NUMERIC).
    pub fn sum_int(&self, expr: &str) -> String {
        match self.0 {
            Engine::Sqlite => format!("SUM({expr})"),
            Engine::Mysql => format!("CAST(SUM({expr}) AS SIGNED)"),
            Engine::Postgres => format!("CAST(SUM({expr}) AS BIGINT)"),
            Engine::Clickhouse => format!("toInt64(SUM({expr}))"),
        }
    }

    /// The whole number stored under `"key":` in a JSON text column, or -1 where the text has
    /// none. Read as text, not parsed as JSON: the gateway's `other` column is not always valid
    /// JSON (empty on old rows), and a JSON function would fail the whole statement on MySQL and
    /// PostgreSQL. The gateway writes it compactly (`"frt":1234`), as Go's encoder does.
    pub fn json_int(&self, column: &str, key: &str) -> String {
        let needle = format!("\"{key}\":");
        // 1-based position of the first character after the needle.
        let at = format!("instr({column}, '{needle}') + {}", needle.len());
        match self.0 {
            // CAST takes the leading digits of what follows.
            // A missing needle makes the position NULL, and the test false.
            Engine::Sqlite => format!(
                "CASE WHEN substr({column}, NULLIF(instr({column}, '{needle}'), 0) + {n}, 1) \
                 BETWEEN '0' AND '9' THEN CAST(substr({column}, {at}, 16) AS INTEGER) ELSE -1 END",
                n = needle.len()
            ),
            // CAST takes the leading digits (with a warning, not an error, in a SELECT); no
            // REGEXP_SUBSTR, which MySQL 5.7 lacks.
            Engine::Mysql => format!(
                "CASE WHEN LOCATE('{needle}', {column}) > 0 AND SUBSTRING({column}, \
                 LOCATE('{needle}', {column}) + {n}, 1) BETWEEN '0' AND '9' THEN CAST(SUBSTRING(\
                 {column}, LOCATE('{needle}', {column}) + {n}, 16) AS SIGNED) ELSE -1 END",
                n = needle.len()
            ),
            Engine::Postgres => format!(
                "COALESCE(CAST(substring({column} from '\"{key}\":([0-9]{{1,15}})') AS BIGINT), -1)"
            ),
            Engine::Clickhouse => format!(
                "if(match({column}, '\"{key}\":[0-9]'), \
                 toInt64OrZero(extract({column}, '\"{key}\":([0-9]{{1,15}})')), -1)"
            ),
        }
    }

    /// The bucket of a whole-number `value` among ascending `bounds`: the first `i` with
    /// `value <= bounds[i]`, `bounds.len()` beyond the last, -1 when negative or NULL. Where the
    /// engine has one, a single function call, so that `value` (perhaps text taken apart) is
    /// computed once.
    pub fn bucket_index(&self, value: &str, bounds: &[i64]) -> String {
        // Thresholds for "how many are at most value": 0, then each bound + 1.
        let thresholds: Vec<String> = std::iter::once(0)
            .chain(bounds.iter().map(|b| b + 1))
            .map(|t| t.to_string())
            .collect();
        match self.0 {
            Engine::Postgres => format!(
                "COALESCE(width_bucket(CAST({value} AS BIGINT), ARRAY[{}]::bigint[]) - 1, -1)",
                thresholds.join(", ")
            ),
            // INTERVAL() is -1 for NULL.
            Engine::Mysql => format!(
                "GREATEST(INTERVAL({value}, {}) - 1, -1)",
                thresholds.join(", ")
            ),
            Engine::Sqlite | Engine::Clickhouse => {
                let whens: Vec<String> = bounds
                    .iter()
                    .enumerate()
                    .map(|(i, le)| format!("WHEN {value} <= {le} THEN {i}"))
                    .collect();
                format!(
                    "CASE WHEN {value} IS NULL OR {value} < 0 THEN -1 {} ELSE {} END",
                    whens.join(" "),
                    bounds.len()
                )
            }
        }
    }

    /// `value` held to `[low, high]`, computed once; NULL counts as 0 on every engine
    /// (PostgreSQL's `LEAST` skips a NULL argument, which would make NULL the upper bound).
    pub fn clamp(&self, value: &str, low: i64, high: i64) -> String {
        let value = format!("COALESCE({value}, 0)");
        match self.0 {
            Engine::Sqlite => format!("max(min({value}, {high}), {low})"),
            Engine::Mysql | Engine::Postgres => format!("GREATEST(LEAST({value}, {high}), {low})"),
            Engine::Clickhouse => format!("greatest(least({value}, {high}), {low})"),
        }
    }

    /// A text column as a grouping key that keeps values apart byte for byte: MySQL's default
    /// collations fold case and trailing spaces, which would merge distinct model names.
    pub fn text_key(&self, expr: &str) -> String {
        match self.0 {
            // Converted first: the column may have another character set.
            Engine::Mysql => match self.1 {
                Some(collation) => format!("CONVERT({expr} USING utf8mb4) COLLATE {collation}"),
                None => format!("CAST({expr} AS BINARY)"),
            },
            Engine::Sqlite | Engine::Postgres | Engine::Clickhouse => expr.to_string(),
        }
    }

    /// `column = ?` compared byte for byte, as [`Dialect::text_key`] groups.
    pub fn text_eq(&self, column: &str) -> String {
        match self.0 {
            Engine::Mysql => format!("CAST({column} AS BINARY) = CAST(? AS BINARY)"),
            Engine::Sqlite | Engine::Postgres | Engine::Clickhouse => format!("{column} = ?"),
        }
    }

    /// A real-valued column read as a float (new-api's PostgreSQL tables may store NUMERIC).
    pub fn float(&self, expr: &str) -> String {
        match self.0 {
            Engine::Postgres => format!("CAST({expr} AS DOUBLE PRECISION)"),
            Engine::Clickhouse => format!("toFloat64({expr})"),
            Engine::Sqlite | Engine::Mysql => expr.to_string(),
        }
    }

    /// `GROUP BY` over select-list positions (1-based). ClickHouse releases before 22.7 read
    /// `GROUP BY 1` as a constant, so there each position names its column's alias, `c{n}`,
    /// which the select list must give (see [`Dialect::select_list`]).
    pub fn group_by(&self, positions: &[usize]) -> String {
        let names: Vec<String> = positions
            .iter()
            .map(|p| match self.0 {
                Engine::Clickhouse => format!("c{p}"),
                _ => p.to_string(),
            })
            .collect();
        format!(" GROUP BY {}", names.join(", "))
    }

    /// A select list; on ClickHouse each expression gets the alias `c{n}` (1-based) that
    /// [`Dialect::group_by`] names.
    pub fn select_list(&self, exprs: &[String]) -> String {
        match self.0 {
            Engine::Clickhouse => exprs
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{e} AS c{}", i + 1))
                .collect::<Vec<_>>()
                .join(", "),
            _ => exprs.join(", "),
        }
    }
}
