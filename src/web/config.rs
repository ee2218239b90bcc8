//! `--web.config.file`: TLS and basic authentication for the HTTP endpoints, in the format of
//! the Prometheus exporter-toolkit that official exporters use:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt     # relative paths are relative to this file
//!   key_file: server.key
//! basic_auth_users:
//!   prometheus: $2y$10$...    # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Settings this exporter does not implement (client certificates, cipher suites, response
//! headers) are refused with an error rather than ignored: a protection that silently does not
//! apply is worse than none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_auth_type: Option<String>,
    min_version: Option<String>,
}

/// What the web config file asks for.
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    /// Certificate chain and key, PEM.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub tls13_only: bool,
    /// user -> bcrypt hash
    pub users: BTreeMap<String, String>,
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --web.config.file {}", path.display()))?;
        let file: File = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("--web.config.file {}", path.display()))?;
        // `basic_auth_users:` with nothing under it reads as "no users": it would silently serve
        // without authentication what the operator meant to protect.
        let raw: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("--web.config.file {}", path.display()))?;
        if let Some(users) = raw.get("basic_auth_users")
            && users.as_mapping().is_none_or(|m| m.is_empty())
        {
            bail!(
                "{}: basic_auth_users is empty: list at least one user with a bcrypt hash, or \
                 remove the setting to serve without authentication",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = WebConfig::default();
        if let Some(tls) = file.tls_server_config {
            match tls.client_auth_type.as_deref() {
                None | Some("NoClientCert") => {}
                Some(other) => bail!(
                    "{}: tls_server_config.client_auth_type {other:?} is not supported (only NoClientCert)",
                    path.display()
                ),
            }
            cfg.tls13_only = match tls.min_version.as_deref() {
                None | Some("TLS12") => false,
                Some("TLS13") => true,
                Some(other) => bail!(
                    "{}: tls_server_config.min_version {other:?}: use TLS12 or TLS13",
                    path.display()
                ),
            };
            let cert = base.join(&tls.cert_file);
            let key = base.join(&tls.key_file);
            for (what, p) in [("cert_file", &cert), ("key_file", &key)] {
                if !p.is_file() {
                    bail!(
                        "{}: tls_server_config.{what} {} does not exist",
                        path.display(),
                        p.display()
                    );
                }
            }
            cfg.tls = Some((cert, key));
        }
        for (user, hash) in file.basic_auth_users.unwrap_or_default() {
            // A malformed hash would lock the user out for good; say so now.
            if bcrypt::verify("", &hash).is_err() {
                bail!(
                    "{}: basic_auth_users.{user} is not a bcrypt hash",
                    path.display()
                );
            }
            cfg.users.insert(user, hash);
        }
        Ok(cfg)
    }

    /// The rustls server configuration, when TLS is on.
    pub fn rustls(&self) -> Result<Option<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let Some((cert, key)) = &self.tls else {
            return Ok(None);
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("cert_file {}: {e}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow::anyhow!("key_file {}: {e}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS12, &rustls::version::TLS13]
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the TLS certificate and key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(config))
    }
}
