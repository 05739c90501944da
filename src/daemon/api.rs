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
//! | GET | `/v1/stats[?vm=NAME][&instance=ID]` | `Stats` |
//! | GET | `/metrics` | `Stats`, as Prometheus text (also on `--metrics-addr`) |
//! | GET | `/v1/access` | who may call and who owns instance sockets (`access::AccessView`) |
//!
//! Every request passes [`ApiAccess`]'s rule first (`access`): a caller
//! outside it gets 403 `forbidden`.

use std::os::fd::AsFd;
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

use super::access::{AccessView, ApiAccess, FORBIDDEN, PeerCreds};
use super::action::{Action, ActionError, DefineRequest, ErrorBody, ModifyRequest, UpgradeRequest};
use super::registry::Registry;

/// Who called: the peer's credentials from `SO_PEERCRED` (and
/// `SO_PEERGROUPS`), checked against the API's rule ([`ApiAccess`]) before
/// any handler runs, and logged with every change.
#[derive(Clone, Debug)]
pub struct Caller(pub PeerCreds);

impl Connected<IncomingStream<'_, UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Caller(PeerCreds::of(stream.io().as_fd()))
    }
}

type Shared = Arc<Registry>;

fn error_response(e: &ActionError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(ErrorBody::from(e))).into_response()
}

fn invalid(msg: String) -> Response {
    error_response(&ActionError::Invalid(msg))
}

/// What every handler has: the registry and who called.
struct Call {
    reg: Shared,
    caller: PeerCreds,
}

impl axum::extract::FromRequestParts<Shared> for Call {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        reg: &Shared,
    ) -> Result<Self, Self::Rejection> {
        // Served with `into_make_service_with_connect_info::<Caller>`, so
        // every request carries its caller.
        let caller = parts
            .extensions
            .get::<ConnectInfo<Caller>>()
            .map_or(PeerCreds::UNKNOWN, |c| c.0.0.clone());
        Ok(Call {
            reg: reg.clone(),
            caller,
        })
    }
}

impl Call {
    /// Runs `action` on a blocking thread (an action may fsync or join a
    /// thread) and answers with its outcome: 201 for a definition, else 200.
    async fn act(self, action: Action) -> Response {
        let Call { reg, caller } = self;
        let created = matches!(action, Action::Define(_));
        let what = action.mutates().then(|| format!("{action:?}"));
        let result = tokio::task::spawn_blocking(move || reg.handle(action)).await;
        // Every change is logged with its caller, whatever came of it.
        if let (Some(what), Ok(r)) = (&what, &result) {
            let outcome = match r {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("refused: {e}"),
            };
            tracing::info!(
                pid = caller.pid,
                uid = caller.uid,
                gid = caller.gid,
                "{what}: {outcome}"
            );
        }
        match result {
            Ok(Ok(outcome)) => {
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                (status, Json(outcome)).into_response()
            }
            Ok(Err(e)) => error_response(&e),
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
}

/// `?vm=NAME&instance=ID`, both optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    instance: Option<String>,
}

struct StatsFilter(StatsQuery);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for StatsFilter {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<StatsQuery>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| StatsFilter(q))
            .map_err(|e| {
                invalid(format!(
                    "bad query (expected ?vm=NAME and/or ?instance=NAME|UUID): {}",
                    e.body_text()
                ))
            })
    }
}

/// Every started instance's statistics as Prometheus text: the same
/// `Stats` action as `/v1/stats`, encoded by `crate::stats::prometheus`.
async fn metrics(reg: Shared) -> Response {
    let all = Action::Stats {
        vm: None,
        instance: None,
    };
    match tokio::task::spawn_blocking(move || reg.handle(all)).await {
        Ok(Ok(super::action::Outcome::Stats(report))) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::stats::prometheus::CONTENT_TYPE,
            )],
            crate::stats::prometheus::encode(*report),
        )
            .into_response(),
        Ok(Err(e)) => error_response(&e),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot collect the metrics\n",
        )
            .into_response(),
    }
}

/// Only `/metrics`, for a TCP address (`--metrics-addr`): the API itself
/// (which changes instances) stays on the UNIX socket, behind its mode.
pub fn metrics_router(reg: Shared) -> Router {
    Router::new()
        .route("/metrics", get(|State(reg): State<Shared>| metrics(reg)))
        .fallback(|| async { unrouted(StatusCode::NOT_FOUND, "only /metrics is served here") })
        .with_state(reg)
}

/// Serves [`metrics_router`] on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    reg: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_router(reg))
        .with_graceful_shutdown(shutdown)
        .await
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
        UrlPath::<String>::from_request_parts(parts, state)
            .await
            .map(|UrlPath(id)| Id(id))
            .map_err(|e| {
                invalid(format!(
                    "bad instance name or UUID in the path: {}",
                    e.body_text()
                ))
            })
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
        Query::<ListQuery>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Defined(q.defined))
            .map_err(|e| {
                invalid(format!(
                    "bad query (expected ?defined=true or false): {}",
                    e.body_text()
                ))
            })
    }
}

