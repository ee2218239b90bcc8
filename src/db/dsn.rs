//! The gateway's database settings, read exactly as new-api reads them.
//!
//! `SQL_DSN` (and `LOG_SQL_DSN` for `logs`): unset means SQLite at `SQLITE_PATH`; a
//! `postgres://` or `postgresql://` URL is PostgreSQL; a value starting with `local` is SQLite
//! too; anything else is MySQL in go-sql-driver form:
//! `[user[:password]@][net[(addr)]]/dbname[?param=value&...]`. `LOG_SQL_DSN` may also be
//! ClickHouse: a URL starting with `clickhouse://`, `tcp://`, `http://` or `https://`.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::mask_password;

/// Where one of the gateway's databases is.
#[derive(Clone, PartialEq)]
pub enum DbConfig {
    Sqlite(PathBuf),
    /// A PostgreSQL URL, passed to the driver as the gateway passes it to pgx.
    Postgres(String),
    Mysql(MysqlDsn),
    /// ClickHouse, which only ever holds `logs`.
    Clickhouse(ClickhouseDsn),
}

/// A ClickHouse DSN in any form the gateway's clickhouse-go driver reads, parsed.
#[derive(Clone, PartialEq)]
pub struct ClickhouseDsn {
    /// Where the exporter sends its queries: the server's HTTP interface.
    pub http_url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: String,
    /// `secure=true` (or `https://`): TLS.
    pub secure: bool,
    /// `skip_verify=true`: TLS without verifying the server's certificate.
    pub skip_verify: bool,
    /// The DSN as given, for error messages (shown with the password masked).
    pub raw: String,
}

impl fmt::Debug for ClickhouseDsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(&self.raw))
    }
}

/// ClickHouse's HTTP ports: plain and TLS.
pub const CLICKHOUSE_HTTP_PORT: u16 = 8123;
pub const CLICKHOUSE_HTTPS_PORT: u16 = 8443;

impl ClickhouseDsn {
    /// Whether a DSN is ClickHouse (only `LOG_SQL_DSN` may be).
    pub fn is_clickhouse(dsn: &str) -> bool {
        ["clickhouse://", "tcp://", "http://", "https://"]
            .iter()
            .any(|s| dsn.starts_with(s))
    }

    /// Parses `scheme://[user[:password]@]host[:port][,host2...][/database][?param=value&...]`
    /// as clickhouse-go does: `username`, `password` and `database` may also be parameters (its
    /// older `tcp://` form), `secure=true` asks for TLS, `https` implies it. The native forms
    /// (`clickhouse://`, `tcp://`, port 9000) are read over the same server's HTTP interface,
    /// port 8123 (8443 with TLS), unless `http_url` names another.
    pub fn parse(dsn: &str, http_url: Option<&str>) -> Result<ClickhouseDsn> {
        let masked = mask_password(dsn);
        let Some((scheme, rest)) = dsn.split_once("://") else {
            bail!("LOG_SQL_DSN {masked:?} is not a ClickHouse URL");
        };
        let (body, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = body.split_once('/').unwrap_or((body, ""));
        let (creds, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let params: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_string(), percent_decode(v)),
                None => (p.to_string(), String::new()),
            })
            .collect();
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let truthy = |k: &str| param(k).is_some_and(|v| v == "true" || v == "1");
        let (mut user, mut password) = match creds.map(|c| c.split_once(':')) {
            Some(Some((u, p))) => (Some(percent_decode(u)), Some(percent_decode(p))),
            Some(None) => (Some(percent_decode(creds.unwrap_or_default())), None),
            None => (None, None),
        };
        user = user.or(param("username")).filter(|u| !u.is_empty());
        password = password.or(param("password")).filter(|p| !p.is_empty());
        let database = match path.trim_matches('/') {
            "" => param("database").unwrap_or_else(|| "default".to_string()),
            db => percent_decode(db),
        };
        let secure = scheme == "https" || truthy("secure");
        let native = match scheme {
            "clickhouse" | "tcp" => true,
            "http" | "https" => false,
            other => bail!("LOG_SQL_DSN {masked:?}: scheme {other:?} is not ClickHouse's"),
        };
        // Several hosts are tried in turn by clickhouse-go; the exporter reads from the first.
        let host = hosts.split(',').next().unwrap_or("").trim();
        if host.is_empty() {
            bail!("LOG_SQL_DSN {masked:?} names no host");
        }
        let (name, port) = match host.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') && !p.contains(']') => {
                let port: u16 = p.parse().map_err(|_| {
                    anyhow::anyhow!("LOG_SQL_DSN {masked:?}: port {p:?} is not a number")
                })?;
                (h.to_string(), Some(port))
            }
            _ => (host.to_string(), None),
        };
        let http_url = match http_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let port = match (native, secure) {
                    (true, false) => CLICKHOUSE_HTTP_PORT,
                    (true, true) => CLICKHOUSE_HTTPS_PORT,
                    (false, false) => port.unwrap_or(CLICKHOUSE_HTTP_PORT),
                    (false, true) => port.unwrap_or(CLICKHOUSE_HTTPS_PORT),
                };
                let scheme = if secure { "https" } else { "http" };
                format!("{scheme}://{name}:{port}")
            }
        };
        Ok(ClickhouseDsn {
            http_url,
            user,
            password,
            database,
            secure,
            skip_verify: truthy("skip_verify"),
            raw: dsn.to_string(),
        })
    }
}

