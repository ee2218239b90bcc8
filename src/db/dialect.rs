//! Engine facts: how each engine spells what differs (quoting, integer sums, byte-exact text
//! comparison, float casts). The one place that knows them.

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Mysql,
    Postgres,
}

/// SQL spelling that differs between engines.
#[derive(Debug, Clone, Copy)]
pub struct Dialect(pub Engine);

impl Dialect {
    /// Quotes an identifier; needed for the gateway's reserved-word columns `group` and `key`.
    pub fn ident(&self, name: &str) -> String {
        match self.0 {
            Engine::Sqlite | Engine::Mysql => format!("`{name}`"),
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
        }
    }

    /// A text column as a grouping key that keeps values apart byte for byte: MySQL's default
    /// collations fold case and trailing spaces, which would merge distinct model names.
    pub fn text_key(&self, expr: &str) -> String {
        match self.0 {
            Engine::Mysql => format!("CAST({expr} AS BINARY)"),
            Engine::Sqlite | Engine::Postgres => expr.to_string(),
        }
    }

    /// `column = ?` compared byte for byte, as [`Dialect::text_key`] groups.
    pub fn text_eq(&self, column: &str) -> String {
        match self.0 {
            Engine::Mysql => format!("CAST({column} AS BINARY) = CAST(? AS BINARY)"),
            Engine::Sqlite | Engine::Postgres => format!("{column} = ?"),
        }
    }

    /// A real-valued column read as a float (new-api's PostgreSQL tables may store NUMERIC).
    pub fn float(&self, expr: &str) -> String {
        match self.0 {
            Engine::Postgres => format!("CAST({expr} AS DOUBLE PRECISION)"),
            Engine::Sqlite | Engine::Mysql => expr.to_string(),
        }
    }
}
