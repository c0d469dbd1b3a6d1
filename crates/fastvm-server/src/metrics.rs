//! Prometheus metrics, served in the text format at `GET /metrics` on their own
//! listener (`fastvm serve --metrics-listen`, default 127.0.0.1:9464; never on
//! the API's address, so scraping needs no API key and exposes nothing to
//! tenants).
//!
//! | metric                                   | kind      | labels                    |
//! |------------------------------------------|-----------|---------------------------|
//! | `fastvm_http_requests_total`             | counter   | method, route, status     |
//! | `fastvm_http_request_duration_seconds`   | histogram | method, route             |
//! | `fastvm_vms`                             | gauge     | status (read at scrape)   |
//! | `fastvm_vm_launch_duration_seconds`      | histogram | source (machine, snapshot), outcome |
//! | `fastvm_snapshot_duration_seconds`       | histogram | outcome                   |
//! | `fastvm_proxy_connections_total`         | counter   |                           |
//! | `fastvm_proxy_open_connections`          | gauge     |                           |
//! | `fastvm_proxy_wakeups_total`             | counter   |                           |
//! | `fastvm_agent_reconnects`                | gauge     | worker (monotonic count)  |
//! | `fastvm_workers`                         | gauge     | status                    |
//! | `fastvm_worker_last_heartbeat_seconds`   | gauge     | worker (Unix time)        |
//!
//! `route` is the route template (`/v1/vms/{id}`), never the concrete path:
//! ids and signed-URL tokens stay out of the metrics.

