//! HTTP: the AWS JSON 1.1 control plane on `POST /` (SigV4-verified) and the data channel
//! websocket on `/v1/data-channel/<id>`.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::instrument::WithSubscriber;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use rand::RngCore;
use serde_json::{Value, json};
use ssm_proto::payload::OpenDataChannel;
use tokio::sync::mpsc;

use super::agent::{Attachment, Control, SessionTask, WsIn, WsOut};
use super::service::SessionRecord;
use super::state::{SessionSlot, State};
use crate::sigv4::SignedRequest;

pub(crate) fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", post(json_api))
        .route("/v1/data-channel/{id}", get(data_channel))
        .route("/_fake/stats", get(stats))
        .with_state(state)
}

fn error(kind: &str, message: &str) -> Response {
    let body = json!({ "__type": kind, "message": message }).to_string();
    (
        StatusCode::BAD_REQUEST,
        [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amzn-ErrorType", kind),
        ],
        body,
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/x-amz-json-1.1")],
        body.to_string(),
    )
        .into_response()
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0; bytes];
    rand::rng().fill_bytes(&mut buffer);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

async fn json_api(
    AxumState(state): AxumState<Arc<State>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let request = SignedRequest {
        method: "POST",
        path: "/",
        query: query.as_deref().unwrap_or(""),
        headers: headers.clone(),
        body: &body,
    };
    if let Err(reason) = request.verify(&state.credentials, "ssm") {
        tracing::warn!(%reason, "fake SSM: refused a request");
        let kind = if reason.starts_with("unknown access key") {
            "UnrecognizedClientException"
        } else {
            "InvalidSignatureException"
        };
        return error(
            kind,
            &format!("The request signature we calculated does not match: {reason}"),
        );
    }
    let target = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-target"))
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let input: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match target {
        "AmazonSSM.StartSession" => start_session(&state, &input),
        "AmazonSSM.ResumeSession" => resume_session(&state, &input),
        "AmazonSSM.TerminateSession" => terminate_session(&state, &input),
        "AmazonSSM.DescribeInstanceInformation" => describe_instances(&state),
        other => error(
            "InvalidAction",
            &format!("fake-aws does not implement {other}"),
        ),
    }
}

fn stream_url(state: &State, id: &str, cell: u32) -> String {
    let advertised = state
        .config
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .advertise
        .unwrap_or(state.addr);
    format!("ws://{advertised}/v1/data-channel/{id}?role=publish_subscribe&cell-number={cell}")
}

fn start_session(state: &Arc<State>, input: &Value) -> Response {
    *state
        .start_sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner()) += 1;
    let config = state
        .config
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let target = input["Target"].as_str().unwrap_or_default().to_owned();
    if let Some(kind) = &config.refuse_start {
        return error(
            kind,
            &format!("StartSession refused for {target} (fault injected)"),
        );
    }
    if !config.online_targets.contains(&target) {
        return error("TargetNotConnected", &format!("{target} is not connected."));
    }
    let document = input["DocumentName"].as_str().unwrap_or_default();
    let first = |name: &str| input["Parameters"][name][0].as_str().map(str::to_owned);
    let host = match document {
        "AWS-StartPortForwardingSessionToRemoteHost" => match first("host") {
            Some(host) => host,
            None => return error("InvalidParameters", "host is required"),
        },
        "AWS-StartPortForwardingSession" => "localhost".to_owned(),
        other => {
            return error(
                "InvalidDocument",
                &format!("Document {other} is not supported by fake-aws"),
            );
        }
    };
    let Some(port) = first("portNumber").and_then(|p| p.parse::<u16>().ok()) else {
        return error("InvalidParameters", "portNumber must be a port number");
    };
    // The document's parameters, as the agent hands them to the client in the handshake
    // (§5): every one given, each as its first value, a string.
    let mut properties = serde_json::Map::new();
    if let Some(parameters) = input["Parameters"].as_object() {
        for (name, values) in parameters {
            if let Some(value) = values[0].as_str() {
                properties.insert(name.clone(), Value::String(value.to_owned()));
            }
        }
    }
    if document == "AWS-StartPortForwardingSession" {
        properties.insert("host".into(), Value::String(host.clone()));
    }
    properties.insert("type".into(), Value::String("LocalPortForwarding".into()));
    let id = format!("pgharness-{}", random_hex(9));
    let token = random_hex(32);
    let (attach_tx, attach_rx) = mpsc::unbounded_channel();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let record = SessionRecord {
        id: id.clone(),
        target: target.clone(),
        host: host.clone(),
        port,
        ended: false,
        end_reason: None,
        connections: 0,
    };
    state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id.clone(),
            SessionSlot {
                record,
                token: token.clone(),
                earlier_tokens: Vec::new(),
                attach: attach_tx,
                control: control_tx,
                cell: 1,
            },
        );
    let task = SessionTask {
        state: state.clone(),
        id: id.clone(),
        target,
        host,
        port,
        properties,
        config,
        attach: attach_rx,
        control: control_rx,
    };
    tokio::spawn(task.run());
    ok(json!({ "SessionId": id, "TokenValue": token, "StreamUrl": stream_url(state, &id, 1) }))
}

