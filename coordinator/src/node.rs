//! What a node reports about itself, as the coordinator keeps it: the domain
//! form of the agent's `NodeStatus`, used by the registry and the store (the
//! proto mapping lives in `grpc::convert`).
//!
//! Stored as JSON in the shape the store held before these types existed
//! (it persisted the proto message through its proto3-JSON mapping):
//! camelCase keys and 64-bit integers as strings. Coordinators of either
//! version sharing one etcd store during an upgrade read each other's node
//! records; missing fields take their defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{digests::Digests, interned::PatchStack};

/// A node's last report: identity, labels, address, processes and fencing
/// counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStatus {
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    /// Where the coordinator reaches this node's agent.
    pub advertise_addr: String,
    pub processes: Vec<ProcessStatus>,
    #[serde(with = "json_u64")]
    pub highest_epoch: u64,
    /// Patches prepared and waiting for commit/abort.
    pub prepared: Vec<PreparedPatch>,
    /// The agent's latest expired prepares (presumed abort), `expires_at_ms`
    /// being when. The driver acts on them; left out of records when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expired: Vec<PreparedPatch>,
    /// Commands admitted since the agent started.
    #[serde(with = "json_u64")]
    pub commands_admitted: u64,
    /// Commands refused for an epoch older than `highest_epoch`.
    #[serde(with = "json_u64")]
    pub commands_refused_stale: u64,
}

/// A patch a node prepared and holds until commit or abort.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PreparedPatch {
    pub rollout_id: String,
    pub patch_id: String,
    /// Unix milliseconds after which the agent presumes abort.
    #[serde(with = "json_u64")]
    pub expires_at_ms: u64,
}

/// One game-server process on a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessStatus {
    pub process_id: String,
    pub pid: u32,
    pub build: String,
    /// Committed patch ids, oldest first (shared between processes on the
    /// same stack: see [`crate::interned`]).
    pub patch_stack: PatchStack,
    /// module → sha256 of the source the process runs (shared between
    /// processes that report the same map: see [`crate::digests`]). Not
    /// stored: a live figure every heartbeat reports again, and ~3.5 KB of a
    /// record with 32 modules. Records stored with them still read.
    #[serde(skip_serializing)]
    pub live_digests: Digests,
    /// In a heartbeat only: the agent left `live_digests` out because this
    /// leader already holds them (see [`crate::registry`]). Never kept.
    #[serde(skip)]
    pub live_digests_unchanged: bool,
    /// In a heartbeat or registration only: the agent named its map by this
    /// fingerprint instead of sending it (see [`crate::registry`]). Never kept.
    #[serde(skip)]
    pub live_digests_fingerprint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<ProcessHealth>,
    pub runtime_version: String,
    pub python_version: String,
}

/// A process's health figures at its last report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessHealth {
    pub alive: bool,
    #[serde(with = "json_u64")]
    pub ticks: u64,
    #[serde(with = "json_f64")]
    pub tick_p50_ms: f64,
    #[serde(with = "json_f64")]
    pub tick_p99_ms: f64,
    #[serde(with = "json_u64")]
    pub exceptions_since: u64,
    #[serde(with = "json_u64")]
    pub mark: u64,
    pub game_ok: bool,
    pub game_detail: String,
    #[serde(with = "json_u64")]
    pub ticks_since: u64,
}

/// A JSON number or string (proto3 JSON writes 64-bit integers and
/// non-finite doubles as strings).
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString<T> {
    Number(T),
    String(String),
}

/// 64-bit integers as strings, read from a string or a number.
mod json_u64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use super::NumberOrString;

    pub fn serialize<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumberOrString::<u64>::deserialize(d)? {
            NumberOrString::Number(n) => Ok(n),
            NumberOrString::String(s) => s.parse().map_err(D::Error::custom),
        }
    }
}

