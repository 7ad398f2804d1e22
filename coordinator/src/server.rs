//! The assembled coordinator: open the store, start the leadership loop,
//! and serve gRPC on a listener the caller bound.
//!
//! `Coordinator::build` → `serve(listener, shutdown)` → `drain()` is the whole
//! life of the process; tests do the same on `127.0.0.1:0`.
//!
//! Leadership runs in one task for the life of the process: campaign →
//! start a [`Term`] → hold the lease → on loss stop the term at once and
//! campaign again; on shutdown drain the term and resign. On the embedded
//! store the first (and only) tenure is taken before `build` returns, so a
//! single coordinator leads from its first request, exactly as it always did.
//!
//! Shutdown order matters: the term stops (engine first, then the sweeper)
//! and leadership is handed over *before* the gRPC server stops. The other
//! way round, heartbeats stop arriving while the engine still watches health,
//! and a healthy fleet is rolled back for "missed heartbeats".

use hotfleet_obs::grpc::GrpcLayer;
use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};
use tower::layer::util::{Identity, Stack};

use hotfleet_patch::{Limits, TrustedKeys};
use hotfleet_proto::{
    gate::GateLayer,
    tls::{ClientCerts, Transport},
    v1::{agent_gateway_server::AgentGatewayServer, coordinator_server::CoordinatorServer},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{server::NamedService, transport::Server};

use crate::{
    admission::Admission,
    agents::{AgentClient, AgentLinks, GrpcAgents},
    auth::{credentials::Credentials, gate::Authority},
    config::{Config, StoreKind},
    grpc::{self, gateway::GatewayService, operator::OperatorService},
    leadership::{Elector, EtcdBackend, Holding, LeaseElection, SoloElector, Tenure},
    patches::Patches,
    store::{embedded::EmbeddedStore, etcd::EtcdStore, Store, StoreError},
    term::{Cluster, Term, TermContext},
};

/// Why the coordinator could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("trusted keys: {0}")]
    Keys(#[from] hotfleet_patch::PatchError),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A built coordinator, ready to serve.
pub struct Coordinator {
    config: Config,
    cluster: Cluster,
    /// Who may do what: checked on every request by the server's one gate.
    authority: Authority,
    shutdown: CancellationToken,
    /// Taken by whichever of `stop_leading`/`abandon` runs first.
    leadership: Mutex<Option<JoinHandle<()>>>,
    /// Where attaching agents leave their links for the agent client
    /// (`None`: the client only dials, and attaching is refused).
    links: Option<AgentLinks>,
}

impl Coordinator {
    /// Opens the configured store and builds everything with real agent clients.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        let agents = Arc::new(
            GrpcAgents::new(config.agent_timeout, config.agent_concurrency, config.transport.clone())
                .with_channel_cap(config.agent_channels),
        );
        match config.store {
            StoreKind::Embedded => {
                let store = Arc::new(EmbeddedStore::open(&config.data_dir)?);
                Self::build_with(config, store, agents).await
            }
            StoreKind::Etcd => {
                let options = config
                    .etcd
                    .clone()
                    .ok_or_else(|| ServerError::Config("--store etcd without etcd settings".into()))?;
                let store = Arc::new(EtcdStore::connect(&options).await?);
                let backend = EtcdBackend::new(store.client(), store.leader_key(), options.timeout);
                let elector = Arc::new(LeaseElection::new(backend, config.advertise(), config.leader_lease));
                tracing::info!(
                    endpoints = %options.endpoints.join(","),
                    prefix = %store.prefix(),
                    lease = ?config.leader_lease,
                    advertise = %config.advertise(),
                    "etcd store: campaigning for leadership"
                );
                Self::assemble(config, store, elector, agents, false).await
            }
        }
    }

    /// Builds on an embedded store and a given agent client (tests inject
    /// both). The store's epoch is taken here: a restarted coordinator
    /// out-ranks its previous incarnation, and agents refuse anything still
    /// in flight from the old epoch.
    pub async fn build_with(
        config: Config,
        store: Arc<EmbeddedStore>,
        agents: Arc<dyn AgentClient>,
    ) -> Result<Self, ServerError> {
        let fence = store.acquire_epoch().await?;
        let elector = Arc::new(SoloElector::new(fence, config.advertise()));
        Self::assemble(config, store, elector, agents, true).await
    }

    /// Builds on any store and elector. With `lead_first`, the first tenure
    /// is taken and its term started before returning (errors surface here).
    pub async fn assemble(
        config: Config,
        store: Arc<dyn Store>,
        elector: Arc<dyn Elector>,
        agents: Arc<dyn AgentClient>,
        lead_first: bool,
    ) -> Result<Self, ServerError> {
        let credentials = Credentials::load(config.operators.as_deref(), config.tokens.as_deref())
            .map_err(|e| ServerError::Config(e.to_string()))?
            .with_relays(&config.relays);
        let authority = Authority::new(!config.transport.is_tls(), credentials);
        if !config.transport.is_tls() {
            tracing::warn!(
                "--insecure: plaintext gRPC, nobody authenticated, every caller is admin (local development only)"
            );
        }
        let trusted = TrustedKeys::load(&config.trusted_keys)?;
        if trusted.is_empty() {
            tracing::warn!("no --trusted-key given: every patch upload will be refused");
        }
        let limits = Limits { max_bundle_bytes: config.max_patch_bytes, ..Limits::default() };
        let links = agents.links();
        let ctx = Arc::new(TermContext {
            store: store.clone(),
            agents,
            trusted: trusted.clone(),
            limits,
            heartbeat_interval: config.heartbeat_interval,
            lost_timeout: config.lost_timeout(),
            agent_timeout: config.agent_timeout,
            node_expiry: config.node_expiry,
            audit_retention: config.audit_retention,
        });
        let shutdown = CancellationToken::new();
        let (term_tx, term_rx) = watch::channel(None);
        let first = if lead_first {
            let Some(tenure) = elector.campaign(&shutdown).await else {
                return Err(ServerError::Config("shut down before leading".into()));
            };
            let (holding, term) = take_office(&ctx, &elector, tenure, &shutdown).await?;
            term_tx.send_replace(Some(term.clone()));
            Some((holding, term))
        } else {
            None
        };
        let cluster = Cluster::new(
            store.clone(),
            Patches::new(store.clone(), trusted.clone(), limits),
            config.advertise(),
            term_rx,
            elector.view(),
            shutdown.clone(),
        );
        tracing::info!(
            store = store.backend(),
            data_dir = %config.data_dir.display(),
            advertise = %config.advertise(),
            epoch = first.as_ref().map(|(held, _)| held.tenure.fence.epoch).unwrap_or(0),
            trusted_keys = ?trusted.ids(),
            tls = config.transport.is_tls(),
            "coordinator ready"
        );
        let drain_timeout = config.drain_timeout;
        let leadership = tokio::spawn(lead(ctx, elector, term_tx, shutdown.clone(), first, drain_timeout));
        Ok(Self { config, cluster, authority, shutdown, leadership: Mutex::new(Some(leadership)), links })
    }

    /// The epoch of the current term, while this coordinator leads.
    pub fn epoch(&self) -> Option<u64> {
        self.cluster.term().map(|t| t.fence.epoch)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The role, store and term, as the gRPC adapters see them.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The attached agents' links (`None`: this coordinator dials its agents).
    pub fn links(&self) -> Option<AgentLinks> {
        self.links.clone()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.cluster.store
    }

    /// Serves agents and operators on `listener` until `shutdown` resolves;
    /// then stops leading (see the module docs) while still serving, and
    /// only then stops the gRPC server.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let gateway = GatewayService {
            cluster: self.cluster.clone(),
            admission: Admission::new(self.config.limits.registrations_in_flight),
            links: self.links.clone(),
        };
        let operator = OperatorService { cluster: self.cluster.clone() };
        // Uploads carry a whole bundle in one message: allow the bundle limit
        // plus room for framing, so an oversized bundle meets our clear error
        // rather than a bare transport limit.
        let max_message = self.config.max_patch_bytes + 64 * 1024;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<AgentGatewayServer<GatewayService>>().await;
        health_reporter.set_serving::<CoordinatorServer<OperatorService>>().await;
        let (reflection_v1, reflection_v1alpha) = reflection()?;
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(%addr, tls = self.config.transport.is_tls(), "serving gRPC (AgentGateway, Coordinator, health, reflection)");
        let limits = &self.config.limits;
        let (builder, incoming) = grpc::limits::apply(Server::builder(), listener, limits);
        let operator = CoordinatorServer::new(operator).max_decoding_message_size(max_message);
        grpc_server(builder, &self.config.transport, limits.handshake_timeout, self.authority.clone())?
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AgentGatewayServer::new(gateway))
            .add_service(grpc::limits::Shed::new(operator, limits.operator_concurrency))
            .serve_with_incoming_shutdown(incoming, async {
                shutdown.await;
                self.stop_leading().await;
            })
            .await?;
        Ok(())
    }

    /// Stops driving, waits (bounded) for what is in flight, then resigns
    /// leadership. Rollouts in flight stay recorded at their last step and
    /// resume on the next leader (or this one, restarted). Idempotent.
    pub async fn stop_leading(&self) {
        self.shutdown.cancel();
        let Some(leadership) = self.leadership.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        tracing::info!("shutting down: stopping the term before the gRPC server");
        // The loop drains the term within the drain timeout, then resigns (bounded too).
        let limit = self.config.drain_timeout + Duration::from_secs(5);
        if tokio::time::timeout(limit, leadership).await.is_err() {
            tracing::warn!("leadership loop did not stop in time");
        }
    }

    /// [`stop_leading`](Self::stop_leading), for a coordinator whose server
    /// has already stopped (or never served).
    pub async fn drain(self) {
        self.stop_leading().await;
    }

    /// Cancels background work without waiting (tests simulating a crash).
    pub fn abandon(self) {
        if let Some(term) = self.cluster.term() {
            term.stop_now();
        }
        if let Some(leadership) = self.leadership.lock().unwrap_or_else(|e| e.into_inner()).take() {
            leadership.abort();
        }
        self.shutdown.cancel();
    }
}