fn resume_session(state: &Arc<State>, input: &Value) -> Response {
    let id = input["SessionId"].as_str().unwrap_or_default();
    let new_url = state
        .config
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .new_stream_url_on_resume;
    let mut sessions = state.sessions.lock().unwrap_or_else(|p| p.into_inner());
    let Some(slot) = sessions.get_mut(id) else {
        return error(
            "DoesNotExistException",
            &format!("Session {id} does not exist"),
        );
    };
    if slot.record.ended {
        // An empty token: the session is over.
        return ok(json!({ "SessionId": id, "TokenValue": "", "StreamUrl": "" }));
    }
    let fresh = random_hex(32);
    let earlier = std::mem::replace(&mut slot.token, fresh);
    slot.earlier_tokens.push(earlier);
    if new_url {
        slot.cell += 1;
    }
    ok(
        json!({ "SessionId": id, "TokenValue": slot.token, "StreamUrl": stream_url(state, id, slot.cell) }),
    )
}

fn terminate_session(state: &Arc<State>, input: &Value) -> Response {
    let id = input["SessionId"].as_str().unwrap_or_default().to_owned();
    let mut sessions = state.sessions.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(slot) = sessions.get_mut(&id) {
        slot.record.ended = true;
        slot.record
            .end_reason
            .get_or_insert_with(|| "terminated".into());
        let _ = slot.control.send(Control::Terminate);
    }
    ok(json!({ "SessionId": id }))
}

fn describe_instances(state: &Arc<State>) -> Response {
    let config = state
        .config
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let list: Vec<Value> = config
        .online_targets
        .iter()
        .map(|id| json!({ "InstanceId": id, "PingStatus": "Online", "AgentVersion": config.agent_version, "PlatformType": "Linux", "PlatformName": "fake-aws" }))
        .collect();
    ok(json!({ "InstanceInformationList": list }))
}

/// Counters for tests and the runner (not an AWS API).
async fn stats(AxumState(state): AxumState<Arc<State>>) -> Response {
    let start_sessions = *state
        .start_sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let sessions = state.sessions.lock().unwrap_or_else(|p| p.into_inner());
    let open = sessions.values().filter(|s| !s.record.ended).count();
    let list: Vec<Value> = sessions
        .values()
        .map(|s| json!({ "SessionId": s.record.id, "Ended": s.record.ended, "EndReason": s.record.end_reason, "Connections": s.record.connections }))
        .collect();
    ok(json!({ "StartSessionCalls": start_sessions, "OpenSessions": open, "Sessions": list }))
}

async fn data_channel(
    AxumState(state): AxumState<Arc<State>>,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .on_upgrade(move |socket| websocket(state, id, socket))
        .into_response()
}