use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fastvm_types::VmStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaunchLabels {
    source: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn operation_histogram() -> Histogram {
    // 10 ms .. ~160 s
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// Every metric of the server, registered once.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    vms: Family<StatusLabel, Gauge>,
    launches: HistogramFamily<LaunchLabels>,
    snapshots: HistogramFamily<OutcomeLabel>,
    proxy_connections: Counter,
    proxy_open: Gauge,
    proxy_wakeups: Counter,
    agent_reconnects: Family<WorkerLabel, Gauge>,
    workers: Family<StatusLabel, Gauge>,
    heartbeats: Family<WorkerLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fastvm");
        let m = Metrics {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(request_histogram),
            vms: Family::default(),
            launches: Family::new_with_constructor(operation_histogram),
            snapshots: Family::new_with_constructor(operation_histogram),
            proxy_connections: Counter::default(),
            proxy_open: Gauge::default(),
            proxy_wakeups: Counter::default(),
            agent_reconnects: Family::default(),
            workers: Family::default(),
            heartbeats: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "API requests answered",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "API request latency (head to response head)",
            m.http_duration.clone(),
        );
        registry.register(
            "vms",
            "Live VMs by status (read from the store at scrape time)",
            m.vms.clone(),
        );
        registry.register(
            "vm_launch_duration_seconds",
            "Launches from POST to running (or error)",
            m.launches.clone(),
        );
        registry.register(
            "snapshot_duration_seconds",
            "Snapshot captures",
            m.snapshots.clone(),
        );
        registry.register(
            "proxy_connections",
            "Client connections accepted by the services proxy",
            m.proxy_connections.clone(),
        );
        registry.register(
            "proxy_open_connections",
            "Client connections of the services proxy now open",
            m.proxy_open.clone(),
        );
        registry.register(
            "proxy_wakeups",
            "Paused VMs resumed by proxy traffic",
            m.proxy_wakeups.clone(),
        );
        registry.register(
            "agent_reconnects",
            "Guest agent reconnects since the worker started (monotonic)",
            m.agent_reconnects.clone(),
        );
        registry.register("workers", "Workers by status", m.workers.clone());
        registry.register(
            "worker_last_heartbeat_seconds",
            "Unix time of each worker's last heartbeat",
            m.heartbeats.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub(crate) fn launch_finished(&self, from_snapshot: bool, ok: bool, seconds: f64) {
        let labels = LaunchLabels {
            source: if from_snapshot { "snapshot" } else { "machine" }.into(),
            outcome: if ok { "ok" } else { "error" }.into(),
        };
        self.launches.get_or_create(&labels).observe(seconds);
    }

    pub(crate) fn snapshot_finished(&self, ok: bool, seconds: f64) {
        let labels = OutcomeLabel {
            outcome: if ok { "ok" } else { "error" }.into(),
        };
        self.snapshots.get_or_create(&labels).observe(seconds);
    }

    /// A proxy client connection opened; dropping the guard closes it.
    pub(crate) fn proxy_connection(&self) -> OpenConnection<'_> {
        self.proxy_connections.inc();
        self.proxy_open.inc();
        OpenConnection(&self.proxy_open)
    }

    pub(crate) fn proxy_wakeup(&self) {
        self.proxy_wakeups.inc();
    }
}

/// Counts one open proxy connection while alive.
pub(crate) struct OpenConnection<'a>(&'a Gauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Axum middleware: count and time every API request by route template.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    let m = state.metrics();
    m.http_duration
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// The text exposition, with the gauges that are read at scrape time
/// (VMs by status, worker state) brought up to date first.
pub async fn render(state: &AppState) -> Result<String, String> {
    let m = state.metrics();
    let counts = state
        .store()
        .count_vms_by_status()
        .await
        .map_err(|e| e.to_string())?;
    m.vms.clear();
    for status in VmStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        m.vms
            .get_or_create(&StatusLabel {
                status: status.as_str().into(),
            })
            .set(n);
    }
    m.workers.clear();
    if state.fleet().is_cluster() {
        // Cluster: workers by their row's status; heartbeats as recorded.
        let rows = state
            .store()
            .list_workers()
            .await
            .map_err(|e| e.to_string())?;
        for st in ["ready", "unreachable", "draining"] {
            let n = rows.iter().filter(|r| r.status.as_str() == st).count();
            m.workers
                .get_or_create(&StatusLabel { status: st.into() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for r in &rows {
            m.heartbeats
                .get_or_create(&WorkerLabel {
                    worker: r.id.clone(),
                })
                .set(r.last_heartbeat_ms / 1000);
        }
    }
    if let Some(worker) = state
        .fleet()
        .local()
        .filter(|_| !state.fleet().is_cluster())
    {
        let (status, stats) = match worker.stats().await {
            Ok(stats) => ("ready", stats),
            Err(_) => ("unreachable", Default::default()),
        };
        m.workers
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .set(1);
        let label = WorkerLabel {
            worker: worker.id().to_owned(),
        };
        m.agent_reconnects
            .get_or_create(&label)
            .set(i64::try_from(stats.agent_reconnects).unwrap_or(i64::MAX));
        if status == "ready" {
            // The embedded worker is this process: its heartbeat is now.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            m.heartbeats
                .get_or_create(&label)
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The metrics listener's one route.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state)
}

async fn scrape(State(state): State<AppState>) -> Response {
    match render(&state).await {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("metrics unavailable: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::default();
        m.launch_finished(false, true, 0.12);
        m.snapshot_finished(true, 0.5);
        let conn = m.proxy_connection();
        m.http_requests
            .get_or_create(&HttpLabels {
                method: "GET".into(),
                route: "/v1/vms/{id}".into(),
                status: 200,
            })
            .inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        assert!(out.contains("fastvm_http_requests_total{method=\"GET\",route=\"/v1/vms/{id}\",status=\"200\"} 1"), "{out}");
        assert!(
            out.contains(
                "fastvm_vm_launch_duration_seconds_count{source=\"machine\",outcome=\"ok\"} 1"
            ),
            "{out}"
        );
        assert!(out.contains("fastvm_proxy_open_connections 1"), "{out}");
        drop(conn);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        assert!(out.contains("fastvm_proxy_open_connections 0"), "{out}");
        assert!(out.contains("fastvm_proxy_connections_total 1"), "{out}");
    }
}
