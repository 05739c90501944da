//! The daemon's API: HTTP+JSON over a UNIX socket (as Firecracker and
//! cloud-hypervisor serve theirs), on a current-thread tokio runtime that
//! sleeps while nobody calls. Every handler parses its request into an
//! [`Action`] and hands it to the registry on a blocking thread; nothing else
//! reaches the registry.
//!
//! | method | path | action |
//! |---|---|---|
//! | GET | `/v1/types` | `ListTypes` |
//! | GET | `/v1/accelerators` | `ListAccelerators` |
//! | GET | `/v1/instances[?defined=true]` | `ListInstances` |
//! | POST | `/v1/instances` | `Define` (body: `DefineRequest`) |
//! | GET | `/v1/instances/{id}` | `GetInstance` |
//! | PATCH | `/v1/instances/{id}` | `Modify` (body: `ModifyRequest`) |
//! | DELETE | `/v1/instances/{id}` | `Undefine` |
//! | POST | `/v1/instances/{id}/start` | `Start` |
//! | POST | `/v1/instances/{id}/stop` | `Stop` |

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;

use super::action::{Action, ActionError, DefineRequest, ErrorBody, ModifyRequest};
use super::registry::Registry;

/// Who called: the peer's credentials from `SO_PEERCRED`, logged with every
/// change.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Connected<IncomingStream<'_, UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match rustix::net::sockopt::socket_peercred(stream.io()) {
            Ok(c) => Caller {
                pid: c.pid.as_raw_nonzero().get(),
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
            },
            Err(_) => Caller {
                pid: 0,
                uid: u32::MAX,
                gid: u32::MAX,
            },
        }
    }
}

type Shared = Arc<Registry>;

fn error_response(e: &ActionError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(ErrorBody::from(e))).into_response()
}

fn bad_body(r: JsonRejection) -> Response {
    let e = ActionError::Invalid(format!("bad request body: {}", r.body_text()));
    error_response(&e)
}

/// Runs `action` on a blocking thread (an action may fsync or join a
/// thread) and answers with its outcome.
async fn act(reg: Shared, caller: Caller, action: Action, created: bool) -> Response {
    let mutates = action.mutates();
    let what = mutates.then(|| format!("{action:?}"));
    let result = tokio::task::spawn_blocking(move || reg.handle(action)).await;
    match result {
        Ok(Ok(outcome)) => {
            if let Some(what) = what {
                tracing::info!(
                    pid = caller.pid,
                    uid = caller.uid,
                    gid = caller.gid,
                    "{what}: ok"
                );
            }
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(outcome)).into_response()
        }
        Ok(Err(e)) => {
            if mutates {
                tracing::info!(pid = caller.pid, uid = caller.uid, "{e}");
            }
            error_response(&e)
        }
        Err(join) => {
            tracing::error!("an action panicked: {join}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ErrorBody {
                    error: "internal error (see the daemon's log)".into(),
                    kind: "internal".into(),
                }),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    defined: bool,
}

/// The `{id}` of a path, or a typed 400 (bad percent-encoding, not UTF-8).
struct Id(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Id {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match UrlPath::<String>::from_request_parts(parts, state).await {
            Ok(UrlPath(id)) => Ok(Id(id)),
            Err(e) => Err(error_response(&ActionError::Invalid(format!(
                "bad instance name or UUID in the path: {}",
                e.body_text()
            )))),
        }
    }
}

/// `?defined=true|false`, or a typed 400.
struct Defined(bool);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Defined {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<ListQuery>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(Defined(q.defined)),
            Err(e) => Err(error_response(&ActionError::Invalid(format!(
                "bad query (expected ?defined=true or false): {}",
                e.body_text()
            )))),
        }
    }
}

pub fn router(reg: Shared) -> Router {
    Router::new()
        .route(
            "/v1/types",
            get(
                |State(r): State<Shared>, ConnectInfo(c): ConnectInfo<Caller>| async move {
                    act(r, c, Action::ListTypes, false).await
                },
            ),
        )
        .route(
            "/v1/accelerators",
            get(
                |State(r): State<Shared>, ConnectInfo(c): ConnectInfo<Caller>| async move {
                    act(r, c, Action::ListAccelerators, false).await
                },
            ),
        )
        .route(
            "/v1/instances",
            get(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 Defined(defined): Defined| async move {
                    act(r, c, Action::ListInstances { defined }, false).await
                },
            )
            .post(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 body: Result<Json<DefineRequest>, JsonRejection>| async move {
                    match body {
                        Ok(Json(req)) => act(r, c, Action::Define(req), true).await,
                        Err(e) => bad_body(e),
                    }
                },
            ),
        )
        .route(
            "/v1/instances/{id}",
            get(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 Id(id): Id| async move {
                    act(r, c, Action::GetInstance { id }, false).await
                },
            )
            .patch(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 Id(id): Id,
                 body: Result<Json<ModifyRequest>, JsonRejection>| async move {
                    match body {
                        Ok(Json(changes)) => act(r, c, Action::Modify { id, changes }, false).await,
                        Err(e) => bad_body(e),
                    }
                },
            )
            .delete(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 Id(id): Id| async move {
                    act(r, c, Action::Undefine { id }, false).await
                },
            ),
        )
        .route(
            "/v1/instances/{id}/start",
            post(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 Id(id): Id| async move {
                    act(r, c, Action::Start { id }, false).await
                },
            ),
        )
        .route(
            "/v1/instances/{id}/stop",
            post(
                |State(r): State<Shared>,
                 ConnectInfo(c): ConnectInfo<Caller>,
                 Id(id): Id| async move {
                    act(r, c, Action::Stop { id }, false).await
                },
            ),
        )
        .fallback(|| async {
            let e = ActionError::Invalid("no such API path (see docs/daemon.md)".into());
            let mut r = error_response(&e);
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        })
        .method_not_allowed_fallback(|| async {
            let e = ActionError::Invalid("this path does not take that method (see docs/daemon.md)".into());
            let mut r = error_response(&e);
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        })
        .with_state(reg)
}

/// Binds the API socket: a stale socket file is replaced, a live daemon's
/// is refused; mode 0660 so the socket's group may call.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "a daemon already answers there",
                ));
            }
            // A socket nobody answers: what a killed daemon left.
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    reg: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(reg).into_make_service_with_connect_info::<Caller>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
