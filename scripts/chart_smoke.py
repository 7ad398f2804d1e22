"""Starts the real binaries exactly as the rendered chart would, on loopback.

Takes rendered manifests: the coordinator from one, an agent from each
`--agent` one (a DaemonSet, or a game pod with the sidecar), lays out what
the pods would mount (a development CA from `hotfleet certs dev`, a release
key, the operators and tokens files, each agent certificate in the layout its
mode mounts) in a temporary directory, and runs them with the manifests' own
args, with the mount paths, the downward-API variables and the cluster
addresses replaced by local ones. With several replicas on etcd
(`--store=etcd`) every replica runs against one local etcd, each under its
own stable name. Passes when every agent registers over mutual TLS (with the
leader, on etcd), every game container beside a sidecar (a stand-in running
the real Python runtime with the container's environment) is listed on its
node, and an operator is recognised by certificate role, and by bearer token
where the chart passes a tokens file. This checks what schema validation
cannot: that the flags, file names and identities the chart wires together
are the ones the binaries accept. How a pod is laid out locally is
chart_pods.py's.

With `--relay MANIFEST` the relay Deployment's container runs too (one
replica), under the relay certificate the coordinator names in `--relay`,
and the agents reach the coordinator through it.

Usage: chart_smoke.py --bin-dir DIR [--etcd BIN] --coordinator MANIFEST [--relay MANIFEST] --agent MANIFEST...
Needs PyYAML (yamllint brings it).
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from chart_pods import GAME_BUILD, OPERATOR, Layout, game_process, local_args, pod_spec, replicas, run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def start(cmd, log_path, env=None):
    """A process with its output in log_path (the child keeps the file open)."""
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def start_etcd(etcd, work):
    """One etcd member on loopback, as the process tests run it; its client URL."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    proc = start(
        [
            etcd,
            "--name",
            "smoke",
            "--logger=zap",
            "--log-outputs=stderr",
            "--data-dir",
            os.path.join(work, "etcd"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"smoke={peer}",
            "--initial-cluster-state",
            "new",
        ],
        os.path.join(work, "etcd.log"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if b'"health":"true"' in urllib.request.urlopen(f"{client}/health", timeout=2).read():
                return proc, client
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit("etcd did not become healthy:\n" + read(os.path.join(work, "etcd.log")))


# The CLI's JSON is read loosely (field names and nesting may change): a
# record matches by the values it holds, wherever they sit.
LIVENESS = {"alive", "suspect", "lost", "unknown"}


def scalars(obj):
    """Every scalar value inside obj, lower-cased strings."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from scalars(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from scalars(v)
    elif obj is not None:
        yield str(obj).lower()


def records(obj):
    """Every object (dict) inside obj, obj included."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from records(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from records(v)


def alive(listing, node):
    """Whether the smallest record naming `node` and a liveness says alive."""
    candidates = [set(scalars(r)) for r in records(listing)]
    candidates = sorted((c for c in candidates if node in c and c & LIVENESS), key=len)
    return bool(candidates) and "alive" in candidates[0]


def runs_build(listing, node):
    """Whether the node's record lists a process of the stand-in game's build."""
    candidates = sorted((set(scalars(r)) for r in records(listing)), key=len)
    return any(node in c and GAME_BUILD in c for c in candidates)


def cli_json(hotfleet, args, env):
    out = run([hotfleet, "--output", "json"] + args, env=env).stdout
    return json.loads(out)


class PortTaken(Exception):
    """A port picked as free was taken before the process bound it."""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--etcd", help="etcd binary, for a coordinator on --store=etcd")
    parser.add_argument("--coordinator", required=True, metavar="MANIFEST")
    parser.add_argument("--agent", required=True, action="append", metavar="MANIFEST")
    parser.add_argument("--relay", metavar="MANIFEST", help="a manifest with the relay Deployment")
    opts = parser.parse_args()
    # Ports are picked free, then bound by the binaries a moment later; on a
    # busy machine another process can take one in between: try again then.
    for _ in range(3):
        try:
            return smoke(opts)
        except PortTaken as e:
            print(f"note: {e}; trying again with other ports", file=sys.stderr)
    sys.exit("ports kept being taken before the binaries bound them")


def smoke(opts):
    def binary(name):
        return os.path.join(opts.bin_dir, name)

    nodes = [f"game-node-{i + 1}" for i in range(len(opts.agent))]
    cports = [free_port() for _ in range(replicas(opts.coordinator))]
    rport = free_port()
    # The relay's certificate is the one the coordinator trusts to speak for agents.
    relays = [a.split("=", 1)[1] for a in container_args(opts.coordinator) if a.startswith("--relay=")]
    if opts.relay and not relays:
        sys.exit("--relay given, but the coordinator trusts no relay (no --relay=NAME in its args)")
    base_env = {"POD_IP": "127.0.0.1", "POD_NAMESPACE": "hotfleet"}
    # Each replica's stable name is that replica; the Service is the first.
    cluster_addrs = [
        (
            r"[a-z0-9-]+?-(\d+)\.[a-z0-9-]+-headless\.[a-z0-9.-]+\.svc:7700",
            lambda m: f"127.0.0.1:{cports[int(m.group(1))]}",
        ),
        (r"[a-z0-9.-]+\.svc:7700", f"127.0.0.1:{cports[0]}"),
        (r"[a-z0-9.-]+-relay\.[a-z0-9.-]+\.svc:7702", f"127.0.0.1:{rport}"),
    ]
    procs, games = [], []
    with tempfile.TemporaryDirectory(prefix="hotfleet-chart-") as work:
        layout = Layout(work, binary("hotfleet"), nodes, relays)
        env_out = dict(os.environ, NO_COLOR="1")

        def logs():
            return "".join(f"--- {n}\n" + read(layout.path(f"{n}.log")) for n, _ in procs)

        try:
            container, pod = pod_spec(opts.coordinator, "coordinator")
            overrides = {}
            if "--store=etcd" in container["args"]:
                if not opts.etcd:
                    sys.exit("the coordinator runs on etcd: pass --etcd BIN")
                etcd, overrides["--etcd-endpoints"] = start_etcd(opts.etcd, work)
                procs.append(("etcd", etcd))
            for i, port in enumerate(cports):
                env = dict(base_env, POD_NAME=f"hotfleet-coordinator-{i}")
                addrs = [(r"0\.0\.0\.0:7700\b", f"127.0.0.1:{port}")] + cluster_addrs
                # Each replica its own data directory, as each pod has.
                args = local_args(container, pod, layout, env, addrs, node=f"replica-{i}", overrides=overrides)
                name = f"coordinator-{i}"
                procs.append(
                    (name, start([binary("hotfleet-coordinator")] + args, layout.path(f"{name}.log"), env_out))
                )
            if opts.relay:
                container, pod = pod_spec(opts.relay, "hotfleet-relay")
                addrs = [(r"0\.0\.0\.0:7702\b", f"127.0.0.1:{rport}")] + cluster_addrs
                args = local_args(container, pod, layout, dict(base_env), addrs)
                procs.append(("relay", start([binary("hotfleet-relay")] + args, layout.path("relay.log"), env_out)))
            for node, manifest in zip(nodes, opts.agent):
                container, pod = pod_spec(manifest, "hotfleet-agent")
                aport = free_port()
                # Both node-id sources (spec.nodeName, metadata.name) name this node.
                env = dict(base_env, HOTFLEET_NODE_ID=node)
                for e in container.get("env", []):
                    if e["name"].startswith("HOTFLEET_LABEL_"):
                        env[e["name"]] = e.get("value", "from-downward-api")
                addrs = [(r"0\.0\.0\.0:7701\b", f"127.0.0.1:{aport}"), (r"127\.0\.0\.1:7701\b", f"127.0.0.1:{aport}")]
                mounts = {}
                # The stand-in game runs as this uid, not the game image's.
                own_uid = {"--runtime-allowed-uid": str(os.getuid())}
                args = local_args(container, pod, layout, env, addrs + cluster_addrs, node, own_uid, mounts)
                procs.append((node, start([binary("hotfleet-agent")] + args, layout.path(f"{node}.log"), env_out)))
                game = game_process(container, pod, mounts)
                if game:
                    games.append(node)
                    cmd, game_env = game
                    procs.append((f"{node}-game", start(cmd, layout.path(f"{node}-game.log"), game_env)))
            client = dict(
                os.environ,
                HOTFLEET_COORDINATOR=",".join(f"http://127.0.0.1:{p}" for p in cports),
                HOTFLEET_TLS_CA=layout.path("pki/ca.crt"),
            )
            operator = dict(
                client,
                HOTFLEET_TLS_CERT=layout.path(f"pki/operators/{OPERATOR}/tls.crt"),
                HOTFLEET_TLS_KEY=layout.path(f"pki/operators/{OPERATOR}/tls.key"),
            )
            deadline, listing = time.monotonic() + 30, ""
            while time.monotonic() < deadline:
                for name, p in procs:
                    if p.poll() is not None:
                        if re.search(r"in use|os error 98", read(layout.path(f"{name}.log")), re.IGNORECASE):
                            raise PortTaken(f"{name} could not bind its port")
                        raise SystemExit(f"{name} exited {p.returncode}:\n{logs()}")
                r = subprocess.run(
                    [binary("hotfleet"), "--output", "json", "nodes", "list"],
                    env=operator,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                listing = r.stdout + r.stderr
                listed = json.loads(r.stdout) if r.returncode == 0 else None
                registered = listed is not None and all(alive(listed, node) for node in nodes)
                if registered and all(runs_build(listed, node) for node in games):
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"not every agent registered within 30 s:\n{listing}\n{logs()}")
            checked = [f"{len(nodes)} agents registered over mutual TLS" + (" through the relay" if opts.relay else "")]
            if games:
                checked.append(f"{len(games)} game process(es) reached the sidecar through the chart's socket")
            if len(cports) > 1:
                leader = cli_json(binary("hotfleet"), ["leader"], operator)
                named = [str(v) for k, v in leader.items() if "leader" in k.lower() and isinstance(v, str)]
                if not any(re.search(rf"127\.0\.0\.1:{p}\b", v) for v in named for p in cports):
                    raise SystemExit(f"no replica is named leader by its advertised address:\n{leader}")
                checked.append(f"{len(cports)} replicas on etcd agree on a leader")
            who = set(scalars(cli_json(binary("hotfleet"), ["auth", "whoami"], operator)))
            if not {OPERATOR, "operator"} <= who:
                raise SystemExit(f"{OPERATOR} has no operator role: {who}")
            checked.append("operator role by certificate")
            if any(a.startswith("--tokens=") for a in container_args(opts.coordinator)):
                who = set(
                    scalars(cli_json(binary("hotfleet"), ["auth", "whoami"], dict(client, HOTFLEET_TOKEN=layout.token)))
                )
                if not {"ci", "viewer"} <= who:
                    raise SystemExit(f"the tokens file was not honoured: {who}")
                checked.append("by token")
            manifests = ", ".join(os.path.basename(m) for m in [opts.coordinator] + opts.agent)
            print(f"ok   {'; '.join(checked)} ({manifests})")
        finally:
            for _, p in reversed(procs):
                p.terminate()
            for _, p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return 0


def container_args(manifest):
    return pod_spec(manifest, "coordinator")[0]["args"]


if __name__ == "__main__":
    sys.exit(main())
