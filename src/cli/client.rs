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

use crate::daemon::action::ErrorBody;

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
