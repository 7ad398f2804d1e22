//! Sessions over a real Unix socket, with the test playing the runtime.

use super::*;
use hotfleet_proto::v1::StatusQuery;

struct NoStacks;

impl StackProvider for NoStacks {
    fn stack_for(&self, _build: String) -> futures::future::BoxFuture<'static, Result<Vec<PatchSources>, String>> {
        Box::pin(async { Err("none".into()) })
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A build's stack of three ordinary 6.3 MiB patches (1.6 MiB modules of
/// source text full of characters JSON escapes): 19 MiB, over one frame.
fn big_stack() -> Vec<(String, Vec<(String, String)>)> {
    let source: String = ['"', '\\', '\n', 'é', 'x', '\u{2}'].iter().cycle().take(1_650_000).collect();
    (0..3)
        .map(|p| (format!("p{p}"), (0..4).map(|m| (format!("zone.m{m}"), format!("# {p}{m}\n{source}"))).collect()))
        .collect()
}

struct BigStack;

impl StackProvider for BigStack {
    fn stack_for(&self, _build: String) -> futures::future::BoxFuture<'static, Result<Vec<PatchSources>, String>> {
        Box::pin(async {
            Ok(big_stack().into_iter().map(|(patch_id, modules)| PatchSources { patch_id, modules }).collect())
        })
    }
}

/// An agent's runtime socket served in a temporary directory.
struct Agent {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    sessions: Sessions,
    shutdown: CancellationToken,
}

impl Agent {
    fn start(stacks: Arc<dyn StackProvider>, idle: Duration) -> Self {
        Self::start_for(stacks, idle, PeerPolicy::new(&[]))
    }