/// Doubles as numbers, non-finite ones as "NaN" / "Infinity" / "-Infinity".
mod json_f64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use super::NumberOrString;

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *value {
            v if v.is_finite() => s.serialize_f64(v),
            v if v.is_nan() => s.serialize_str("NaN"),
            v if v > 0.0 => s.serialize_str("Infinity"),
            _ => s.serialize_str("-Infinity"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match NumberOrString::<f64>::deserialize(d)? {
            NumberOrString::Number(n) => Ok(n),
            NumberOrString::String(s) => match s.as_str() {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                other => other.parse().map_err(D::Error::custom),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use hotfleet_proto::v1 as pb;

    use super::*;
    use crate::store::NodeRecord;

    /// A node record exactly as the store held it before these types
    /// existed (the proto message through its proto3-JSON mapping).
    const STORED_BY_PROTO: &str = r#"{"status":{"nodeId":"n1","labels":{"zone":"a"},"advertiseAddr":"127.0.0.1:7001","processes":[{"processId":"n1-p","pid":4242,"build":"b1","patchStack":["p1","p2"],"liveDigests":{"game.mod":"ab12"},"health":{"alive":true,"ticks":"18446744073709551615","tickP50Ms":1.5,"tickP99Ms":3.25,"exceptionsSince":"2","mark":"9","gameOk":true,"gameDetail":"ok","ticksSince":"7"},"runtimeVersion":"0.3.0","pythonVersion":"3.11.9"},{"processId":"n1-q"}],"highestEpoch":"12","prepared":[{"rolloutId":"r1","patchId":"p3","expiresAtMs":"1700000000000"}],"commandsAdmitted":"30","commandsRefusedStale":"1"},"registered_at_ms":1,"last_heartbeat_ms":2}"#;

    fn expected() -> NodeStatus {
        NodeStatus {
            node_id: "n1".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            advertise_addr: "127.0.0.1:7001".into(),
            processes: vec![
                ProcessStatus {
                    process_id: "n1-p".into(),
                    pid: 4242,
                    build: "b1".into(),
                    patch_stack: vec!["p1".into(), "p2".into()].into(),
                    live_digests: [("game.mod".to_string(), "ab12".to_string())].into_iter().collect(),
                    live_digests_unchanged: false,
                    live_digests_fingerprint: String::new(),
                    health: Some(ProcessHealth {
                        alive: true,
                        ticks: u64::MAX,
                        tick_p50_ms: 1.5,
                        tick_p99_ms: 3.25,
                        exceptions_since: 2,
                        mark: 9,
                        game_ok: true,
                        game_detail: "ok".into(),
                        ticks_since: 7,
                    }),
                    runtime_version: "0.3.0".into(),
                    python_version: "3.11.9".into(),
                },
                ProcessStatus { process_id: "n1-q".into(), ..Default::default() },
            ],
            highest_epoch: 12,
            prepared: vec![PreparedPatch {
                rollout_id: "r1".into(),
                patch_id: "p3".into(),
                expires_at_ms: 1_700_000_000_000,
            }],
            expired: Vec::new(),
            commands_admitted: 30,
            commands_refused_stale: 1,
        }
    }

    #[test]
    fn reads_node_records_stored_by_earlier_versions() {
        let record: NodeRecord = serde_json::from_str(STORED_BY_PROTO).expect("old record");
        assert_eq!(record, NodeRecord { status: expected(), registered_at_ms: 1, last_heartbeat_ms: 2 });
    }

    #[test]
    fn earlier_versions_read_what_is_stored_now_all_but_the_module_digests() {
        let json = serde_json::to_value(expected()).expect("encode");
        let as_proto: pb::NodeStatus = serde_json::from_value(json).expect("proto3 JSON");
        let old: serde_json::Value = serde_json::from_str(STORED_BY_PROTO).expect("fixture");
        let mut old_proto: pb::NodeStatus = serde_json::from_value(old["status"].clone()).expect("fixture status");
        for process in &mut old_proto.processes {
            process.live_digests.clear();
        }
        assert_eq!(as_proto, old_proto);
    }

    #[test]
    fn module_digests_are_read_from_old_records_but_not_stored() {
        let record = NodeRecord { status: expected(), registered_at_ms: 1, last_heartbeat_ms: 2 };
        let json = serde_json::to_string(&record).expect("encode");
        assert!(!json.contains("liveDigests") && !json.contains("game.mod"), "{json}");
        let back: NodeRecord = serde_json::from_str(&json).expect("decode");
        assert!(back.status.processes[0].live_digests.is_empty());
        let old: NodeRecord = serde_json::from_str(STORED_BY_PROTO).expect("old record");
        assert_eq!(old.status.processes[0].live_digests.get("game.mod").map(String::as_str), Some("ab12"));
    }

    #[test]
    fn the_proto_mapping_keeps_every_field() {
        let old: serde_json::Value = serde_json::from_str(STORED_BY_PROTO).expect("fixture");
        let proto: pb::NodeStatus = serde_json::from_value(old["status"].clone()).expect("fixture status");
        assert_eq!(pb::NodeStatus::from(expected()), proto);
        assert_eq!(NodeStatus::from(proto), expected());
    }

    #[test]
    fn numbers_read_from_strings_or_numbers_and_non_finite_doubles_survive() {
        let health: ProcessHealth =
            serde_json::from_str(r#"{"ticks":5,"mark":"6","tickP50Ms":"NaN","tickP99Ms":"-Infinity"}"#)
                .expect("health");
        assert_eq!((health.ticks, health.mark), (5, 6));
        assert!(health.tick_p50_ms.is_nan());
        assert_eq!(health.tick_p99_ms, f64::NEG_INFINITY);
        let back: ProcessHealth =
            serde_json::from_value(serde_json::to_value(&health).expect("encode")).expect("decode");
        assert!(back.tick_p50_ms.is_nan());
        assert_eq!(back.tick_p99_ms, f64::NEG_INFINITY);
        assert!(serde_json::from_str::<ProcessHealth>(r#"{"ticks":"many"}"#).is_err());
    }
}