/// A go-sql-driver MySQL DSN, parsed.
#[derive(Clone, PartialEq)]
pub struct MysqlDsn {
    pub user: String,
    pub password: Option<String>,
    pub net: MysqlNet,
    pub database: String,
    pub params: Vec<(String, String)>,
    /// The DSN as given, for error messages (shown with the password masked).
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MysqlNet {
    Tcp { host: String, port: u16 },
    Unix(String),
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Debug for MysqlDsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(&self.raw))
    }
}

impl DbConfig {
    /// Reads a DSN the way the gateway does. `None` or empty means SQLite at `sqlite_path`.
    pub fn from_dsn(dsn: Option<&str>, sqlite_path: &Path) -> Result<DbConfig> {
        let dsn = dsn.map(str::trim).unwrap_or("");
        if dsn.is_empty() || dsn.starts_with("local") {
            return Ok(DbConfig::Sqlite(sqlite_path.to_path_buf()));
        }
        if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
            return Ok(DbConfig::Postgres(dsn.to_string()));
        }
        if ClickhouseDsn::is_clickhouse(dsn) {
            return Ok(DbConfig::Clickhouse(ClickhouseDsn::parse(dsn, None)?));
        }
        Ok(DbConfig::Mysql(MysqlDsn::parse(dsn)?))
    }

    /// Safe to show: passwords masked.
    pub fn describe(&self) -> String {
        match self {
            DbConfig::Sqlite(p) => format!("sqlite:{}", p.display()),
            DbConfig::Postgres(url) => mask_password(url),
            DbConfig::Mysql(m) => format!("mysql:{}", mask_password(&m.raw)),
            DbConfig::Clickhouse(c) => {
                format!("clickhouse:{} (via {})", mask_password(&c.raw), c.http_url)
            }
        }
    }
}

