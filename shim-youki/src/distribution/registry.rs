//! How a push or pull reaches a registry: its client (plain HTTP where the settings say), the
//! credentials of a Docker-style `config.json`, and the async runtime and TLS crypto it runs on.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use crate::template::Settings;

/// How to reach registries: which hosts speak plain HTTP, and the credentials.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Hosts (`HOST:PORT`) reached over plain HTTP (`*`: every host); loopback hosts always
    /// are.
    pub plain_http: Vec<String>,
    /// A Docker-style `config.json` (`auths`), where credentials are needed.
    pub auth_file: Option<PathBuf>,
}

impl Access {
    /// The node's: the template settings' `plain_http` and `auth_file`.
    pub fn of_node(settings: &Settings) -> Access {
        Access {
            plain_http: settings.plain_http.clone(),
            auth_file: settings.auth_file.clone(),
        }
    }

    pub(super) fn client(&self, reference: &Reference) -> Client {
        let host = reference.resolve_registry().to_string();
        let loopback = {
            let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            name == "localhost" || name.starts_with("127.") || name == "[::1]"
        };
        let protocol = if self.plain_http.iter().any(|h| h == "*") {
            ClientProtocol::Http
        } else {
            let mut plain = self.plain_http.clone();
            if loopback {
                plain.push(host);
            }
            ClientProtocol::HttpsExcept(plain)
        };
        Client::new(ClientConfig {
            protocol,
            ..Default::default()
        })
    }

    pub(super) fn auth(&self, reference: &Reference) -> Result<RegistryAuth, String> {
        let Some(file) = &self.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        let bytes = match fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        let config: Config = serde_json::from_slice(&bytes)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let host = reference.resolve_registry();
        let entry = config.auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            k.split('/').next() == Some(host)
        });
        let Some((_, entry)) = entry else {
            return Ok(RegistryAuth::Anonymous);
        };
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
        }
        let Some(auth) = &entry.auth else {
            return Ok(RegistryAuth::Anonymous);
        };
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| {
                d.split_once(':')
                    .map(|(u, p)| (u.to_string(), p.to_string()))
            })
            .ok_or_else(|| {
                format!(
                    "{}: the auth of {host} is not base64 of USER:PASSWORD",
                    file.display()
                )
            })?;
        Ok(RegistryAuth::Basic(decoded.0, decoded.1))
    }
}

pub(super) fn parse_reference(reference: &str) -> Result<Reference, String> {
    reference
        .parse::<Reference>()
        .map_err(|e| format!("{reference:?} is not an image reference: {e}"))
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start an async runtime: {e}"))
}

/// rustls needs its crypto chosen once per process: ring, which builds in seconds where
/// aws-lc takes minutes (rustls deprecates ring's provider only for its lack of post-quantum
/// key exchange; registries negotiate classical groups with it).
#[allow(deprecated)]
pub(super) fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
