//! Traces of a real rollout: the coordinator and two agents export over
//! OTLP/gRPC to a small collector inside this test (a tonic server of the
//! collector's `TraceService`), and the spans that arrive form one trace:
//! rollout → step → node (the coordinator's call) → grpc (the agent's
//! answer, joined through `traceparent`) → command → runtime → the
//! runtime's own measured prepare and commit pause.

#[macro_use]
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value as AnyValue,
};

/// One received span: its service, name, ids and string attributes.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)?)))
                    .collect();
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent: span.parent_span_id,
                    attributes,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn text(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_one_trace_across_the_coordinator_agents_and_runtimes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    // Every process this test starts exports here, in batches every 200 ms
    // (the standard variables; this binary holds this one test only).
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");

    let mut s = Scenario::start_small(2, vec!["--heartbeat-interval".into(), "500ms".into()]);
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1s");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "{rollout}");

    let trace_id = hotfleet_obs::traces::rollout_trace_id(&id).to_bytes().to_vec();
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Received> =
            collector.0.lock().expect("lock").iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        let done = spans.iter().any(|s| s.name == "rollout")
            && spans.iter().filter(|s| s.name == "runtime.pause").count() >= 2;
        if done {
            break spans;
        }
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        assert!(Instant::now() < deadline, "the rollout's spans did not all arrive: {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let by_id: HashMap<&[u8], &Received> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let chain = |span: &Received| -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut at = Some(span);
        while let Some(s) = at {
            out.push((s.name.clone(), s.service.clone()));
            at = by_id.get(s.parent.as_slice()).copied();
        }
        out
    };
    let rollout_span = spans.iter().find(|s| s.name == "rollout").expect("rollout span");
    assert_eq!(rollout_span.service, "hotfleet-coordinator");
    assert_eq!(rollout_span.attributes.get("rollout").map(String::as_str), Some(id.as_str()));
    let expected = |leaf: &str| -> Vec<(String, String)> {
        let c = "hotfleet-coordinator".to_string();
        let a = "hotfleet-agent".to_string();
        [(leaf, &a), ("runtime", &a), ("command", &a), ("grpc", &a), ("node", &c), ("step", &c), ("rollout", &c)]
            .iter()
            .map(|(n, s)| (n.to_string(), (*s).clone()))
            .collect()
    };
    for leaf in ["runtime.prepare", "runtime.pause"] {
        let measured: Vec<&Received> = spans.iter().filter(|s| s.name == leaf).collect();
        assert_eq!(measured.len(), 2, "one {leaf} per node's process: {measured:?}");
        for span in measured {
            assert_eq!(chain(span), expected(leaf), "{leaf} hangs off the whole tree");
        }
    }
    let commands: Vec<&Received> = spans.iter().filter(|s| s.name == "command").collect();
    for kind in ["prepare", "commit"] {
        let nodes: Vec<&str> = commands
            .iter()
            .filter(|c| c.attributes.get("kind").map(String::as_str) == Some(kind))
            .filter_map(|c| c.attributes.get("node").map(String::as_str))
            .collect();
        assert_eq!(nodes.len(), 2, "{kind} on both nodes: {commands:?}");
    }
    let steps: Vec<&str> = spans
        .iter()
        .filter(|s| s.name == "step")
        .filter_map(|s| s.attributes.get("step").map(String::as_str))
        .collect();
    for step in ["prepare", "baseline", "commit", "watch"] {
        assert!(steps.contains(&step), "a {step} step span: {steps:?}");
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}