/// Undoes `%XX` escapes in a parameter value (go-sql-driver unescapes them too).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MysqlDsn {
    /// Parses like go-sql-driver's `ParseDSN`: the last `/` separates the database, the last
    /// `@` before it the credentials, the first `:` in those the password.
    pub fn parse(dsn: &str) -> Result<MysqlDsn> {
        let masked = mask_password(dsn);
        let Some(slash) = dsn.rfind('/') else {
            // Without the `/dbname` part there is no telling where a password ends: say nothing
            // of the value.
            bail!(
                "SQL_DSN is neither a MySQL DSN (user:password@tcp(host:3306)/dbname) nor a \
                 postgres:// URL"
            );
        };
        let (head, tail) = (&dsn[..slash], &dsn[slash + 1..]);
        let (creds, net) = match head.rfind('@') {
            Some(at) => (&head[..at], &head[at + 1..]),
            None => ("", head),
        };
        // `user:@tcp(...)` and `user@tcp(...)` both mean "no password" to the gateway's driver.
        let (user, password) = match creds.find(':') {
            Some(c) => (
                creds[..c].to_string(),
                Some(creds[c + 1..].to_string()).filter(|p| !p.is_empty()),
            ),
            None => (creds.to_string(), None),
        };
        let net = match net.find('(') {
            None if net.is_empty() || net == "tcp" => MysqlNet::Tcp {
                host: "127.0.0.1".into(),
                port: 3306,
            },
            None => {
                bail!("SQL_DSN {masked:?}: network {net:?} needs an address, as in tcp(host:3306)")
            }
            Some(open) => {
                if !net.ends_with(')') {
                    bail!("SQL_DSN {masked:?}: unclosed '(' in the address");
                }
                let proto = &net[..open];
                let addr = &net[open + 1..net.len() - 1];
                match proto {
                    "tcp" | "tcp4" | "tcp6" => {
                        let (host, port) = match addr.rsplit_once(':') {
                            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                                let port = p.parse().map_err(|_| {
                                    anyhow::anyhow!(
                                        "SQL_DSN {masked:?}: port {p:?} is not a number"
                                    )
                                })?;
                                (h.trim_matches(['[', ']']).to_string(), port)
                            }
                            _ => (addr.to_string(), 3306),
                        };
                        let host = if host.is_empty() {
                            "127.0.0.1".into()
                        } else {
                            host
                        };
                        MysqlNet::Tcp { host, port }
                    }
                    "unix" => MysqlNet::Unix(addr.to_string()),
                    other => bail!(
                        "SQL_DSN {masked:?}: network {other:?} is not supported (tcp or unix)"
                    ),
                }
            }
        };
        let (database, query) = match tail.find('?') {
            Some(q) => (&tail[..q], &tail[q + 1..]),
            None => (tail, ""),
        };
        let params = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_string(), percent_decode(v)),
                None => (p.to_string(), String::new()),
            })
            .collect();
        Ok(MysqlDsn {
            user,
            password,
            net,
            database: database.to_string(),
            params,
            raw: dsn.to_string(),
        })
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mysql(dsn: &str) -> MysqlDsn {
        match DbConfig::from_dsn(Some(dsn), Path::new("x.db")).unwrap() {
            DbConfig::Mysql(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn clickhouse(dsn: &str) -> ClickhouseDsn {
        match DbConfig::from_dsn(Some(dsn), Path::new("x.db")).unwrap() {
            DbConfig::Clickhouse(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_clickhouse_form_of_the_gateway_is_read() {
        // The gateway's own compose file.
        let c = clickhouse("clickhouse://default:pw@clickhouse:9000/new_api_logs");
        assert_eq!(c.http_url, "http://clickhouse:8123");
        assert_eq!(
            (
                c.user.as_deref(),
                c.password.as_deref(),
                c.database.as_str()
            ),
            (Some("default"), Some("pw"), "new_api_logs")
        );
        assert!(!c.secure);
        // clickhouse-go's older form: credentials and database as parameters.
        let c = clickhouse("tcp://ch1:9000,ch2:9000?username=u&password=p%40ss&database=logs");
        assert_eq!(c.http_url, "http://ch1:8123");
        assert_eq!(
            (
                c.user.as_deref(),
                c.password.as_deref(),
                c.database.as_str()
            ),
            (Some("u"), Some("p@ss"), "logs")
        );
        let c = clickhouse("clickhouse://u:p@ch:9440/db?secure=true&skip_verify=true");
        assert_eq!(c.http_url, "https://ch:8443");
        assert!(c.secure && c.skip_verify);
        let c = clickhouse("http://ch:18123/db");
        assert_eq!(
            (c.http_url.as_str(), c.user.as_deref()),
            ("http://ch:18123", None)
        );
        let c = clickhouse("https://u:p@ch/db");
        assert_eq!(c.http_url, "https://ch:8443");
        assert!(c.secure);
        assert_eq!(clickhouse("http://ch:8123").database, "default");
        // Another HTTP address for a native DSN.
        let c =
            ClickhouseDsn::parse("clickhouse://ch:9000/db", Some("http://10.0.0.5:8123/")).unwrap();
        assert_eq!(c.http_url, "http://10.0.0.5:8123");
        // Errors name the DSN with its password masked.
        let e = DbConfig::from_dsn(Some("clickhouse://u:secret@ch:x/db"), Path::new("x.db"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("port \"x\"") && !e.contains("secret"), "{e}");
        let described = DbConfig::Clickhouse(clickhouse("clickhouse://u:secret@ch:9000/db"));
        assert!(!described.describe().contains("secret"));
        assert!(!format!("{described:?}").contains("secret"));
    }

    #[test]
    fn engines_are_chosen_like_the_gateway() {
        let p = Path::new("/data/one-api.db");
        assert_eq!(
            DbConfig::from_dsn(None, p).unwrap(),
            DbConfig::Sqlite(p.into())
        );
        assert_eq!(
            DbConfig::from_dsn(Some(""), p).unwrap(),
            DbConfig::Sqlite(p.into())
        );
        assert_eq!(
            DbConfig::from_dsn(Some("local"), p).unwrap(),
            DbConfig::Sqlite(p.into())
        );
        assert!(matches!(
            DbConfig::from_dsn(Some("postgresql://u:p@h/db?sslmode=require"), p).unwrap(),
            DbConfig::Postgres(_)
        ));
        assert!(matches!(
            DbConfig::from_dsn(Some("root:pw@tcp(db:3306)/newapi"), p).unwrap(),
            DbConfig::Mysql(_)
        ));
    }

    #[test]
    fn mysql_dsns_parse_like_go_sql_driver() {
        let m = mysql(
            "newapi:p@ss:w@rd@tcp(db.internal:3307)/new-api?charset=utf8mb4&parseTime=True&loc=Asia%2FShanghai&tls=skip-verify",
        );
        assert_eq!(m.user, "newapi");
        assert_eq!(m.password.as_deref(), Some("p@ss:w@rd"));
        assert_eq!(
            m.net,
            MysqlNet::Tcp {
                host: "db.internal".into(),
                port: 3307
            }
        );
        assert_eq!(m.database, "new-api");
        assert_eq!(m.param("loc"), Some("Asia/Shanghai"));
        assert_eq!(m.param("tls"), Some("skip-verify"));

        let m = mysql("root@unix(/run/mysqld/mysqld.sock)/newapi");
        assert_eq!(m.net, MysqlNet::Unix("/run/mysqld/mysqld.sock".into()));
        assert_eq!(m.password, None);
        let m = mysql("root:@tcp(127.0.0.1:3306)/test");
        assert_eq!(m.user, "root");
        assert_eq!(m.password, None, "an empty password is no password");

        let m = mysql("u:p@tcp(db)/x");
        assert_eq!(
            m.net,
            MysqlNet::Tcp {
                host: "db".into(),
                port: 3306
            }
        );
        let m = mysql("u:p@tcp([::1]:3306)/x");
        assert_eq!(
            m.net,
            MysqlNet::Tcp {
                host: "::1".into(),
                port: 3306
            }
        );
        let m = mysql("/newapi");
        assert_eq!(m.user, "");
        assert_eq!(
            m.net,
            MysqlNet::Tcp {
                host: "127.0.0.1".into(),
                port: 3306
            }
        );
    }

    #[test]
    fn bad_dsns_are_named_with_the_password_masked() {
        let p = Path::new("x.db");
        for dsn in [
            "root:hunter2@tcp(db:33x6)/newapi",
            "root:hunter2@tcp(db:3306/newapi",
            "root:hunter2@carrier(pigeon)/newapi",
            "root:hunter2-no-database",
        ] {
            let e = DbConfig::from_dsn(Some(dsn), p).unwrap_err().to_string();
            assert!(e.contains("SQL_DSN"), "{e}");
            assert!(!e.contains("hunter2"), "password leaked: {e}");
        }
        assert!(!format!("{:?}", mysql("u:hunter2@tcp(h:1)/d")).contains("hunter2"));
    }
}
