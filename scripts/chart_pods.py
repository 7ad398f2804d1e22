"""A rendered pod, laid out locally: what its volumes would hold, its
container's args with mount paths, downward-API variables and cluster
addresses replaced, and a stand-in for a game container beside a sidecar.
Used by chart_smoke.py. Needs PyYAML (yamllint brings it).
"""

import os
import re
import subprocess
import sys

import yaml

OPERATOR = "alice"
GAME_BUILD = "smoke-build-1"
RUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime", "python")
# A stand-in game server: the real runtime, connected the way the chart tells
# the game container (HOTFLEET_AGENT_SOCKET on the shared volume), ticking.
GAME = """
import time, hotfleet
rt = hotfleet.Runtime(packages=["smoke_game"])
rt.connect()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    with rt.tick():
        time.sleep(0.05)
"""


def replicas(path):
    """The coordinator StatefulSet's replica count."""
    with open(path, encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
            if doc and doc.get("kind") == "StatefulSet":
                return int(doc["spec"]["replicas"])
    sys.exit(f"{path}: no StatefulSet")


def pod_spec(path, container_name):
    """(container, pod spec) of the one container of that name in the manifest."""
    with open(path, encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                if c["name"] == container_name:
                    return c, spec
    sys.exit(f"{path}: no {container_name} container")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class Layout:
    """The files each volume would hold, made locally."""

    def __init__(self, work, hotfleet, nodes, relays=()):
        self.work = work
        run(
            [hotfleet, "certs", "dev", "--out", self.path("pki"), "--operator", f"{OPERATOR}:operator"]
            + [arg for node in nodes for arg in ("--node", node)]
            + [arg for relay in relays for arg in ("--relay", relay)]
        )
        self.relays = list(relays)
        run([hotfleet, "keygen", "--out", self.path("release")])
        os.makedirs(self.path("keys"))
        os.link(self.path("release/hotfleet.pub"), self.path("keys/hotfleet.pub"))
        created = run(
            [hotfleet, "auth", "token", "create", "ci", "--role", "viewer", "--tokens", self.path("tokens-file")]
        ).stdout
        self.token = created.split()[0]
        # Each agent's certificate in every layout a mode mounts: tls.crt and
        # tls.key (a Secret, or the csi-driver's files), NODE.crt and NODE.key.
        for node in nodes:
            os.makedirs(self.path(f"agent-tls-{node}"))
            for src, names in (
                ("ca.crt", ["ca.crt"]),
                ("tls.crt", ["tls.crt", f"{node}.crt"]),
                ("tls.key", ["tls.key", f"{node}.key"]),
            ):
                for name in names:
                    os.link(self.path(f"pki/nodes/{node}/{src}"), self.path(f"agent-tls-{node}/{name}"))

    def path(self, rel):
        return os.path.join(self.work, rel)

    def volume(self, volume, key_hint, node):
        """The local directory standing in for a pod volume."""
        name = volume["name"]
        if name == "hotfleet-agent-tls":
            return self.path(f"agent-tls-{node}")
        if "secret" in volume or "configMap" in volume:
            ref = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
            if name == "trusted-keys":
                return self.path("keys")
            if name == "tls":
                return self.path("pki/coordinator")
            if name == "relay-tls" and self.relays:
                return self.path(f"pki/relays/{self.relays[0]}")
            if name in ("operators", "tokens"):
                d = self.path(f"vol-{name}")
                os.makedirs(d, exist_ok=True)
                target = os.path.join(d, key_hint)
                if os.path.exists(target):
                    return d  # another replica's mount of the same volume
                if name == "operators":
                    with open(target, "w", encoding="utf-8") as f:
                        f.write(f"{OPERATOR} operator\n")
                else:
                    os.link(self.path("tokens-file"), target)
                return d
            sys.exit(f"no local stand-in for volume {name} ({ref})")
        d = self.path(f"vol-{volume['name']}-{len(os.listdir(self.work))}")
        os.makedirs(d)
        return d


def local_args(container, pod, layout, env, addrs, node=None, overrides=None, local=None):
    """The container's args with mounts, variables and addresses made local;
    `overrides` replaces the whole value of the flags it names. `local` (mount
    path -> local directory) is filled in as volumes are laid out."""
    # A name missing here is a volumeClaimTemplate (the embedded store's PVC).
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    local = {} if local is None else local
    out = []
    for arg in container["args"]:
        flag, eq, value = arg.partition("=")
        if overrides and flag in overrides:
            out.append(f"{flag}={overrides[flag]}")
            continue
        for m in mounts:
            root = m["mountPath"]
            if value == root or value.startswith(root + "/"):
                rest = value[len(root) :]
                if root not in local:
                    # The file a flag names inside a mount is the key the volume holds.
                    local[root] = layout.volume(volumes.get(m["name"], {"name": m["name"]}), rest.strip("/"), node)
                value = local[root] + rest
                break
        for name, v in env.items():
            value = value.replace(f"$({name})", v)
        for pattern, v in addrs:
            value = re.sub(pattern, v, value)
        out.append(flag + eq + value)
    return out


def game_process(agent, pod, mounts):
    """(command, environment) of a stand-in for the pod's game container, the
    one that mounts the agent's runtime volume (a sidecar's game pod); None
    when the pod has none (a DaemonSet's)."""
    runtime_mount = next((m for m in agent.get("volumeMounts", []) if m["name"] == "hotfleet-runtime"), None)
    if runtime_mount is None or runtime_mount["mountPath"] not in mounts:
        return None
    for c in pod.get("containers", []):
        if c is agent or not any(m["name"] == "hotfleet-runtime" for m in c.get("volumeMounts", [])):
            continue
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "hotfleet-runtime")
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                value = e["value"]
                if value == mount or value.startswith(mount + "/"):
                    value = mounts[runtime_mount["mountPath"]] + value[len(mount) :]
                env[e["name"]] = value
        env["HOTFLEET_BUILD"] = GAME_BUILD
        return [sys.executable, "-c", GAME], dict(os.environ, PYTHONPATH=RUNTIME, **env)
    return None
