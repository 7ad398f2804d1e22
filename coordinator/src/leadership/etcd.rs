//! The etcd wire code of the election: [`EtcdBackend`] speaks leases, the
//! create-if-absent leader key and its watch through `etcd-client`.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};

use super::{Acquire, ElectionBackend, ElectionError, LeaseElection};

/// [`LeaseElection`] against etcd.
pub type EtcdElection = LeaseElection<EtcdBackend>;

/// [`ElectionBackend`] on etcd: the leader key `<prefix>leader`, created only
/// if absent, bound to the candidate's lease.
pub struct EtcdBackend {
    client: Client,
    key: String,
    timeout: Duration,
}

impl EtcdBackend {
    pub fn new(client: Client, key: String, timeout: Duration) -> Self {
        Self { client, key, timeout }
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ElectionError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ElectionError(format!("etcd {what}: {e}"))),
            Err(_) => Err(ElectionError(format!("etcd {what}: no answer within {} ms", self.timeout.as_millis()))),
        }
    }
}

#[async_trait]
impl ElectionBackend for EtcdBackend {
    async fn grant(&self, ttl_secs: u64) -> Result<i64, ElectionError> {
        let mut client = self.client.clone();
        Ok(self.call("lease grant", client.lease_grant(ttl_secs as i64, None)).await?.id())
    }

    async fn revoke(&self, lease: i64) -> Result<(), ElectionError> {
        let mut client = self.client.clone();
        match self.call("lease revoke", client.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // Already gone (expired): that is what revoking wanted.
            Err(err) if err.0.contains("not found") => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn keep_alive(&self, lease: i64) -> Result<Option<u64>, ElectionError> {
        // One short stream per renewal: nothing long-lived to go stale across
        // an etcd restart.
        let mut client = self.client.clone();
        let renew = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match self.call("lease keep-alive", renew).await? {
            Some(resp) if resp.ttl() > 0 => Ok(Some(resp.ttl() as u64)),
            // TTL 0: etcd no longer knows the lease.
            _ => Ok(None),
        }
    }

    async fn try_acquire(&self, lease: i64, value: &[u8]) -> Result<Acquire, ElectionError> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(self.key.as_str(), value.to_vec(), Some(PutOptions::new().with_lease(lease)))])
            .or_else(vec![TxnOp::get(self.key.as_str(), None)]);
        let mut client = self.client.clone();
        let resp = self.call("leader txn", client.txn(txn)).await?;
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if revision <= 0 {
                return Err(ElectionError("etcd answered without a revision".into()));
            }
            return Ok(Acquire::Won { epoch: revision as u64 });
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(match current {
            Some(kv) => Acquire::Held {
                holder: serde_json::from_slice(kv.value()).ok(),
                epoch: kv.create_revision() as u64,
                revision: revision.max(kv.mod_revision()),
            },
            // Deleted between the compare and the read: try again at once.
            None => Acquire::Held { holder: None, epoch: 0, revision },
        })
    }

    async fn wait_change(&self, revision: i64, max: Duration) -> Result<(), ElectionError> {
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let watch = async {
            let mut stream = client.watch(self.key.as_str(), Some(options)).await?;
            while let Some(resp) = stream.message().await? {
                if resp.canceled() {
                    // Compacted past our revision, or etcd went away: re-read.
                    return Ok(());
                }
                if resp.events().iter().any(|e| e.event_type() == EventType::Delete || e.event_type() == EventType::Put)
                {
                    return Ok(());
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        match tokio::time::timeout(max, watch).await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(ElectionError(format!("etcd watch: {e}"))),
        }
    }
}
