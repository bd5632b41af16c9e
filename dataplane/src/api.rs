//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (as Firecracker's and Cloud
//! Hypervisor's), versioned by path prefix. Every error is `{"error": "..."}` with a 4xx/5xx
//! status, and a request that fails changes nothing.
//!
//! | method | path | body | |
//! | --- | --- | --- | --- |
//! | GET | /v1/version | | `{"api": 1, "version": "0.1.0"}` |
//! | GET | /v1/ports | | every port with counters, VLANs, MACs learned |
//! | GET | /v1/ports/{name} | | one port |
//! | PUT | /v1/ports/{name} | port settings as in the config file (`type`, `socket`, …, `vlan`) | add a switch port |
//! | DELETE | /v1/ports/{name} | | remove a switch port |
//! | PUT | /v1/ports/{name}/switch | `vlan` / `trunk` + `native_vlan`, `mac_limit` | replace its switch settings |
//! | PUT | /v1/ports/{name}/link | `{"up": bool}` | vhost-user link status |
//! | PUT | /v1/ports/{name}/rate-limit | `pps` and/or `bps`, `burst_packets`, `burst_bytes` | limit what the port takes in (any port) |
//! | DELETE | /v1/ports/{name}/rate-limit | | lift its rate limit |
//! | POST | /v1/rebalance | | move switch port queues between PMDs to even their load |
//! | GET | /v1/mac-table | | learned MACs |
//! | GET | /v1/pmds | | PMD counters |
//! | GET | /v1/disks | | every disk (vhost-user-blk export) with its counters |
//! | GET | /v1/disks/{name} | | one disk |
//! | PUT | /v1/disks/{name} | disk settings as in the config file (`socket`, `file`, …) | start a disk |
//! | DELETE | /v1/disks/{name} | | stop a disk (its in-flight I/O completes first) |
//! | GET | /v1/stats | | all of it (the stats file's content) |
//! | GET | /metrics | | Prometheus text format |

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use torii_vhost_user::daemon::label_value as esc;
use torii_vhost_user_blk::settings::ExportSettings;

use crate::config::{PortConfig, RateLimitConfig, SwitchPortConfig};
use crate::daemon::{ControlError, Dataplane, Disk, Report};

/// The API version this daemon serves (the `/v1` prefix).
pub const API_VERSION: u32 = 1;

pub type Shared = Arc<Mutex<Dataplane>>;

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = match &self {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

type ApiResult = Result<Response, ControlError>;

/// Disk changes, one at a time: a disk is checked and started outside the data plane's lock,
/// and the check must still hold when it is inserted.
static DISK_CHANGES: Mutex<()> = Mutex::new(());

fn lock(dp: &Shared) -> std::sync::MutexGuard<'_, Dataplane> {
    // A panicked handler leaves the data plane as consistent as any request does (each
    // request checks before it changes anything): keep serving.
    dp.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| ControlError::BadRequest(format!("request body: {e}")))
}

/// The API's routes (also serves `/metrics`).
pub fn router(dp: Shared) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/ports", get(list_ports))
        .route(
            "/v1/ports/{name}",
            get(show_port).put(add_port).delete(remove_port),
        )
        .route("/v1/ports/{name}/switch", put(set_switch))
        .route("/v1/ports/{name}/link", put(set_link))
        .route(
            "/v1/ports/{name}/rate-limit",
            put(set_rate_limit).delete(clear_rate_limit),
        )
        .route("/v1/rebalance", axum::routing::post(rebalance))
        .route("/v1/mac-table", get(mac_table))
        .route("/v1/pmds", get(pmds))
        .route("/v1/disks", get(list_disks))
        .route(
            "/v1/disks/{name}",
            get(show_disk).put(add_disk).delete(remove_disk),
        )
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ControlError::NotFound("no such API path (this daemon serves /v1/…)".into())
        })
        .with_state(dp)
}

/// Only `/metrics`, for a TCP listener that Prometheus scrapes.
pub fn metrics_router(dp: Shared) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(dp)
}

async fn version() -> Json<Value> {
    Json(json!({ "api": API_VERSION, "version": env!("CARGO_PKG_VERSION") }))
}

async fn list_ports(State(dp): State<Shared>) -> Json<Value> {
    Json(json!(lock(&dp).report().ports))
}

async fn show_port(State(dp): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let r = lock(&dp).report();
    r.ports
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| Json(p).into_response())
        .ok_or_else(|| ControlError::NotFound(format!("no port named {name:?}")))
}

/// A PUT body of settings: a JSON object whose `name`, if given, is the one in the path
/// (added when missing).
fn named_settings(body: &Bytes, what: &str, name: &str) -> Result<Value, ControlError> {
    let mut v: Value = parse(body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ControlError::BadRequest(format!(
            "request body: expected a JSON object of {what} settings"
        )));
    };
    match obj.get("name") {
        Some(n) if n != &Value::String(name.to_string()) => {
            return Err(ControlError::BadRequest(format!(
                "request body names {what} {n} but the path names {name:?}"
            )))
        }
        _ => {
            obj.insert("name".into(), Value::String(name.to_string()));
        }
    }
    Ok(v)
}

