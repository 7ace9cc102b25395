//! Components exporting `wasi:http/incoming-handler` (and not `wasi:cli/run`) are served over
//! HTTP/1.1 by the container's init process, so in the container's own network namespace, on
//! `0.0.0.0:PORT`, PORT from the container's environment variable [`PORT_ENV`] (default
//! [`DEFAULT_PORT`]). Every request gets a fresh instance of the component in a store of its
//! own (with the container's args, environment, stdio, root filesystem and memory limit), as
//! `wasmtime serve` does. Outgoing requests (`wasi:http/outgoing-handler`) are refused: the
//! shim carries no HTTP client or TLS stack.

use std::net::Ipv4Addr;
use std::sync::Arc;

use hyper::server::conn::http1;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::runtime::MemoryLimit;

/// The container environment variable naming the port to serve on.
pub const PORT_ENV: &str = "HYPERBOX_HTTP_PORT";
/// The port served on when [`PORT_ENV`] is not set.
pub const DEFAULT_PORT: u16 = 8080;

const INCOMING_HANDLER: &str = "wasi:http/incoming-handler@0.2";
const CLI_RUN: &str = "wasi:cli/run@0.2";

/// True when `component` is an HTTP handler to serve rather than a command to run: it exports
/// `wasi:http/incoming-handler` (0.2.x) and not `wasi:cli/run`.
pub fn is_http_handler(engine: &Engine, component: &Component) -> bool {
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    exports.iter().any(|n| n.starts_with(INCOMING_HANDLER))
        && !exports.iter().any(|n| n.starts_with(CLI_RUN))
}

/// The port to serve on: [`PORT_ENV`] from `env`, else [`DEFAULT_PORT`].
pub fn port(env: Option<&str>) -> Result<u16, String> {
    match env {
        None => Ok(DEFAULT_PORT),
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                format!("{PORT_ENV}={v} is not a port: expected a number from 1 to 65535")
            }),
    }
}

/// Store state of one request.
struct RequestHost {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: NoOutgoingRequests,
    memory: MemoryLimit,
}

impl WasiView for RequestHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// `wasi:http/outgoing-handler` answers every request with `HTTP-request-denied`.
struct NoOutgoingRequests;

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for NoOutgoingRequests {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn std::future::Future<Output = SendResult> + Send> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

struct Server {
    name: String,
    pre: ProxyPre<RequestHost>,
    args: Vec<String>,
    limit: Option<usize>,
}

impl Server {
    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> wasmtime::Result<hyper::Response<HyperOutgoingBody>> {
        let host = RequestHost {
            wasi: crate::runtime::wasi(&self.args)?.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: NoOutgoingRequests,
            memory: MemoryLimit::new(self.limit),
        };
        let mut store = Store::new(self.pre.engine(), host);
        store.limiter(|h| &mut h.memory);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let pre = self.pre.clone();
        // The guest may go on writing the body after it has set the response.
        let task = tokio::task::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(store, req, out)
                .await
        });
        let failed = match receiver.await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(code)) => wasmtime::Error::from(code),
            Err(_) => match task.await {
                Ok(Ok(())) => wasmtime::Error::msg("the guest set no response"),
                Ok(Err(e)) => e,
                Err(e) => e.into(),
            },
        };
        eprintln!("hyperbox-wasm: {}: request failed: {failed:?}", self.name);
        Err(failed)
    }
}

/// Serves `component` until the process is signalled; returns only on a failure to start.
pub fn serve(
    name: &str,
    engine: &Engine,
    component: &Component,
    args: &[String],
    limit: Option<usize>,
) -> wasmtime::Result<i32> {
    let port = port(std::env::var(PORT_ENV).ok().as_deref()).map_err(wasmtime::Error::msg)?;
    let mut linker = Linker::<RequestHost>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    let pre = ProxyPre::new(linker.instantiate_pre(component)?)?;
    let server = Arc::new(Server {
        name: name.to_string(),
        pre,
        args: args.to_vec(),
        limit,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            wasmtime::Error::msg(format!("cannot start the HTTP server's runtime: {e}"))
        })?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .map_err(|e| {
                wasmtime::Error::msg(format!(
                    "cannot listen on 0.0.0.0:{port}: {e} (set {PORT_ENV} to another port)"
                ))
            })?;
        eprintln!(
            "hyperbox-wasm: {name}: serving wasi:http/incoming-handler on http://0.0.0.0:{port}"
        );
        loop {
            let (client, _) = listener.accept().await?;
            let server = server.clone();
            tokio::task::spawn(async move {
                let service = hyper::service::service_fn(move |req| server.clone().handle(req));
                // A failed request was reported by `handle`; the connection just ends.
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(client), service)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_comes_from_the_environment() {
        assert_eq!(port(None), Ok(DEFAULT_PORT));
        assert_eq!(port(Some("9090")), Ok(9090));
        for bad in ["0", "http", "70000", ""] {
            let err = port(Some(bad)).unwrap_err();
            assert!(
                err.starts_with(&format!("{PORT_ENV}={bad} is not a port")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_component_is_served_when_it_exports_only_the_handler() {
        let engine = crate::runtime::engine().unwrap();
        let with = |exports: &[&str]| {
            let body: String = exports
                .iter()
                .enumerate()
                .map(|(i, e)| format!("(instance $i{i}) (export \"{e}\" (instance $i{i}))"))
                .collect();
            let wasm = wat::parse_str(format!("(component {body})")).unwrap();
            is_http_handler(&engine, &Component::new(&engine, wasm).unwrap())
        };
        assert!(with(&["wasi:http/incoming-handler@0.2.3"]));
        assert!(!with(&["wasi:cli/run@0.2.0"]));
        assert!(!with(&[
            "wasi:http/incoming-handler@0.2.3",
            "wasi:cli/run@0.2.0"
        ]));
        assert!(!with(&[]));
    }
}
