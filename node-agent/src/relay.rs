//! `hotfleet-relay`: the agents of a rack (or a host with many agents) call
//! the coordinator through one relay, which carries their calls over a few
//! HTTP/2 connections instead of one per agent. Each connection costs the
//! coordinator ~25 KB of HTTP/2 buffers whatever it carries
//! (`docs/performance.md`); a relay makes that cost per relay, not per node.
//!
//! What it does to a call, and nothing more (the payloads pass untouched):
//! - only the agents' service (`hotfleet.v1.AgentGateway`) is relayed, and
//!   with TLS only from a client certificate of the fleet's CA;
//! - it hands the coordinator the certificate of the agent it forwards for
//!   ([`RELAYED_CERT_HEADER`]), after dropping whatever the agent sent under
//!   that name; the coordinator believes it only from a relay it names
//!   (`--relay`), and only for the agents' service;
//! - it follows the leader itself: a follower's "the leader is X" moves the
//!   relay, and the agent is told only to retry (it must keep calling the
//!   relay, not go around it);
//! - an agent's attached command stream is not forwarded as a stream of
//!   its own: every agent on an upstream connection goes on its one shared
//!   stream (`relay_attach.rs`), so the coordinator holds a link per agent,
//!   not an HTTP/2 stream; only to a coordinator from before that stream is
//!   the agent's forwarded, and then each upstream connection carries at
//!   most [`ATTACHED_PER_CONNECTION`] of them (the coordinator allows 256
//!   streams per connection): an agent past `--upstream-connections` × that
//!   is told to come back later rather than queued behind streams that never
//!   end.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::future::BoxFuture;
use hotfleet_proto::{
    attach::{ATTACH_PATH, ATTACH_RELAYED_PATH},
    listener::{fit_max_connections, ConnLimits, Incoming},
    tls::{ClientCerts, OwnCert, PeerCert, TlsArgs, RELAYED_CERT_HEADER},
};
use http_body_util::BodyExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    codegen::{http, Service},
    server::NamedService,
    transport::{Channel, Server},
    Code, Status,
};
use tower::ServiceExt as _;

use crate::{
    coordinators::{Coordinators, Dial, LEADER_HEADER},
    relay_attach::Carrier,
};

pub static ATTACHED: hotfleet_obs::Def = hotfleet_obs::Def {
    name: "hotfleet_relay_attached_agents",
    help: "Agents attached through this relay now (each holds a stream on an upstream connection).",
    kind: hotfleet_obs::Kind::Gauge,
    labels: &[],
};
pub static CAPACITY: hotfleet_obs::Def = hotfleet_obs::Def {
    name: "hotfleet_relay_attach_capacity",
    help: "Agents this relay can attach on streams of their own (to a coordinator without AttachRelayed): --upstream-connections x 192. The shared streams have no such bound.",
    kind: hotfleet_obs::Kind::Gauge,
    labels: &[],
};
pub static UNREACHABLE: hotfleet_obs::Def = hotfleet_obs::Def {
    name: "hotfleet_relay_coordinator_unreachable_total",
    help: "Calls the relay could not carry because the coordinator it followed was unreachable.",
    kind: hotfleet_obs::Kind::Counter,
    labels: &[],
};

/// Attached agents one upstream connection carries on streams of their own
/// (to a coordinator without the shared stream): under the coordinator's 256
/// streams per connection, leaving room for heartbeats and downloads.
pub const ATTACHED_PER_CONNECTION: usize = 192;

