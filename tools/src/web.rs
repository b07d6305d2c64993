//! `web.fetch`: an HTTP GET to an allowed host, with limits on size and time. Hosts are allowed by
//! name (`example.org`) or by suffix (`*.example.org`); redirects are followed only to allowed
//! hosts; nothing but http and https is fetched.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// `web.fetch`'s settings.
#[derive(Clone, Debug)]
pub struct WebSettings {
    /// Hosts that may be fetched (`host`, `host:port` or `*.domain`); none: the tool refuses all.
    pub allow: Vec<String>,
    pub timeout: Duration,
    /// Bytes of a body kept.
    pub max_bytes: usize,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings {
            allow: Vec::new(),
            timeout: Duration::from_secs(20),
            max_bytes: 512 * 1024,
        }
    }
}

/// `web.fetch`'s input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchInput {
    pub url: String,
}

/// What a fetch brought back.
#[derive(Debug, Serialize)]
pub struct Fetched {
    pub url: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The body as text (invalid UTF-8 replaced), cut at the size limit.
    pub body: String,
    pub bytes: usize,
    pub truncated: bool,
}

fn allowed(allow: &[String], url: &url::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    let with_port = url.port().map(|port| format!("{host}:{port}"));
    allow.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        if let Some(domain) = entry.strip_prefix("*.") {
            host.ends_with(&format!(".{domain}"))
        } else {
            entry == host || Some(&entry) == with_port.as_ref()
        }
    })
}

/// The checked URL, or why it is refused.
fn check(settings: &WebSettings, text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https are fetched, not {}",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("URLs with credentials are refused".into());
    }
    if !allowed(&settings.allow, &url) {
        return Err(if settings.allow.is_empty() {
            "no host is allowed for web.fetch on this node (STELE_WEB_ALLOW)".into()
        } else {
            format!(
                "{} is not an allowed host (allowed: {})",
                url.host_str().unwrap_or("?"),
                settings.allow.join(", ")
            )
        });
    }
    Ok(url)
}

/// The web tool: a client that follows redirects to allowed hosts only.
pub struct Web {
    settings: WebSettings,
    client: reqwest::Client,
}

impl Web {
    pub fn new(settings: WebSettings) -> Web {
        let allow = settings.allow.clone();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("stele/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("more than 5 redirects")
                } else if allowed(&allow, attempt.url()) {
                    attempt.follow()
                } else {
                    let to = attempt.url().host_str().unwrap_or("?").to_owned();
                    attempt.error(format!("a redirect to {to}, which is not an allowed host"))
                }
            }))
            .build()
            .expect("an HTTP client builds");
        Web { settings, client }
    }

    pub fn settings(&self) -> &WebSettings {
        &self.settings
    }

    /// Fetches `input.url`.
    pub async fn fetch(&self, input: FetchInput) -> Result<Fetched, String> {
        let url = check(&self.settings, &input.url)?;
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("fetching {url} failed: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        let mut truncated = false;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("reading {url} failed: {}", error_chain(&e)))?;
            let room = self.settings.max_bytes - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            url: url.to_string(),
            status,
            content_type,
            bytes: body.len(),
            body: String::from_utf8_lossy(&body).into_owned(),
            truncated,
        })
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_allowed_by_name_port_or_suffix() {
        let settings = WebSettings {
            allow: vec![
                "example.org".into(),
                "*.docs.rs".into(),
                "127.0.0.1:8080".into(),
            ],
            ..WebSettings::default()
        };
        assert!(check(&settings, "https://example.org/a").is_ok());
        assert!(check(&settings, "https://EXAMPLE.org/a").is_ok());
        assert!(check(&settings, "https://serde.docs.rs/").is_ok());
        assert!(check(&settings, "http://127.0.0.1:8080/x").is_ok());
        assert!(check(&settings, "http://127.0.0.1:8081/x").is_err());
        assert!(check(&settings, "https://docs.rs/").is_err());
        assert!(check(&settings, "https://example.org.evil.com/").is_err());
        assert!(check(&settings, "file:///etc/passwd").is_err());
        assert!(check(&settings, "https://user:pw@example.org/").is_err());
        assert!(check(&WebSettings::default(), "https://example.org/").is_err());
    }
}
