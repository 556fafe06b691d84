//! `GET /api/v1/events` (WebSocket): live component states for the UI's
//! status page.
//!
//! The gateway owns the truth (`/gateway/status`); this stream relays it as
//! JSON text messages of the same shape, `{"components": [...]}`: one at
//! once on connect, then one whenever a state, pid, restart count or last
//! exit changes, and at least every few seconds so uptimes stay fresh. When
//! the worker itself restarts the socket closes with it and the page
//! reconnects to the new worker, which is also how it learns the restart.
//!
//! Public like `/gateway/status`: browsers cannot send `x-api-key` on a
//! WebSocket handshake, and the stream carries nothing the status endpoint
//! does not already show.

use std::time::{Duration, Instant};

use axum::{
    extract::{ws::Message, ws::WebSocket, State, WebSocketUpgrade},
    response::{IntoResponse, Response},
};

use crate::{errors::ApiError, routes::AppState};

/// How often the gateway's status is read.
const POLL: Duration = Duration::from_millis(250);
/// Longest gap between two messages.
const REFRESH: Duration = Duration::from_secs(5);

/// Component state changes, as WebSocket messages.
#[utoipa::path(get, path = "/api/v1/events", tag = "status", responses(
    (status = 101, description = "WebSocket stream of `/gateway/status` documents"),
    (status = 400, description = "Not a WebSocket handshake"),
    (status = 404, description = "The worker runs without a gateway (OMNI_GATEWAY_URL unset), so there is no stream"),
))]
pub async fn events(State(state): State<AppState>, ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>) -> Response {
    let Some(gateway) = state.settings.gateway_url.clone() else {
        // Not a server fault: this deployment simply has no such stream.
        return ApiError::not_found("no_gateway", "this worker runs without a gateway, so there are no component states to stream").into_response();
    };
    match ws {
        Ok(ws) => ws.on_upgrade(move |socket| relay(socket, gateway)).into_response(),
        Err(_) => ApiError::bad_request("not_websocket", "this endpoint speaks WebSocket: connect with a WebSocket client").into_response(),
    }
}

async fn relay(mut socket: WebSocket, gateway: String) {
    let mut last_key = String::new();
    let mut last_sent = Instant::now() - REFRESH;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(doc) = gateway_status(&gateway).await else { continue };
                let key = change_key(&doc);
                if key != last_key || last_sent.elapsed() >= REFRESH {
                    if socket.send(Message::Text(doc.to_string().into())).await.is_err() {
                        return;
                    }
                    last_key = key;
                    last_sent = Instant::now();
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The fields whose change is news (uptime and the retry countdown change
/// every poll and are not).
fn change_key(doc: &serde_json::Value) -> String {
    let mut key = format!("{};", doc["gateway"]["state"]);
    for c in doc["components"].as_array().into_iter().flatten() {
        key.push_str(&format!(
            "{}|{}|{}|{}|{}|{}|{}|{};",
            c["name"], c["state"], c["pid"], c["restarts"], c["last_exit"], c["attempts"], c["crash_looping"], c["reloading"]
        ));
    }
    key
}

/// `GET <gateway>/gateway/status` with the shared loopback probe.
async fn gateway_status(base: &str) -> anyhow::Result<serde_json::Value> {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse()?;
    let answer = omni_contract::probe::get(addr, "/gateway/status", Duration::from_secs(2)).await?;
    anyhow::ensure!(answer.status == 200, "the gateway answered {}", answer.status);
    Ok(serde_json::from_slice(&answer.body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_alone_is_not_a_change() {
        let a = serde_json::json!({"components": [{"name": "api", "state": "ready", "pid": 7, "restarts": 0, "last_exit": null, "uptime_s": 1.0}]});
        let mut b = a.clone();
        b["components"][0]["uptime_s"] = 9.0.into();
        assert_eq!(change_key(&a), change_key(&b));
        b["components"][0]["restarts"] = 1.into();
        assert_ne!(change_key(&a), change_key(&b));
    }
}