    fn start_for(stacks: Arc<dyn StackProvider>, idle: Duration, peers: PeerPolicy) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.sock");
        let listener = crate::runtime_socket::bind(&path, peers.socket_mode()).expect("bind");
        let (sessions, shutdown) = (Sessions::default(), CancellationToken::new());
        tokio::spawn(serve(listener, sessions.clone(), "n".into(), stacks, idle, peers, shutdown.clone()));
        Self { _dir: dir, path, sessions, shutdown }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A runtime's connection after its hello was welcomed.
async fn connect(path: &std::path::Path, process_id: &str) -> UnixStream {
    let mut client = UnixStream::connect(path).await.expect("connect");
    let hello = Hello {
        protocol_version: RUNTIME_PROTOCOL_VERSION,
        process_id: process_id.into(),
        pid: 1,
        build: "b".into(),
        ..Default::default()
    };
    write_frame(
        &mut client,
        &RuntimeFrame { id: 1, reply_to: 0, traceparent: String::new(), body: Some(Body::Hello(hello)) },
    )
    .await
    .expect("hello");
    let welcome = read_frame(&mut client).await.expect("read").expect("frame");
    assert!(matches!(welcome.body, Some(Body::Welcome(_))));
    client
}

#[tokio::test]
async fn a_stack_over_one_frame_reaches_the_runtime_one_piece_per_frame() {
    let agent = Agent::start(Arc::new(BigStack), Duration::from_secs(30));
    let mut client = connect(&agent.path, "p1").await;
    let query = Body::StackQuery(hotfleet_proto::v1::StackQuery { build: "b".into() });
    write_frame(&mut client, &RuntimeFrame { id: 2, reply_to: 0, traceparent: String::new(), body: Some(query) })
        .await
        .expect("query");

    let mut sources: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut parts = 0;
    let reply = loop {
        let frame = read_frame(&mut client).await.expect("every frame within the limit").expect("no close");
        assert_eq!(frame.reply_to, 2);
        match frame.body {
            Some(Body::SourcePart(part)) => {
                parts += 1;
                sources.entry((part.patch_id, part.module)).or_default().push_str(&part.text);
            }
            Some(Body::StackReply(reply)) => break reply,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reply.parts, parts);
    assert!(parts > 12, "a 19 MiB stack is cut in pieces ({parts})");
    let ids: Vec<&str> = reply.patches.iter().map(|p| p.patch_id.as_str()).collect();
    assert_eq!(ids, ["p0", "p1", "p2"]);
    let want: BTreeMap<(String, String), String> = big_stack()
        .into_iter()
        .flat_map(|(p, modules)| modules.into_iter().map(move |(m, s)| ((p.clone(), m), s)))
        .collect();
    assert!(sources == want, "the stack arrives intact");
}

#[tokio::test]
async fn a_prepare_over_one_frame_goes_in_pieces_with_its_id() {
    use crate::runtimes::{Runtimes, Step};
    use hotfleet_proto::v1::RuntimeResult;

    let agent = Agent::start(Arc::new(NoStacks), Duration::from_secs(30));
    let mut client = connect(&agent.path, "p1").await;
    wait_for("the session", || agent.sessions.get("p1").is_some()).await;

    let (patch_id, modules) = big_stack().remove(0);
    let step = Step::Prepare { patch_id: patch_id.clone(), modules: modules.clone() };
    let runtimes = agent.sessions.clone();
    let asked = tokio::spawn(async move { runtimes.step("p1", step, Duration::from_secs(30)).await });

    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    let mut ids = Vec::new();
    let prepare = loop {
        let frame = read_frame(&mut client).await.expect("every frame within the limit").expect("no close");
        ids.push(frame.id);
        match frame.body {
            Some(Body::SourcePart(part)) => {
                assert_eq!(part.patch_id, patch_id);
                sources.entry(part.module).or_default().push_str(&part.text);
            }
            Some(Body::Prepare(prepare)) => break prepare,
            other => panic!("unexpected {other:?}"),
        }
    };
    let id = *ids.last().expect("an id");
    assert!(id != 0 && ids.iter().all(|i| *i == id), "the pieces carry their prepare's id: {ids:?}");
    assert_eq!(prepare.parts as usize, ids.len() - 1);
    assert!(prepare.modules.is_empty(), "sources travel only in pieces");
    assert!(sources == modules.into_iter().collect::<BTreeMap<_, _>>(), "the bundle arrives intact");

    let ok = RuntimeResult { ok: true, ..Default::default() };
    write_frame(
        &mut client,
        &RuntimeFrame { id: 3, reply_to: id, traceparent: String::new(), body: Some(Body::PrepareResult(ok)) },
    )
    .await
    .expect("reply");
    assert!(asked.await.expect("task").expect("answered").ok);
}

#[tokio::test]
async fn a_runtime_silent_although_asked_is_closed_and_an_idle_one_is_not() {
    let idle = Duration::from_millis(150);
    let agent = Agent::start(Arc::new(NoStacks), idle);
    let sessions = agent.sessions.clone();
    let _client = connect(&agent.path, "p1").await;
    assert!(sessions.ever_connected());

    // Quiet but never asked: a healthy idle runtime keeps its session.
    tokio::time::sleep(idle * 3).await;
    let session = sessions.get("p1").expect("still connected");
    // Asked and silent: closed after the idle timeout, nothing left pending.
    let err = session.request(Body::StatusQuery(StatusQuery {}), Duration::from_millis(20)).await;
    assert!(matches!(err, Err(SessionError::Timeout { .. })), "{err:?}");
    assert!(lock(&session.pending).is_empty(), "a timed-out request leaves no reply slot");
    wait_for("the silent session to close", || sessions.get("p1").is_none()).await;
}

#[tokio::test]
async fn a_peer_whose_uid_is_not_allowed_is_told_and_closed_without_a_session() {
    let other = crate::runtime_socket::effective_uid().wrapping_add(4242);
    let agent = Agent::start_for(Arc::new(NoStacks), Duration::from_secs(30), PeerPolicy::only(&[other]));
    let mut client = UnixStream::connect(&agent.path).await.expect("connect");
    let hello = Hello { protocol_version: RUNTIME_PROTOCOL_VERSION, process_id: "p1".into(), ..Default::default() };
    // The agent may close before the hello is written: that is a refusal too.
    let _ = write_frame(
        &mut client,
        &RuntimeFrame { id: 1, reply_to: 0, traceparent: String::new(), body: Some(Body::Hello(hello)) },
    )
    .await;
    let refusal = read_frame(&mut client).await.expect("read").expect("told why");
    let Some(Body::Error(error)) = refusal.body else { panic!("not a refusal: {refusal:?}") };
    assert_eq!(error.code, "forbidden");
    assert!(error.message.contains("--runtime-allowed-uid"), "{}", error.message);
    assert!(matches!(read_frame(&mut client).await, Ok(None) | Err(_)), "closed after the refusal");
    assert!(agent.sessions.list().is_empty() && !agent.sessions.ever_connected(), "no session");
}
