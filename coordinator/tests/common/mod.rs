//! Shared helpers of the loopback tests: a real coordinator on 127.0.0.1:0,
//! signed bundles, generated gRPC clients.
#![allow(dead_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use hotfleet_coordinator::{agents::AgentClient, store::embedded::EmbeddedStore, Config, Coordinator};
use hotfleet_patch::{Bundle, Manifest, SigningKeyFile, MANIFEST_FORMAT};
use hotfleet_proto::v1::{agent_gateway_client::AgentGatewayClient, coordinator_client::CoordinatorClient};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub const BUILD: &str = "zone-1.4.2";

pub struct Running {
    pub addr: SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Coordinator>,
}

impl Running {
    pub async fn gateway(&self) -> AgentGatewayClient<Channel> {
        AgentGatewayClient::connect(format!("http://{}", self.addr)).await.expect("connect gateway")
    }

    pub async fn operator(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect operator")
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub fn channel_uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: serve returns, then the coordinator drains.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let coordinator = self.task.await.expect("server task");
        coordinator.drain().await;
    }
}

/// A signing key whose public half is written into `dir` (as hotfleet.pub).
pub fn key_in(dir: &std::path::Path) -> (SigningKeyFile, PathBuf) {
    let key = SigningKeyFile::generate().expect("key");
    let (_, public) = key.write_pair(dir).expect("write key");
    (key, public)
}

pub fn manifest(description: &str) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT.into(),
        target_build: BUILD.into(),
        parent: None,
        packages: vec!["zone".into()],
        modules: vec![],
        author: "sre@example".into(),
        created_at: "2026-11-30T00:00:00Z".into(),
        description: description.into(),
    }
}

pub fn bundle(description: &str, key: Option<&SigningKeyFile>) -> Bundle {
    let mut b = Bundle::create(
        manifest(description),
        vec![("zone.combat".into(), format!("def damage(a, b):\n    return a - b  # {description}\n"))],
    )
    .expect("bundle");
    if let Some(key) = key {
        b.sign(key);
    }
    b
}

pub fn config(data_dir: &std::path::Path, trusted: Vec<PathBuf>) -> Config {
    let mut c = Config::new(data_dir);
    c.trusted_keys = trusted;
    // Agents are told 1 s; the tests' simulated agents beat every 50 ms and
    // want loss noticed fast.
    c.lost_timeout = Some(Duration::from_millis(300));
    c.drain_timeout = Duration::from_secs(5);
    c
}

/// Builds and serves a coordinator on 127.0.0.1:0 with real agent clients.
pub async fn start(config: Config) -> Running {
    let coordinator = Coordinator::build(config).await.expect("build coordinator");
    serve(coordinator).await
}

/// Same, with an injected agent client.
pub async fn start_with(config: Config, agents: Arc<dyn AgentClient>) -> Running {
    let store = Arc::new(EmbeddedStore::open(&config.data_dir).expect("store"));
    let coordinator = Coordinator::build_with(config, store, agents).await.expect("build coordinator");
    serve(coordinator).await
}

async fn serve(coordinator: Coordinator) -> Running {
    serve_on(TcpListener::bind("127.0.0.1:0").await.expect("bind"), coordinator)
}

/// Serves `coordinator` on an already-bound `listener` (for a config that
/// must name its own address, e.g. `advertise_addr`).
pub fn serve_on(listener: TcpListener, coordinator: Coordinator) -> Running {
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        coordinator
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        coordinator
    });
    Running { addr, stop: Some(stop), task }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < until {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// The audit log's paging and retention, the same on every store: pages
/// newest first that chain by sequence number, and trims that drop the
/// oldest entries beyond `keep` or older than `max_age`, in bounded batches,
/// fenced like every write.
pub async fn audit_paging_and_retention(
    store: &dyn hotfleet_coordinator::store::Store,
    fence: hotfleet_coordinator::store::Fence,
    stale: hotfleet_coordinator::store::Fence,
) {
    use hotfleet_coordinator::{
        patches::audit,
        store::{AuditRetention, Batch, Write},
    };
    let mut batch = Batch::new();
    for i in 0..30 {
        let mut entry = audit("sre", &format!("a{i}"), "", "", true);
        entry.at_ms = 1_000 + i; // a{i} written at 1000 + i ms
        batch.push(Write::Audit(entry));
    }
    store.write(fence, batch).await.expect("write");
    let page = store.audit(10, None).await.expect("page 1");
    let seqs: Vec<u64> = page.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (21..=30).rev().collect::<Vec<u64>>(), "newest first");
    let page = store.audit(10, Some(21)).await.expect("page 2");
    assert_eq!(page.first().map(|e| e.seq), Some(20), "the next page starts below the last seq shown");
    assert_eq!(store.audit(100, Some(3)).await.expect("last page").len(), 2);

    let keep = |keep, max_age_ms| AuditRetention { keep, max_age: Duration::from_millis(max_age_ms) };
    let err = store.trim_audit(stale, keep(5, 0), 0).await.expect_err("a stale writer trims nothing");
    assert!(err.to_string().contains("fenced"), "{err}");
    assert_eq!(store.trim_audit(fence, keep(25, 0), 0).await.expect("trim"), 5, "keep the newest 25");
    assert_eq!(store.audit(100, None).await.expect("log").last().map(|e| e.seq), Some(6));
    // Age: at 1_020 ms with a 5 ms max age, entries written before 1_015 go.
    assert_eq!(store.trim_audit(fence, keep(1000, 5), 1_020).await.expect("trim"), 10);
    assert_eq!(store.audit(100, None).await.expect("log").last().map(|e| e.seq), Some(16));
    assert_eq!(store.trim_audit(fence, keep(1000, 5), 1_020).await.expect("again"), 0, "idempotent");
    assert_eq!(store.audit(100, None).await.expect("log").len(), 15);
}
