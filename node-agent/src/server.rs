//! Wires the agent together: gRPC service (with reflection and the standard
//! health service), the runtime socket, heartbeats, and the presumed-abort
//! sweeper, all under one cancellation token.

use std::{sync::Arc, time::Duration};

use hotfleet_patch::TrustedKeys;
use hotfleet_proto::{
    gate::GateLayer,
    listener::{ConnLimits, Incoming},
    tls::{ClientCerts, OwnCert},
    v1::agent_server::AgentServer,
};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{
    attach, coordinator_link,
    coordinators::{Coordinators, Dial},
    epoch::EpochFence,
    finished::Finished,
    guard::CoordinatorOnly,
    participant::{Participant, EPOCH_LEARN_WAIT},
    patches::PatchSource,
    reports::{NodeIdentity, NodeReporter},
    runtime_socket::{self, PeerPolicy},
    service::AgentService,
    sessions::{self, Sessions},
    stacks::CoordinatorStacks,
    AgentConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Epoch(#[from] crate::epoch::EpochError),
    #[error(transparent)]
    Finished(#[from] crate::finished::FinishedError),
    #[error(transparent)]
    Fetch(#[from] crate::patches::FetchError),
    #[error(transparent)]
    Keys(#[from] hotfleet_patch::PatchError),
    #[error("--session-idle-timeout {idle:?} must be longer than --runtime-timeout {runtime:?}: a runtime busy with a commit may be silent that long")]
    IdleTimeout { idle: Duration, runtime: Duration },
    #[error("no trusted keys: pass --trusted-key with the public key patches are signed with")]
    NoTrustedKeys,
    #[error("coordinator address {addr:?} is invalid: {reason}")]
    BadCoordinator { addr: String, reason: String },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error(transparent)]
    Tls(#[from] hotfleet_proto::tls::TlsError),
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn serve(
    config: AgentConfig,
    grpc_listener: TcpListener,
    runtime_listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if config.session_idle_timeout <= config.runtime_timeout {
        return Err(ServeError::IdleTimeout { idle: config.session_idle_timeout, runtime: config.runtime_timeout });
    }
    let transport = config.tls.transport(OwnCert::Required)?;
    if !transport.is_tls() {
        tracing::warn!("--insecure: plaintext gRPC, any client may command this agent (local development only)");
    }
    let trusted = TrustedKeys::load(&config.trusted_keys)?;
    if trusted.is_empty() {
        return Err(ServeError::NoTrustedKeys);
    }
    let node_id = config.resolved_node_id();
    let advertise_addr = match &config.advertise_addr {
        Some(addr) => addr.clone(),
        None => grpc_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
    };
    let gateway = config
        .coordinator
        .as_deref()
        .map(|list| {
            // Through a relay, the server at --coordinator is the relay.
            let server = config.relay_identity.as_ref().unwrap_or(&config.coordinator_identity);
            let dial = Dial { transport: transport.clone(), coordinator_identity: server.clone() };
            Coordinators::parse(list, dial)
        })
        .transpose()
        .map_err(|e| ServeError::BadCoordinator { addr: e.addr, reason: e.reason })?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| crate::patches::FetchError::Cache { path: config.data_dir.clone(), source })?;
    let fence = EpochFence::load(&config.data_dir)?;
    let finished = Finished::load(&config.data_dir)?;
    let patches = PatchSource::new(&config.data_dir, trusted.clone(), gateway.clone())?;
    let sessions = Sessions::default();
    let participant = Arc::new(
        Participant::new(
            node_id.clone(),
            Arc::new(sessions.clone()),
            Arc::new(patches.clone()),
            fence,
            finished,
            config.runtime_timeout,
            config.prepare_ttl,
        )
        // Standalone, nobody announces epochs: no use waiting for one.
        .with_epoch_wait(if gateway.is_some() { EPOCH_LEARN_WAIT } else { Duration::ZERO }),
    );
    let identity = NodeIdentity { node_id: node_id.clone(), labels: config.labels_map(), advertise_addr };
    tracing::info!(node = %node_id, grpc = %identity.advertise_addr, socket = %config.runtime_socket.display(), trusted_keys = ?trusted.ids(), tls = transport.is_tls(), "hotfleet-agent serving");
    let reporter = Arc::new(NodeReporter::new(participant.clone(), identity));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sessions::serve(
        runtime_listener,
        sessions,
        node_id,
        Arc::new(CoordinatorStacks { patches }),
        config.session_idle_timeout,
        PeerPolicy::new(&config.runtime_allowed_uids),
        shutdown.clone(),
    ));
    if let Some(client) = gateway {
        let (registered_tx, registered_rx) = tokio::sync::watch::channel(false);
        tasks.spawn(attach::run(
            client.clone(),
            AgentService::new(reporter.clone()),
            reporter.identity().node_id.clone(),
            config.heartbeat_interval,
            registered_rx,
            shutdown.clone(),
        ));
        tasks.spawn(coordinator_link::run(
            client,
            reporter.clone(),
            config.heartbeat_interval,
            registered_tx,
            shutdown.clone(),
        ));
    } else {
        tracing::warn!("no --coordinator given: running standalone (no registration, no patch downloads)");
    }
    let sweeper = participant.clone();
    let sweep_shutdown = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => sweeper.expire_prepared().await,
                _ = sweep_shutdown.cancelled() => return,
            }
        }
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServer<AgentService>>().await;
    // Reflection lists what this server runs, not every service of the
    // shared proto file (the coordinator's services are not served here).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hotfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(<AgentServer<AgentService> as tonic::server::NamedService>::NAME)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| ServeError::Reflection(e.to_string()))?;

    // Only the coordinator's certificate gets past the handshake and the gate.
    let gate = CoordinatorOnly::new(transport.is_tls().then(|| config.coordinator_identity.clone()));
    // Only coordinators call an agent: a few connections. Anything that
    // connects and sends nothing is closed, and at the cap it makes room.
    let incoming = Incoming::new(grpc_listener, AGENT_CONN_LIMITS);
    let mut builder = Server::builder();
    if let Some(tls) = transport.server_config(ClientCerts::Required, AGENT_CONN_LIMITS.handshake_timeout) {
        builder = builder.tls_config(tls)?;
    }
    let result = builder
        .timeout(Duration::from_secs(120))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(hotfleet_obs::grpc::GrpcLayer::server())
        .layer(GateLayer(gate))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServer::new(AgentService::new(reporter)))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    result.map_err(ServeError::from)
}

/// The agent's gRPC accept side (see [`hotfleet_proto::listener`]).
const AGENT_CONN_LIMITS: ConnLimits = ConnLimits { max_connections: 256, handshake_timeout: Duration::from_secs(10) };

/// Binds the runtime socket with the mode its peer policy needs (see [`runtime_socket`]).
pub fn bind_runtime_socket(config: &AgentConfig) -> std::io::Result<UnixListener> {
    let mode = PeerPolicy::new(&config.runtime_allowed_uids).socket_mode();
    runtime_socket::bind(&config.runtime_socket, mode)
}

/// Until SIGINT or SIGTERM (the agent's and the relay's shutdown signal).
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Writes `contents` to the ready file `path` whole (through a rename), so
/// a supervisor polling it never reads half a line.
pub fn write_ready_file(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).and_then(|()| std::fs::rename(&tmp, path))
}