/// A JSON body, or a typed 400 naming what is wrong with it.
struct Body<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Body(v))
            .map_err(|e: JsonRejection| invalid(format!("bad request body: {}", e.body_text())))
    }
}

/// A typed error with `status` for requests the router has no handler for.
fn unrouted(status: StatusCode, msg: &str) -> Response {
    let mut r = invalid(format!("{msg} (see docs/daemon.md)"));
    *r.status_mut() = status;
    r
}

pub fn router(reg: Shared) -> Router {
    Router::new()
        .route("/v1/types", get(|c: Call| c.act(Action::ListTypes)))
        .route(
            "/v1/accelerators",
            get(|c: Call| c.act(Action::ListAccelerators)),
        )
        .route(
            "/v1/instances",
            get(|c: Call, Defined(defined): Defined| c.act(Action::ListInstances { defined }))
                .post(|c: Call, Body(req): Body<DefineRequest>| c.act(Action::Define(req))),
        )
        .route(
            "/v1/instances/{id}",
            get(|c: Call, Id(id): Id| c.act(Action::GetInstance { id }))
                .patch(|c: Call, Id(id): Id, Body(changes): Body<ModifyRequest>| {
                    c.act(Action::Modify { id, changes })
                })
                .delete(|c: Call, Id(id): Id| c.act(Action::Undefine { id })),
        )
        .route(
            "/v1/instances/{id}/start",
            post(|c: Call, Id(id): Id| c.act(Action::Start { id })),
        )
        .route(
            "/v1/instances/{id}/stop",
            post(|c: Call, Id(id): Id| c.act(Action::Stop { id })),
        )
        .route(
            "/v1/stats",
            get(|c: Call, StatsFilter(q): StatsFilter| {
                c.act(Action::Stats {
                    vm: q.vm,
                    instance: q.instance,
                })
            }),
        )
        .route(
            "/v1/upgrade",
            post(|c: Call, Body(req): Body<UpgradeRequest>| c.act(Action::Upgrade(req))),
        )
        .route("/metrics", get(|State(reg): State<Shared>| metrics(reg)))
        .fallback(|| async { unrouted(StatusCode::NOT_FOUND, "no such API path") })
        .method_not_allowed_fallback(|| async {
            unrouted(
                StatusCode::METHOD_NOT_ALLOWED,
                "this path does not take that method",
            )
        })
        .with_state(reg)
}

/// Binds the API socket: a stale socket file is replaced, a live daemon's
/// is refused; mode 0660 and group `access.group` from the first instant
/// (`transport::server::bind_unix`), so only the group (and root) can
/// connect.
pub fn bind(path: &Path, access: &ApiAccess) -> std::io::Result<UnixListener> {
    // The same rules as an instance's socket (a live daemon refused, a
    // killed one's socket replaced, any other file left alone).
    crate::transport::server::free_socket_path(path).map_err(std::io::Error::other)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let own_gid = rustix::process::getegid().as_raw();
    let socket = crate::transport::server::SocketAccess {
        mode: 0o660,
        uid: None,
        gid: (access.group.gid != own_gid).then_some(access.group.gid),
    };
    let l = crate::transport::server::bind_unix(path, &socket)?;
    l.set_nonblocking(true)?;
    UnixListener::from_std(l)
}

/// Refuses, before any handler, a caller the API's rule does not let in:
/// 403 with `kind: forbidden` and the rule, counted.
async fn guard(
    State(access): State<Arc<ApiAccess>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let unknown = PeerCreds::UNKNOWN;
    let caller = req
        .extensions()
        .get::<ConnectInfo<Caller>>()
        .map_or(&unknown, |c| &c.0.0);
    match access.check(caller) {
        Ok(()) => next.run(req).await,
        Err(error) => (
            StatusCode::FORBIDDEN,
            Json(ErrorBody {
                error,
                kind: FORBIDDEN.into(),
            }),
        )
            .into_response(),
    }
}

/// [`router`] behind the API's rule, with `GET /v1/access` showing the
/// rule and its refusals.
pub fn guarded_router(
    reg: Shared,
    access: Arc<ApiAccess>,
    instance_owner: super::access::UserId,
) -> Router {
    let view = access.clone();
    router(reg)
        .route(
            "/v1/access",
            get(move || {
                let view = view.clone();
                let owner = instance_owner.clone();
                async move {
                    Json(AccessView {
                        api_group: view.group.clone(),
                        refused_callers: view.refused(),
                        instance_owner: owner,
                    })
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(access, guard))
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    reg: Shared,
    access: Arc<ApiAccess>,
    instance_owner: super::access::UserId,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        guarded_router(reg, access, instance_owner).into_make_service_with_connect_info::<Caller>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