async fn websocket(state: Arc<State>, id: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    // The first data frame is a text frame: the open-data-channel request with the token.
    // Pings (the official client sends one on open) may come before it.
    let first_text = async {
        // tungstenite logs every message it reads at TRACE, and this one carries the token.
        while let Some(message) = stream
            .next()
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await
        {
            match message {
                Ok(WsMessage::Text(text)) => {
                    let parsed = serde_json::from_str::<OpenDataChannel>(text.as_str());
                    if let Err(error) = &parsed {
                        tracing::warn!(%error, "fake SSM: the open-data-channel frame does not parse");
                    }
                    return parsed.ok();
                }
                Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => continue,
                Ok(other) => {
                    tracing::warn!(
                        ?other,
                        "fake SSM: expected the open-data-channel text frame"
                    );
                    return None;
                }
                Err(error) => {
                    tracing::warn!(%error, "fake SSM: the websocket failed before its open frame");
                    return None;
                }
            }
        }
        None
    };
    let open = tokio::time::timeout(Duration::from_secs(30), first_text)
        .await
        .ok()
        .flatten();
    let accepted = {
        let sessions = state.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match (&open, sessions.get(&id)) {
            (Some(open), Some(slot))
                if !slot.record.ended
                    && crate::sigv4::constant_time_eq(&open.token_value, &slot.token) =>
            {
                let faults = state
                    .config
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .faults
                    .clone();
                Some((slot.attach.clone(), faults, slot.record.connections == 0))
            }
            _ => None,
        }
    };
    let Some((attach, faults, first_connection)) = accepted else {
        let known = state
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id);
        tracing::warn!(session = %id, known, opened = open.is_some(), "fake SSM: refused a data channel (unknown session, or a bad or stale token)");
        let _ = sink
            .send(WsMessage::Close(Some(CloseFrame {
                code: 1008,
                reason: "invalid token".into(),
            })))
            .await;
        return;
    };
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    if attach
        .send(Attachment {
            incoming: in_rx,
            outgoing: out_tx,
        })
        .is_err()
    {
        return;
    }
    // Writes go through a task of their own, so that this loop keeps reading while the
    // network does not take what it writes (a real service's websocket does not stop
    // reading because one write is slow; two ends that do deadlock once both buffers fill).
    let (to_sink, mut frames) = mpsc::unbounded_channel::<WsMessage>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = frames.recv().await {
            let closing = matches!(frame, WsMessage::Close(_));
            if sink.send(frame).await.is_err() || closing {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut bytes_in: u64 = 0;
    let bye_due = || {
        faults
            .bye_after
            .is_some_and(|after| started.elapsed() >= after)
    };
    let mut ping = tokio::time::interval(Duration::from_secs(54));
    let mut bye_check = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    bytes_in += bytes.len() as u64;
                    let _ = in_tx.send(WsIn::Binary(bytes.to_vec()));
                    // A byte limit is exact: the frame that reaches it is the last one
                    // this websocket carries (the clock limit is checked on a tick below).
                    if first_connection && faults.bye_after_bytes.is_some_and(|limit| bytes_in >= limit) {
                        tracing::info!(session = %id, bytes_in, "fake SSM: closing the websocket with 1000 Bye (fault)");
                        let _ = to_sink.send(WsMessage::Close(Some(CloseFrame { code: 1000, reason: "Bye".into() })));
                        break;
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            out = out_rx.recv() => match out {
                Some(WsOut::Binary(frame)) => {
                    if to_sink.send(WsMessage::Binary(frame.into())).is_err() {
                        break;
                    }
                }
                Some(WsOut::Close(code, reason)) => {
                    let _ = to_sink.send(WsMessage::Close(Some(CloseFrame { code, reason: reason.into() })));
                    break;
                }
                None => {
                    // The session is over (channel_closed was sent): as the service does,
                    // leave the websocket for the client to close (pings still answered),
                    // within a minute.
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        while let Some(Ok(frame)) = stream.next().await {
                            match frame {
                                WsMessage::Close(_) => break,
                                WsMessage::Ping(data) => {
                                    let _ = to_sink.send(WsMessage::Pong(data));
                                }
                                _ => {}
                            }
                        }
                    })
                    .await;
                    break;
                }
            },
            _ = ping.tick() => {
                let _ = to_sink.send(WsMessage::Ping(Bytes::from_static(b"keepalive")));
            }
            _ = bye_check.tick(), if first_connection => {
                if bye_due() {
                    tracing::info!(session = %id, "fake SSM: closing the websocket with 1000 Bye (fault)");
                    let _ = to_sink.send(WsMessage::Close(Some(CloseFrame { code: 1000, reason: "Bye".into() })));
                    break;
                }
            }
        }
    }
    // What is queued (a close frame) goes, unless the network takes nothing.
    drop(to_sink);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let _ = in_tx.send(WsIn::Closed);
}
