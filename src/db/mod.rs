//! Access to the gateway's database: one file per engine behind the [`Database`] trait.
//!
//! Collectors own their SQL (written once, with `?` placeholders and identifiers quoted through
//! [`Dialect`]); an engine only runs statements and turns rows into [`Value`]s. The trait is
//! synchronous: polling runs on its own thread, so a slow database never stalls a scrape.

pub mod sqlite;

use anyhow::Result;

/// A cell read from the database, decoded without assuming the column's declared type
/// (SQLite stores whatever the gateway wrote; older schemas differ).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Value {
    /// Integer view: reals are truncated, numeric text is parsed, anything else is `None`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Real(f) if f.is_finite() => Some(*f as i64),
            Value::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Real(f) => Some(*f),
            Value::Text(s) => s.trim().parse().ok(),
            Value::Null => None,
        }
    }

    /// The value as a label: NULL becomes the empty string, numbers their decimal form.
    pub fn to_label(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Int(i) => i.to_string(),
            Value::Real(f) => f.to_string(),
            Value::Text(s) => s.clone(),
        }
    }
}

pub type Row = Vec<Value>;

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
}

/// SQL spelling that differs between engines.
#[derive(Debug, Clone, Copy)]
pub struct Dialect(pub Engine);

impl Dialect {
    /// Quotes an identifier; needed for the gateway's reserved-word columns `group` and `key`.
    pub fn ident(&self, name: &str) -> String {
        match self.0 {
            Engine::Sqlite => format!("`{name}`"),
        }
    }

    /// `SUM` of an integer expression, typed as a 64-bit integer on every engine.
    pub fn sum_int(&self, expr: &str) -> String {
        match self.0 {
            Engine::Sqlite => format!("SUM({expr})"),
        }
    }
}

/// One connection to one gateway database (the main one or the separate logs database).
pub trait Database: Send {
    fn dialect(&self) -> Dialect;

    /// Where the connection points, safe to show (passwords masked).
    fn describe(&self) -> String;

    /// Column names of `table`, or `None` when the table does not exist.
    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>>;

    /// Runs one read statement. `?` marks a parameter. Each call is its own short statement:
    /// no transaction is held open across calls.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
}

/// Masks the password in a connection string for display (`user:***@host`).
pub fn mask_password(dsn: &str) -> String {
    let Some(at) = dsn.rfind('@') else {
        return dsn.to_string();
    };
    let head = &dsn[..at];
    let start = head.find("://").map(|i| i + 3).unwrap_or(0);
    match head[start..].find(':') {
        Some(colon) => format!("{}:***{}", &head[..start + colon], &dsn[at..]),
        None => dsn.to_string(),
    }
}

/// The gateway's databases: the main one, and the one holding `logs` when the gateway runs with
/// `LOG_SQL_DSN` (otherwise `logs` lives in the main one too).
pub struct Sources {
    main: Box<dyn Database>,
    logs: Option<Box<dyn Database>>,
}

impl Sources {
    pub fn new(main: Box<dyn Database>, logs: Option<Box<dyn Database>>) -> Self {
        Sources { main, logs }
    }

    pub fn main(&mut self) -> &mut dyn Database {
        self.main.as_mut()
    }

    pub fn logs(&mut self) -> &mut dyn Database {
        match &mut self.logs {
            Some(db) => db.as_mut(),
            None => self.main.as_mut(),
        }
    }

    /// Human-readable description of every database in use, passwords masked.
    pub fn describe(&self) -> String {
        match &self.logs {
            Some(logs) => format!("{} (logs: {})", self.main.describe(), logs.describe()),
            None => self.main.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_in_both_dsn_forms() {
        assert_eq!(
            mask_password("root:s3cr:et@tcp(db:3306)/newapi"),
            "root:***@tcp(db:3306)/newapi"
        );
        assert_eq!(
            mask_password("postgres://u:pw@host:5432/db?sslmode=require"),
            "postgres://u:***@host:5432/db?sslmode=require"
        );
        assert_eq!(
            mask_password("postgres://u@host/db"),
            "postgres://u@host/db"
        );
        assert_eq!(mask_password("/data/one-api.db"), "/data/one-api.db");
    }

    #[test]
    fn values_convert_without_panicking() {
        assert_eq!(Value::Text(" 42 ".into()).as_i64(), Some(42));
        assert_eq!(Value::Text("x".into()).as_i64(), None);
        assert_eq!(Value::Real(f64::NAN).as_i64(), None);
        assert_eq!(Value::Null.to_label(), "");
        assert_eq!(Value::Int(7).to_label(), "7");
    }
}