/// Every request passes the gRPC layer (metrics, traces), then the gate.
type Layers = Stack<GateLayer<Authority>, Stack<GrpcLayer, Identity>>;

/// The server every request passes through: mutual TLS from the config
/// (client certificates optional, since operators may bring a bearer token
/// instead), or plaintext with `--insecure`; then the one gate that
/// decides who may call what.
fn grpc_server(
    mut builder: Server,
    transport: &Transport,
    handshake_timeout: Duration,
    authority: Authority,
) -> Result<Server<Layers>, ServerError> {
    if let Some(tls) = transport.server_config(ClientCerts::Optional, handshake_timeout) {
        builder = builder.tls_config(tls)?;
    }
    // Metrics outside the gate: refusals are counted too.
    Ok(builder.layer(GrpcLayer::server()).layer(GateLayer(authority)))
}

/// The gRPC services this server runs: what reflection lists, no more. The
/// shared proto file also declares the agents' `hotfleet.v1.Agent`, which a
/// coordinator does not serve (a stock client listing it would get
/// UNIMPLEMENTED).
pub const SERVED: [&str; 5] = [
    <AgentGatewayServer<GatewayService> as NamedService>::NAME,
    <CoordinatorServer<OperatorService> as NamedService>::NAME,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Both reflection services (grpcio's client still speaks only `v1alpha`),
/// advertising exactly [`SERVED`].
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServerError,
> {
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hotfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .include_reflection_service(false);
        SERVED.iter().fold(builder, |b, name| b.with_service_name(*name))
    };
    let error = |e: tonic_reflection::server::Error| ServerError::Reflection(e.to_string());
    Ok((builder().build_v1().map_err(error)?, builder().build_v1alpha().map_err(error)?))
}

/// The leadership loop (see the module docs).
/// Starts the term of a won `tenure`, its lease renewed from the start; a
/// term that cannot start gives the tenure up at once.
async fn take_office(
    ctx: &TermContext,
    elector: &Arc<dyn Elector>,
    tenure: Tenure,
    shutdown: &CancellationToken,
) -> Result<(Holding, Arc<Term>), StoreError> {
    let holding = Holding::start(elector.clone(), tenure, shutdown);
    match Term::start(ctx, &holding.tenure).await {
        Ok(term) => Ok((holding, term)),
        Err(err) => {
            holding.resign(&**elector).await;
            Err(err)
        }
    }
}

async fn lead(
    ctx: Arc<TermContext>,
    elector: Arc<dyn Elector>,
    term_tx: watch::Sender<Option<Arc<Term>>>,
    shutdown: CancellationToken,
    mut first: Option<(Holding, Arc<Term>)>,
    drain_timeout: Duration,
) {
    let retry = Duration::from_secs(1);
    loop {
        let (mut holding, term) = match first.take() {
            Some(started) => started,
            None => {
                let Some(tenure) = elector.campaign(&shutdown).await else { return };
                match take_office(&ctx, &elector, tenure, &shutdown).await {
                    Ok(started) => started,
                    Err(err) => {
                        // Won, but cannot read the store: let someone else try.
                        tracing::warn!(error = %err, "elected but cannot start the term; resigned");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(retry) => continue,
                        }
                    }
                }
            }
        };
        term_tx.send_replace(Some(term.clone()));
        let lost = holding.ended().await;
        term_tx.send_replace(None);
        let epoch = holding.tenure.fence.epoch;
        match lost {
            Some(reason) => {
                term.stop_now();
                tracing::warn!(epoch, %reason, "no longer leading: term stopped; campaigning again");
            }
            None => {
                term.drain(drain_timeout).await;
                elector.resign(&holding.tenure).await;
                return;
            }
        }
    }
}
