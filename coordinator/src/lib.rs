//! hotfleet coordinator: stages signed patches and rolls them out across a
//! fleet of game servers (two-phase commit, canary, waves, health gates,
//! automatic fleet-wide rollback).
//!
//! Where things live:
//! - [`store`]: everything persisted, behind the [`store::Store`] trait (embedded redb, or etcd for HA).
//! - [`leadership`]: leader election on etcd, the lease, and the fences on writes and commands.
//! - [`term`]: what runs only while this coordinator leads, and the role the gRPC adapters consult.
//! - [`reads`]: the operator's read path (the leader's engine or the store, decided once).
//! - [`input`]: bounds on every field callers send, and the one way to quote their input.
//! - [`registry`]: agents, their addresses, what they run, liveness; [`node_writes`]: their records' writes,
//!   grouped; [`admission`]: how many registrations are served at once, and when the rest come back.
//! - [`drift`]: a process's patch stack against its build's; [`reconcile`] repairs drift.
//! - [`sweeper`]: the leader's housekeeping: lost nodes, node expiry, audit retention.
//! - [`patches`]: verified patch uploads, stored by digest.
//! - [`patch_plan`]: a plan from a live process (prepare, answer the runtime's plan, abort).
//! - [`planner`]: selector → canary and waves (pure).
//! - [`rollout`]: the rollout state machine and the health gate (pure).
//! - [`stack`]: each build's patch stack as desired state (what may go on top) and its listing.
//! - [`engine`]: drives rollouts through [`agents::AgentClient`].
//! - [`agents`]: the gRPC client side towards agents; [`agent_channels`]: which connections to them stay open.
//! - [`grpc`]: adapters for the `AgentGateway` and operator `Coordinator` services.
//! - [`server`]: assembles all of it and serves on a bound listener.

pub mod admission;
pub mod agent_channels;
pub mod agent_links;
pub mod agents;
pub mod auth;
pub mod clock;
pub mod config;
pub mod digests;
pub mod drift;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod input;
pub mod interned;
pub mod leadership;
pub mod memory;
pub mod node;
pub mod node_writes;
pub mod patch_plan;
pub mod patches;
pub mod planner;
pub mod reads;
pub mod reconcile;
pub mod registry;
pub mod rollout;
pub mod selector;
pub mod server;
pub mod stack;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod term;

pub use config::Config;
pub use error::{Error, Result};
pub use server::Coordinator;