/// `hotfleet-relay` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "hotfleet-relay",
    version,
    about = "Carries many agents' calls to the hotfleet coordinator over a few connections"
)]
pub struct RelayConfig {
    /// Address agents call (their `--coordinator`).
    #[arg(long, env = "HOTFLEET_RELAY_LISTEN", default_value = "0.0.0.0:7702")]
    pub listen: SocketAddr,
    /// Coordinator URL, or a comma-separated list of every coordinator of an
    /// HA deployment (the relay follows the leader).
    #[arg(long, env = "HOTFLEET_COORDINATOR")]
    pub coordinator: String,
    /// The coordinator's certificate identity (CN or DNS name).
    #[arg(long, env = "HOTFLEET_COORDINATOR_IDENTITY", default_value = hotfleet_proto::tls::DEFAULT_COORDINATOR_IDENTITY)]
    pub coordinator_identity: String,
    /// HTTP/2 connections to the coordinator; the attached agents are spread over them.
    #[arg(long, env = "HOTFLEET_RELAY_UPSTREAM_CONNECTIONS", default_value_t = 4)]
    pub upstream_connections: usize,
    /// Threads carrying calls; 0: one per core.
    #[arg(long, env = "HOTFLEET_RELAY_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Agent connections at most (the rest wait in the kernel's backlog).
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Once listening, write {"grpc": ADDR, "pid": PID} here (supervisors, tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Mutual TLS (the relay's certificate, which the coordinator names in
    /// `--relay` and agents verify with `--relay-identity`) or --insecure.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Logs and metrics (`--log-format`, `--metrics-listen`).
    #[command(flatten)]
    pub obs: hotfleet_obs::ObsArgs,
}

/// Why the relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] hotfleet_proto::tls::TlsError),
    #[error("--coordinator: {0}")]
    Coordinator(#[from] crate::coordinators::BadAddress),
    #[error("--upstream-connections must be at least 1")]
    NoConnections,
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// One upstream connection: the coordinator it follows, and room for attached agents.
struct Upstream {
    coordinators: Coordinators,
    attached: Arc<Semaphore>,
    /// Its attached agents' shared stream (`relay_attach.rs`).
    carrier: Carrier,
}

/// The relayed service: every agent call, forwarded as it came.
#[derive(Clone)]
pub struct Relay {
    upstreams: Arc<Vec<Upstream>>,
    next: Arc<AtomicUsize>,
    tls: bool,
}

impl NamedService for Relay {
    const NAME: &'static str = "hotfleet.v1.AgentGateway";
}

impl Relay {
    /// `connections` upstream connections to `coordinators` (the `--coordinator` list).
    pub fn new(coordinators: &str, dial: Dial, connections: usize) -> Result<Self, RelayError> {
        if connections == 0 {
            return Err(RelayError::NoConnections);
        }
        let tls = dial.transport.is_tls();
        let mut upstreams = Vec::with_capacity(connections);
        for _ in 0..connections {
            // Each `Coordinators` dials its own channels: one connection per upstream.
            let coordinators = Coordinators::parse(coordinators, dial.clone())?;
            upstreams.push(Upstream {
                carrier: Carrier::new(coordinators.clone()),
                coordinators,
                attached: Arc::new(Semaphore::new(ATTACHED_PER_CONNECTION)),
            });
        }
        Ok(Relay { upstreams: Arc::new(upstreams), next: Arc::new(AtomicUsize::new(0)), tls })
    }

    /// Keeps its gauges in `registry` current at each scrape.
    pub fn watch(&self, registry: &hotfleet_obs::Registry) {
        let watched = self.clone();
        registry.on_scrape(move |registry| {
            registry.set(&ATTACHED, &[], watched.attached() as f64);
            registry.set(&CAPACITY, &[], (watched.upstreams.len() * ATTACHED_PER_CONNECTION) as f64);
        });
    }

    /// Agents attached through this relay now.
    pub fn attached(&self) -> usize {
        let forwarded: usize =
            self.upstreams.iter().map(|u| ATTACHED_PER_CONNECTION - u.attached.available_permits()).sum();
        forwarded + self.upstreams.iter().map(|u| u.carrier.attached()).sum::<usize>()
    }

    /// What goes upstream: the agent's certificate in our header (never
    /// theirs), no credentials of its own, no connection details.
    fn rewrite(&self, request: &mut http::Request<Body>) -> Result<(), Status> {
        let cert = PeerCert::der_of(request);
        let headers = request.headers_mut();
        headers.remove(RELAYED_CERT_HEADER);
        headers.remove(http::header::AUTHORIZATION);
        if self.tls {
            let der = cert
                .ok_or_else(|| Status::unauthenticated("the relay forwards only agents with a client certificate"))?;
            let value = http::HeaderValue::from_str(&hex::encode(der))
                .map_err(|_| Status::internal("a certificate hex-encoded is not a header value"))?;
            headers.insert(RELAYED_CERT_HEADER, value);
        }
        *request.extensions_mut() = http::Extensions::new();
        Ok(())
    }

    /// The upstream for a call: round robin, and for an attach the next one
    /// with room (its permit held until the stream ends).
    fn pick(&self, attach: bool) -> Result<(usize, Option<tokio::sync::OwnedSemaphorePermit>), Status> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if !attach {
            return Ok((start, None));
        }
        for i in (0..n).map(|k| (start + k) % n) {
            if let Ok(permit) = self.upstreams[i].attached.clone().try_acquire_owned() {
                return Ok((i, Some(permit)));
            }
        }
        Err(Status::resource_exhausted(format!(
            "relay full: {} agents attached ({n} upstream connections x {ATTACHED_PER_CONNECTION}; raise --upstream-connections)",
            n * ATTACHED_PER_CONNECTION
        )))
    }

    /// After a call to `from` failed with `status` (a transport error, or a
    /// follower naming the leader): every upstream following `from` moves on.
    fn redirect(&self, from: &str, status: &Status) {
        for upstream in self.upstreams.iter() {
            upstream.coordinators.after_error(from, status);
        }
    }

    async fn forward(self, mut request: http::Request<Body>) -> http::Response<Body> {
        if request.uri().path() == ATTACH_RELAYED_PATH {
            return Status::permission_denied("an agent may not attach others: only a relay does").into_http();
        }
        let attach = request.uri().path() == ATTACH_PATH;
        // Taken before `rewrite` clears the connection's details; only an
        // attach served here needs it (every other call carries it in the header).
        let cert = if attach { PeerCert::der_of(&request) } else { None };
        if let Err(status) = self.rewrite(&mut request) {
            return status.into_http();
        }
        if attach {
            // On an upstream's shared stream; forwarded as it came only to
            // a coordinator from before that stream.
            let carrier = &self.upstreams[self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len()].carrier;
            match carrier.stream().await {
                Ok(carried) => return carrier.serve(carried, cert.unwrap_or_default(), request).await,
                Err((_, status)) if status.code() == Code::Unimplemented => {}
                Err((from, status)) => {
                    tracing::warn!(coordinator = %from, error = %status.message(), "could not open the shared attached stream");
                    self.redirect(&from, &status);
                    return Status::unavailable(format!("relay: coordinator {from}: {}", status.message())).into_http();
                }
            }
        }
        let (slot, permit) = match self.pick(attach) {
            Ok(picked) => picked,
            Err(status) => return status.into_http(),
        };
        let (from, channel): (String, Channel) = self.upstreams[slot].coordinators.current_channel();
        let answer = match channel.oneshot(request).await {
            Ok(answer) => answer,
            Err(err) => {
                let status = Status::unavailable(format!("relay: coordinator {from} unreachable: {err}"));
                tracing::warn!(coordinator = %from, error = %err, "coordinator unreachable: trying the next");
                hotfleet_obs::metrics().inc(&UNREACHABLE, &[]);
                self.redirect(&from, &status);
                return status.into_http();
            }
        };
        let (mut parts, body) = answer.into_parts();
        if let Some(status) = Status::from_header_map(&parts.headers) {
            let named_leader = parts.headers.contains_key(LEADER_HEADER);
            if status.code() == Code::Unavailable || (status.code() == Code::FailedPrecondition && named_leader) {
                self.redirect(&from, &status);
                tracing::info!(coordinator = %from, code = ?status.code(), "following the leader");
            }
            // The agent retries at the relay; a leader's address would take it around.
            parts.headers.remove(LEADER_HEADER);
        }
        let body = match permit {
            // The permit goes with the body: the attached stream holds its room until it ends.
            Some(permit) => Body::new(body.map_frame(move |frame| {
                let _held = &permit;
                frame
            })),
            None => body,
        };
        http::Response::from_parts(parts, body)
    }
}

impl Service<http::Request<Body>> for Relay {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let relay = self.clone();
        Box::pin(async move { Ok(relay.forward(request).await) })
    }
}

/// Serves `config` on `listener` until `shutdown`.
pub async fn serve(
    config: &RelayConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let transport = config.tls.transport(OwnCert::Required)?;
    let dial = Dial { transport: transport.clone(), coordinator_identity: config.coordinator_identity.clone() };
    let relay = Relay::new(&config.coordinator, dial, config.upstream_connections)?;
    relay.watch(hotfleet_obs::metrics());
    let handshake = Duration::from_secs(10);
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = transport.server_config(ClientCerts::Required, handshake) {
        builder = builder.tls_config(tls)?;
    }
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        coordinator = %config.coordinator,
        upstream_connections = config.upstream_connections,
        tls = transport.is_tls(),
        "hotfleet-relay serving"
    );
    // Descriptors kept free of agents' connections: the upstream ones, logs.
    let max_connections = fit_max_connections(config.max_connections, 64 + config.upstream_connections as u64);
    let incoming = Incoming::new(listener, ConnLimits { max_connections, handshake_timeout: handshake });
    builder
        .layer(hotfleet_obs::grpc::GrpcLayer::server())
        .add_service(relay)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(connections: usize) -> Relay {
        Relay::new("127.0.0.1:1", Dial::insecure(), connections).expect("relay")
    }

