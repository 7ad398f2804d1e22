//! The assembled coordinator: open the store, take the epoch, load the fleet,
//! start background tasks, and serve gRPC on a listener the caller bound.
//!
//! `Coordinator::build` → `serve(listener, shutdown)` → `drain()` is the whole
//! life of the process; tests do the same on `127.0.0.1:0`.

use std::{future::Future, sync::Arc};

use hotfleet_patch::{Limits, TrustedKeys};
use hotfleet_proto::v1::{agent_gateway_server::AgentGatewayServer, coordinator_server::CoordinatorServer};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentClient, GrpcAgents},
    config::{Config, StoreKind},
    engine::{Engine, EngineConfig},
    grpc::{gateway::GatewayService, operator::OperatorService},
    patches::Patches,
    reconcile::Reconciler,
    registry::Registry,
    store::{embedded::EmbeddedStore, Fence, Store, StoreError},
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
}

/// A built coordinator, ready to serve.
pub struct Coordinator {
    config: Config,
    store: Arc<dyn Store>,
    fence: Fence,
    registry: Registry,
    patches: Patches,
    engine: Engine,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Coordinator {
    /// Opens the configured store and builds everything with real agent clients.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        let store: Arc<dyn Store> = match config.store {
            StoreKind::Embedded => Arc::new(EmbeddedStore::open(&config.data_dir)?),
        };
        let agents = Arc::new(GrpcAgents::new(config.agent_timeout, config.agent_concurrency));
        Self::build_with(config, store, agents).await
    }

    /// Builds on a given store and agent client (tests use this to inject).
    pub async fn build_with(
        config: Config,
        store: Arc<dyn Store>,
        agents: Arc<dyn AgentClient>,
    ) -> Result<Self, ServerError> {
        // A restarted coordinator out-ranks its previous incarnation: agents
        // refuse anything still in flight from the old epoch.
        let fence = store.acquire_epoch().await?;
        let trusted = TrustedKeys::load(&config.trusted_keys)?;
        if trusted.is_empty() {
            tracing::warn!("no --trusted-key given: every patch upload will be refused");
        }
        let limits = Limits { max_bundle_bytes: config.max_patch_bytes, ..Limits::default() };
        let registry = Registry::load(store.clone(), fence, config.heartbeat_interval, config.lost_timeout()).await?;
        let patches = Patches::new(store.clone(), fence, trusted.clone(), limits);
        let cancel = CancellationToken::new();
        let engine = Engine::new(
            store.clone(),
            fence,
            registry.clone(),
            agents.clone(),
            EngineConfig::default(),
            cancel.child_token(),
        );
        let reconciler = Reconciler {
            store: store.clone(),
            fence,
            registry: registry.clone(),
            engine: engine.clone(),
            agents,
            deadline: config.agent_timeout,
        };
        let tasks = vec![
            tokio::spawn(registry.clone().run_sweeper(cancel.child_token())),
            tokio::spawn(reconciler.run(cancel.child_token())),
        ];
        let resumed = engine.resume().await?;
        tracing::info!(
            store = store.backend(),
            data_dir = %config.data_dir.display(),
            epoch = fence.epoch,
            nodes = registry.list().len(),
            trusted_keys = ?trusted.ids(),
            resumed_rollouts = resumed,
            "coordinator ready"
        );
        Ok(Self { config, store, fence, registry, patches, engine, cancel, tasks })
    }

    pub fn epoch(&self) -> u64 {
        self.fence.epoch
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Serves agents and operators on `listener` until `shutdown` resolves.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let gateway = GatewayService {
            registry: self.registry.clone(),
            patches: self.patches.clone(),
            store: self.store.clone(),
        };
        let operator = OperatorService {
            registry: self.registry.clone(),
            patches: self.patches.clone(),
            engine: self.engine.clone(),
            store: self.store.clone(),
        };
        // Uploads carry a whole bundle in one message: allow the bundle limit
        // plus room for framing, so an oversized bundle meets our clear error
        // rather than a bare transport limit.
        let max_message = self.patches.limits().max_bundle_bytes + 64 * 1024;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<AgentGatewayServer<GatewayService>>().await;
        health_reporter.set_serving::<CoordinatorServer<OperatorService>>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hotfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hotfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(%addr, "serving gRPC (AgentGateway, Coordinator, health, reflection)");
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AgentGatewayServer::new(gateway))
            .add_service(CoordinatorServer::new(operator).max_decoding_message_size(max_message))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await?;
        Ok(())
    }

    /// Stops background work and waits (bounded) for it. Rollouts in flight
    /// stay recorded at their last step and resume on the next start.
    pub async fn drain(self) {
        self.cancel.cancel();
        let timeout = self.config.drain_timeout;
        let engine = self.engine.clone();
        let all = async move {
            engine.join().await;
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(?timeout, "drain timed out; exiting with work in flight (it resumes on restart)");
        } else {
            tracing::info!("drained");
        }
    }

    /// Cancels background work without waiting (tests simulating a crash).
    pub fn abandon(self) {
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
        self.engine.abort_all();
    }
}
