"""Checks that the chart passes the binaries only flags they have.

Reads rendered manifests, finds the coordinator and agent containers, and
compares every `--flag` in their args, and every HOTFLEET_* environment
variable they set for the binary, with what the binary's own `--help` lists.
A renamed or misspelt flag then fails here, not in a crash-looping pod.

Usage: check_chart_flags.py --coordinator BIN --agent BIN --relay BIN [--pending=FLAG]... MANIFEST...
`--pending` names flags another change is adding right now: accepted (and
reported) while the binary lacks them. Needs PyYAML (yamllint brings it).
"""

import argparse
import re
import subprocess
import sys

import yaml

# Container name in the chart -> which binary runs in it.
CONTAINERS = {"coordinator": "coordinator", "hotfleet-agent": "agent", "hotfleet-relay": "relay"}


def help_text(binary):
    """The binary's long help (flags and their env variables)."""
    return subprocess.run([binary, "--help"], check=True, capture_output=True, text=True).stdout


def containers(manifest_paths):
    """(file, container) for every container of ours in the manifests."""
    for path in manifest_paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                spec = doc.get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("containers", []):
                    if c.get("name") in CONTAINERS:
                        yield path, c


def problems(container, helps, pending, used_pending):
    """What is wrong with one container's flags and environment."""
    kind = CONTAINERS[container["name"]]
    text = helps[kind]
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    envs = set(re.findall(r"env: (HOTFLEET_[A-Z0-9_]+)", text))
    args = container.get("args", [])
    out = []
    for arg in args:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag in flags:
            continue
        if flag in pending:
            used_pending.add(flag)
            continue
        out.append(f"{container['name']}: {flag} is not a flag of the {kind} binary")
    # Variables named in args as $(NAME) are the chart's own plumbing.
    interpolated = set(re.findall(r"\$\(([A-Z0-9_]+)\)", " ".join(args)))
    for env in container.get("env", []):
        name = env["name"]
        if name.startswith("HOTFLEET_") and name not in interpolated and name not in envs:
            out.append(f"{container['name']}: environment variable {name} is not read by the {kind} binary")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--relay", required=True)
    parser.add_argument("--pending", action="append", default=[])
    parser.add_argument("manifests", nargs="+")
    args = parser.parse_args()
    helps = {
        "coordinator": help_text(args.coordinator),
        "agent": help_text(args.agent),
        "relay": help_text(args.relay),
    }
    found, errors, used_pending = 0, [], set()
    for path, container in containers(args.manifests):
        found += 1
        errors += [f"{path}: {p}" for p in problems(container, helps, set(args.pending), used_pending)]
    if found == 0:
        errors.append("no coordinator, agent or relay container in the manifests")
    for flag in sorted(used_pending):
        print(f"note {flag}: not in this binary yet (pending change), accepted")
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{found} containers checked")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