async fn add_port(State(dp): State<Shared>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let v = named_settings(&body, "port", &name)?;
    let cfg = PortConfig::deserialize(v)
        .map_err(|e| ControlError::BadRequest(format!("port {name:?}: {e}")))?;
    // Creating a port binds a socket or opens a tap: quick, but not for the async thread.
    tokio::task::spawn_blocking(move || {
        let mut d = lock(&dp);
        d.add_port(cfg)?;
        let r = d.report();
        let p = r.ports.into_iter().find(|p| p.name == name);
        Ok((StatusCode::CREATED, Json(p)).into_response())
    })
    .await
    .map_err(|e| ControlError::Failed(e.to_string()))?
}

async fn remove_port(State(dp): State<Shared>, Path(name): Path<String>) -> ApiResult {
    tokio::task::spawn_blocking(move || {
        lock(&dp).remove_port(&name)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
    .map_err(|e| ControlError::Failed(e.to_string()))?
}

async fn set_switch(State(dp): State<Shared>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let s: SwitchPortConfig = parse(&body)?;
    lock(&dp).set_switch_settings(&name, s)?;
    show_port(State(dp), Path(name)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Link {
    up: bool,
}

async fn set_link(State(dp): State<Shared>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let l: Link = parse(&body)?;
    lock(&dp).set_link(&name, l.up)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_rate_limit(
    State(dp): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let r: RateLimitConfig = parse(&body)?;
    rate_limit(dp, name, Some(r)).await
}

async fn clear_rate_limit(State(dp): State<Shared>, Path(name): Path<String>) -> ApiResult {
    rate_limit(dp, name, None).await
}

async fn rate_limit(dp: Shared, name: String, r: Option<RateLimitConfig>) -> ApiResult {
    // The first limit measures the PMDs' clock rate (20 ms): not on the async thread.
    let d = dp.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || {
        // Measured before the lock is taken, so that the API is not held for it.
        if r.is_some() {
            crate::ratelimit::clock_hz();
        }
        lock(&d).set_rate_limit(&n, r)
    })
    .await
    .map_err(|e| ControlError::Failed(e.to_string()))??;
    show_port(State(dp), Path(name)).await
}

async fn rebalance(State(dp): State<Shared>) -> ApiResult {
    tokio::task::spawn_blocking(move || {
        let moves = lock(&dp).rebalance()?;
        Ok(Json(json!({ "moved": moves })).into_response())
    })
    .await
    .map_err(|e| ControlError::Failed(e.to_string()))?
}

async fn mac_table(State(dp): State<Shared>) -> Json<Value> {
    Json(json!(lock(&dp).mac_table()))
}

async fn pmds(State(dp): State<Shared>) -> Json<Value> {
    Json(json!(lock(&dp).report().pmds))
}

async fn list_disks(State(dp): State<Shared>) -> Json<Value> {
    Json(json!(lock(&dp).report().disks))
}

async fn show_disk(State(dp): State<Shared>, Path(name): Path<String>) -> ApiResult {
    lock(&dp)
        .report()
        .disks
        .into_iter()
        .find(|k| k.name == name)
        .map(|k| Json(k).into_response())
        .ok_or_else(|| ControlError::NotFound(format!("no disk named {name:?}")))
}

async fn add_disk(State(dp): State<Shared>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let v = named_settings(&body, "disk", &name)?;
    let d = ExportSettings::deserialize(v)
        .map_err(|e| ControlError::BadRequest(format!("disk {name:?}: {e}")))?;
    // Opening the file and the io_urings, binding the socket: not for the async thread, and
    // not under the data plane's lock (the API and the stats go on meanwhile).
    tokio::task::spawn_blocking(move || {
        let _serial = DISK_CHANGES.lock().unwrap_or_else(|e| e.into_inner());
        lock(&dp).check_disk(&d)?;
        let disk = Disk::start(&d).map_err(ControlError::Failed)?;
        let mut dp = lock(&dp);
        dp.insert_disk(disk);
        let k = dp.report().disks.into_iter().find(|k| k.name == name);
        Ok((StatusCode::CREATED, Json(k)).into_response())
    })
    .await
    .map_err(|e| ControlError::Failed(e.to_string()))?
}

async fn remove_disk(State(dp): State<Shared>, Path(name): Path<String>) -> ApiResult {
    tokio::task::spawn_blocking(move || {
        let _serial = DISK_CHANGES.lock().unwrap_or_else(|e| e.into_inner());
        let disk = lock(&dp).take_disk(&name)?;
        // Waits for its in-flight I/O: outside the data plane's lock.
        disk.stop();
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
    .map_err(|e| ControlError::Failed(e.to_string()))?
}

async fn stats(State(dp): State<Shared>) -> Json<Report> {
    Json(lock(&dp).report())
}

async fn metrics(State(dp): State<Shared>) -> Response {
    let (report, disks) = {
        let dp = lock(&dp);
        (dp.report(), dp.disk_exports())
    };
    let mut text = prometheus(&report);
    text.push_str(&torii_vhost_user_blk::stats::prometheus(&disks));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The report in the Prometheus text format: every numeric counter of a port as
/// `torii_port_<name>_total{port=…,kind=…}`, per-queue counters with a `queue` label, PMD
/// and switch counters.
pub fn prometheus(r: &Report) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    // metric name → (type, samples)
    let mut m: BTreeMap<String, (&str, Vec<String>)> = BTreeMap::new();
    let mut add = |name: String, ty: &'static str, labels: String, v: &Value| {
        if let Some(n) = v.as_f64() {
            m.entry(name)
                .or_insert((ty, Vec::new()))
                .1
                .push(if labels.is_empty() {
                    format!(" {n}")
                } else {
                    format!("{{{labels}}} {n}")
                });
        }
    };
    for p in &r.ports {
        let labels = format!("port=\"{}\",kind=\"{}\"", esc(&p.name), p.kind);
        let stats = serde_json::to_value(&p.stats).unwrap_or_default();
        for (k, v) in stats.as_object().into_iter().flatten() {
            match v {
                Value::Array(qs) => {
                    for (q, v) in qs.iter().enumerate() {
                        add(
                            format!("torii_port_{k}_total"),
                            "counter",
                            format!("{labels},queue=\"{q}\""),
                            v,
                        );
                    }
                }
                v => add(
                    format!("torii_port_{k}_total"),
                    "counter",
                    labels.clone(),
                    v,
                ),
            }
        }
        if let Some(c) = p.connected {
            add(
                "torii_port_connected".into(),
                "gauge",
                labels.clone(),
                &json!(u8::from(c)),
            );
        }
        if let Some(n) = p.macs {
            add("torii_port_macs".into(), "gauge", labels.clone(), &json!(n));
        }
        // The port's rate limit on what it takes in, as set (bursts resolved).
        if let Some(r) = &p.rate_limit {
            for (k, v) in [
                ("pps", r.pps),
                ("bps", r.bps),
                ("burst_packets", r.burst_packets),
                ("burst_bytes", r.burst_bytes),
            ] {
                if let Some(v) = v {
                    add(
                        format!("torii_port_rate_limit_{k}"),
                        "gauge",
                        labels.clone(),
                        &json!(v),
                    );
                }
            }
        }
        // DPDK's own counters of a dpdk port (what its device saw and dropped).
        if let Some(d) = &p.dpdk {
            add(
                "torii_port_link_up".into(),
                "gauge",
                labels.clone(),
                &json!(u8::from(d["link_up"] == true)),
            );
            for k in [
                "rx_missed",
                "rx_errors",
                "rx_no_mbuf",
                "tx_errors",
                "bursts_abandoned",
            ] {
                add(
                    format!("torii_port_dpdk_{k}_total"),
                    "counter",
                    labels.clone(),
                    &d[k],
                );
            }
        }
        add(
            "torii_port_broken_queues".into(),
            "gauge",
            labels.clone(),
            &json!(p.broken_queues.len()),
        );
    }
    for p in &r.pmds {
        let labels = format!(
            "pmd=\"{}\",cpu=\"{}\"",
            p.id,
            p.cpu.map_or("-".into(), |c| c.to_string())
        );
        for (k, v) in [
            ("busy_cycles", p.busy_cycles),
            ("idle_cycles", p.idle_cycles),
            ("packets", p.packets),
            ("sleeps", p.sleeps),
        ] {
            add(
                format!("torii_pmd_{k}_total"),
                "counter",
                labels.clone(),
                &json!(v),
            );
        }
    }
    let s = &r.switch;
    add(
        "torii_switch_mac_entries".into(),
        "gauge",
        String::new(),
        &json!(s.mac_entries),
    );
    add(
        "torii_switch_mac_capacity".into(),
        "gauge",
        String::new(),
        &json!(s.mac_capacity),
    );
    for (k, v) in [
        ("flooded", s.stats.flooded),
        ("learned", s.stats.learned),
        ("moved", s.stats.moved),
        ("table_full", s.stats.table_full),
    ] {
        add(
            format!("torii_switch_{k}_total"),
            "counter",
            String::new(),
            &json!(v),
        );
    }
    let mut out = String::new();
    for (name, (ty, samples)) in m {
        let _ = writeln!(out, "# TYPE {name} {ty}");
        for smp in samples {
            let _ = writeln!(out, "{name}{smp}");
        }
    }
    out
}
