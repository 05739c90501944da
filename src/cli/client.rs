//! The CLI's side of the daemon's API: one HTTP/1.1 request over the UNIX
//! socket per command (hyper's low-level client on a throwaway
//! current-thread runtime).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::daemon::action::{Action, ErrorBody};

/// Where the CLI finds the daemon, and the runtime its calls run on (one
/// per client: a benchmark or a script making many calls builds it once).
pub struct ApiClient {
    socket: PathBuf,
    rt: std::sync::OnceLock<tokio::runtime::Runtime>,
}

/// A refusal from the daemon, with its status and machine-readable kind.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub kind: String,
    pub message: String,
}

impl ApiClient {
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_owned(),
            rt: std::sync::OnceLock::new(),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None::<&()>)
    }

    pub fn send<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        self.call(method, path, body)
    }

    /// Sends `action` at the path the daemon routes to it ([`route`]).
    pub fn act<T: DeserializeOwned>(&self, action: &Action) -> anyhow::Result<T> {
        let (method, path, body) = route(action);
        self.call(method, &path, body.as_ref())
    }

    fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let rt = match self.rt.get() {
            Some(rt) => rt,
            None => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .context("cannot start a runtime for the API call")?;
                self.rt.get_or_init(|| rt)
            }
        };
        let (status, bytes) = rt.block_on(self.request(method, path, body))?;
        if !(200..300).contains(&status) {
            let e: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                kind: "unknown".into(),
            });
            return Err(ApiError {
                status,
                kind: e.kind,
                message: e.error,
            }
            .into());
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the daemon's answer to {path} is not what this CLI expects (a different wdvirt version?)"
            )
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let stream = match tokio::net::UnixStream::connect(&self.socket).await {
            Ok(s) => s,
            Err(e) => bail!(
                "cannot reach the wdvirt daemon at {}: {e}\n\
                 (start it with `wdvirt daemon`, or point --api / WDVIRT_API at its socket)",
                self.socket.display()
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the daemon")?;
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "wdvirt")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let resp = sender
            .send_request(req)
            .await
            .context("the daemon closed the connection without answering")?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        drop(sender);
        let _ = conn.await;
        Ok((status, bytes))
    }
}

/// The request `src/daemon/api.rs` routes to `action`: the client side's
/// one mapping from the daemon's actions to its REST paths (the CLI's
/// commands and the libvirt hook both send through it).
pub fn route(action: &Action) -> (Method, String, Option<serde_json::Value>) {
    let inst = |id: &str| format!("/v1/instances/{}", path_id(id));
    fn json<T: Serialize>(body: &T) -> Option<serde_json::Value> {
        Some(serde_json::to_value(body).expect("a request body serialises"))
    }
    match action {
        Action::ListTypes => (Method::GET, "/v1/types".into(), None),
        Action::ListAccelerators => (Method::GET, "/v1/accelerators".into(), None),
        Action::ListInstances { defined: false } => (Method::GET, "/v1/instances".into(), None),
        Action::ListInstances { defined: true } => {
            (Method::GET, "/v1/instances?defined=true".into(), None)
        }
        Action::GetInstance { id } => (Method::GET, inst(id), None),
        Action::Define(req) => (Method::POST, "/v1/instances".into(), json(req)),
        Action::Undefine { id } => (Method::DELETE, inst(id), None),
        Action::Start { id } => (Method::POST, format!("{}/start", inst(id)), None),
        Action::Stop { id } => (Method::POST, format!("{}/stop", inst(id)), None),
        Action::Modify { id, changes } => (Method::PATCH, inst(id), json(changes)),
        Action::Stats { vm, instance } => {
            let q: Vec<String> = [("vm", vm), ("instance", instance)]
                .into_iter()
                .filter_map(|(k, v)| Some(format!("{k}={}", path_id(v.as_deref()?))))
                .collect();
            let path = if q.is_empty() {
                "/v1/stats".into()
            } else {
                format!("/v1/stats?{}", q.join("&"))
            };
            (Method::GET, path, None)
        }
        Action::Upgrade(req) => (Method::POST, "/v1/upgrade".into(), json(req)),
    }
}

/// An instance name or UUID as one path segment or query value. Names are
/// [A-Za-z0-9._-] and UUIDs hex and dashes; anything else the daemon
/// refuses anyway, so only what would break a path is percent-encoded.
pub fn path_id(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Action, path_id, route};

    #[test]
    fn ids_are_escaped_for_the_url_path() {
        assert_eq!(path_id("zip-0"), "zip-0");
        assert_eq!(path_id("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn stats_filters_become_a_query_with_odd_characters_encoded() {
        let path = |vm: Option<&str>, instance: Option<&str>| {
            route(&Action::Stats {
                vm: vm.map(Into::into),
                instance: instance.map(Into::into),
            })
            .1
        };
        assert_eq!(path(None, None), "/v1/stats");
        assert_eq!(path(Some("web 1&x"), None), "/v1/stats?vm=web%201%26x");
        assert_eq!(path(Some("a"), Some("b")), "/v1/stats?vm=a&instance=b");
    }
}