    #[tokio::test]
    async fn attached_agents_fill_each_connection_to_its_bound_then_are_told_to_come_back() {
        let relay = relay(2);
        let mut held = Vec::new();
        for _ in 0..2 * ATTACHED_PER_CONNECTION {
            let (_, permit) = relay.pick(true).expect("room");
            held.push(permit.expect("an attach holds a permit"));
        }
        assert_eq!(relay.attached(), 2 * ATTACHED_PER_CONNECTION);
        let full = relay.pick(true).expect_err("full");
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.message().contains("--upstream-connections"), "{}", full.message());
        // Heartbeats and downloads still go through, and a stream that ends frees its room.
        assert!(relay.pick(false).expect("unary calls are not bounded here").1.is_none());
        held.pop();
        assert!(relay.pick(true).is_ok());
        assert!(Relay::new("127.0.0.1:1", Dial::insecure(), 0).is_err(), "no connection is refused");
    }

    #[tokio::test]
    async fn its_gauges_say_how_full_it_is_at_each_scrape() {
        let relay = relay(3);
        let registry = hotfleet_obs::Registry::default();
        relay.watch(&registry);
        let _held: Vec<_> = (0..5).map(|_| relay.pick(true).expect("room")).collect();
        let text = registry.render();
        assert!(text.contains("hotfleet_relay_attached_agents 5"), "{text}");
        assert!(text.contains(&format!("hotfleet_relay_attach_capacity {}", 3 * ATTACHED_PER_CONNECTION)), "{text}");
    }

    #[tokio::test]
    async fn an_agent_cannot_send_its_own_relayed_certificate_or_credentials() {
        let relay = relay(1);
        let mut request = http::Request::builder()
            .uri("/hotfleet.v1.AgentGateway/Register")
            .header(RELAYED_CERT_HEADER, "00ff")
            .header(http::header::AUTHORIZATION, "Bearer stolen")
            .body(Body::empty())
            .expect("request");
        relay.rewrite(&mut request).expect("plaintext relays forward");
        assert!(request.headers().get(RELAYED_CERT_HEADER).is_none());
        assert!(request.headers().get(http::header::AUTHORIZATION).is_none());

        // With TLS, a call without the agent's certificate is not forwarded.
        let tls = Relay { tls: true, ..relay };
        let mut bare =
            http::Request::builder().uri("/hotfleet.v1.AgentGateway/Register").body(Body::empty()).expect("request");
        assert_eq!(tls.rewrite(&mut bare).expect_err("no certificate").code(), Code::Unauthenticated);
    }
    /// A coordinator from before the shared stream answers it UNIMPLEMENTED:
    /// the agent's own stream is then forwarded as it came, and the
    /// coordinator's answer to it reaches the agent.
    #[tokio::test]
    async fn to_a_coordinator_without_the_shared_stream_an_agents_attach_is_forwarded_as_it_came() {
        use prost::Message as _;
        // A gRPC server that serves no AgentGateway at all stands in for it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let relay = Relay::new(&format!("http://{addr}"), Dial::insecure(), 1).expect("relay");
        let hello = hotfleet_proto::v1::AgentAnswer {
            call_id: 0,
            answer: Some(hotfleet_proto::v1::agent_answer::Answer::Hello(hotfleet_proto::v1::AttachHello {
                node_id: "node-1".into(),
            })),
        };
        let encoded = hello.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        framed.extend_from_slice(&encoded);
        let request = http::Request::builder()
            .method("POST")
            .uri(ATTACH_PATH)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::new(http_body_util::Full::new(tonic::codegen::Bytes::from(framed))))
            .expect("request");
        let answer = relay.clone().forward(request).await;
        let status = Status::from_header_map(answer.headers()).expect("a trailers-only answer");
        // Forwarded: the server's own refusal, not the relay's "unavailable".
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(!status.message().contains("relay:"), "{status:?}");
    }
}
