//! `[resource.nbd]`: who may connect to a resource's NBD export, over what, and for how long;
//! and its validation.

use super::*;

/// `tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain NBD only (`NBD_OPT_STARTTLS` is unsupported).
    #[default]
    Off,
    /// Clients choose: plain or TLS.
    Optional,
    /// TLS before anything else; plain clients get no export.
    Require,
}

/// `[resource.nbd]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nbd {
    /// off | optional | require.
    pub tls: TlsMode,
    /// The server certificate chain (PEM); required with TLS.
    pub tls_cert: PathBuf,
    /// Its private key (PEM, not world-readable); required with TLS.
    pub tls_key: PathBuf,
    /// Clients must present a certificate this CA signed (PEM); empty: none asked for.
    pub tls_client_ca: PathBuf,
    /// Client networks let in (`ADDRESS/PREFIX`); empty: every address.
    pub allow: Vec<IpPrefix>,
    /// A connection that sends no request for this long (with nothing in flight) is closed;
    /// 0: never.
    pub idle_timeout_ms: u64,
    /// A client that reads none of its replies for this long is disconnected.
    pub reply_deadline_ms: u64,
    /// Connections at once on this listener.
    pub max_connections: u32,
    /// Connections from one address at once.
    pub max_per_source: u32,
}

impl Default for Nbd {
    fn default() -> Self {
        Self {
            tls: TlsMode::Off,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            allow: Vec::new(),
            idle_timeout_ms: 0,
            reply_deadline_ms: 30_000,
            max_connections: 128,
            max_per_source: 64,
        }
    }
}

impl Nbd {
    /// The certificate files when TLS is on.
    pub fn tls_files(&self) -> Option<replicator::nbd::tls::TlsFiles> {
        (self.tls != TlsMode::Off).then(|| replicator::nbd::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: (!self.tls_client_ca.as_os_str().is_empty())
                .then(|| self.tls_client_ca.clone()),
        })
    }

    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let k = |f: &str| format!("resource[{i}].nbd.{f}");
        let paths = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
        ];
        for (f, p) in paths {
            let set = !p.as_os_str().is_empty();
            if set && self.tls == TlsMode::Off {
                return Err(invalid(
                    k(f),
                    p.display(),
                    "set while tls = \"off\"",
                    "set tls = \"require\" (or \"optional\"), or remove the key",
                ));
            }
            if set && !p.is_absolute() {
                return Err(invalid(
                    k(f),
                    p.display(),
                    "must be an absolute path",
                    "e.g. /etc/duet/tls/server-cert.pem",
                ));
            }
            if !set && self.tls != TlsMode::Off && f != "tls_client_ca" {
                return Err(invalid(
                    k(f),
                    "",
                    "missing; TLS needs a certificate and its key",
                    "set tls_cert and tls_key to PEM files (or tls = \"off\")",
                ));
            }
        }
        let idle = self.idle_timeout_ms;
        if idle != 0 && !(1000..=86_400_000).contains(&idle) {
            return Err(invalid(
                k("idle_timeout_ms"),
                idle,
                "must be 0 (never) or from 1000 to 86400000 (a day)",
                "use 0 (the default) or e.g. 600000",
            ));
        }
        if !(1000..=600_000).contains(&self.reply_deadline_ms) {
            return Err(invalid(
                k("reply_deadline_ms"),
                self.reply_deadline_ms,
                "must be from 1000 to 600000",
                "use 30000 (the default)",
            ));
        }
        if !(1..=4096).contains(&self.max_connections) {
            return Err(invalid(
                k("max_connections"),
                self.max_connections,
                "must be from 1 to 4096",
                "use 128 (the default)",
            ));
        }
        if self.max_per_source == 0 || self.max_per_source > self.max_connections {
            return Err(invalid(
                k("max_per_source"),
                self.max_per_source,
                "must be from 1 to max_connections",
                "use 64 (the default), or half of max_connections",
            ));
        }
        Ok(())
    }

    /// The server's policy, with the TLS configuration already built (`None` with TLS off).
    pub fn policy(
        &self,
        tls: Option<std::sync::Arc<replicator::nbd::tls::ServerConfig>>,
    ) -> replicator::nbd::server::Policy {
        use replicator::nbd::server::{Network, Policy, TlsPolicy};
        let ms = std::time::Duration::from_millis;
        Policy {
            tls: match tls {
                Some(c) if self.tls != TlsMode::Off => {
                    TlsPolicy::new(self.tls == TlsMode::Require, c)
                }
                _ => TlsPolicy::Off,
            },
            allow: self.allow.iter().map(|p| Network { addr: p.addr, len: p.len }).collect(),
            idle_timeout: (self.idle_timeout_ms > 0).then(|| ms(self.idle_timeout_ms)),
            reply_deadline: ms(self.reply_deadline_ms),
            max_connections: self.max_connections as usize,
            max_per_source: self.max_per_source as usize,
        }
    }
}
