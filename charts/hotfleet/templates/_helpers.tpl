{{/*
Names, labels and the checks values.schema.json cannot express.

Every helper takes a context dict {root, values}: `root` is the top-level
template context, `values` this chart's values. Inside this chart that is
(dict "root" $ "values" .Values); a game chart that includes the agent
sidecar passes its own root and its `hotfleet` values, so names computed
here agree in both places (the chart name is fixed, not read from .Chart).
*/}}

{{- define "hotfleet.name" -}}
{{- default "hotfleet" .values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hotfleet.fullname" -}}
{{- if .values.fullnameOverride -}}
{{- .values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "hotfleet.name" . -}}
{{- if contains $name .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .root.Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hotfleet.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "hotfleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hotfleet.coordinator.headless" -}}
{{- printf "%s-coordinator-headless" (include "hotfleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hotfleet.agent.fullname" -}}
{{- printf "%s-agent" (include "hotfleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hotfleet.relay.fullname" -}}
{{- printf "%s-relay" (include "hotfleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hotfleet.serviceAccountName" -}}
{{- if .values.serviceAccount.create -}}
{{- default (include "hotfleet.fullname" .) .values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "hotfleet.coordinatorSecret" -}}
{{- default (printf "%s-coordinator-tls" (include "hotfleet.fullname" .)) .values.tls.coordinatorSecret -}}
{{- end -}}

{{- define "hotfleet.agentSecret" -}}
{{- default (printf "%s-agent-tls" (include "hotfleet.fullname" .)) .values.tls.agentSecret -}}
{{- end -}}

{{- define "hotfleet.relaySecret" -}}
{{- default (printf "%s-relay-tls" (include "hotfleet.fullname" .)) .values.tls.relaySecret -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "hotfleet.labels" -}}
helm.sh/chart: {{ printf "hotfleet-%s" .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "hotfleet.selectorLabels" . }}
{{- end -}}

{{- define "hotfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hotfleet.name" . }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "hotfleet.coordinator.selectorLabels" -}}
{{ include "hotfleet.selectorLabels" . }}
app.kubernetes.io/component: coordinator
{{- end -}}

{{- define "hotfleet.relay.selectorLabels" -}}
{{ include "hotfleet.selectorLabels" . }}
app.kubernetes.io/component: relay
{{- end -}}

{{/* Pods running an agent (DaemonSet pods, and game pods with the sidecar):
what the coordinator's NetworkPolicy admits. */}}
{{- define "hotfleet.agent.selectorLabels" -}}
{{ include "hotfleet.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* An image reference. The tag defaults to this chart's appVersion; a game
chart including the sidecar has its own appVersion, so it must set the tag. */}}
{{- define "hotfleet.image" -}}
{{- $tag := .image.tag -}}
{{- if not $tag -}}
{{- if ne .root.Chart.Name "hotfleet" -}}
{{- fail (printf "set hotfleet.agent.image.tag in %s's values: the sidecar's image tag cannot default to the game chart's appVersion" .root.Chart.Name) -}}
{{- end -}}
{{- $tag = .root.Chart.AppVersion -}}
{{- end -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/*
Where agents find the coordinators: agent.coordinatorAddress if set, else
this release's relay Service with relay.enabled, else the coordinators.
*/}}
{{- define "hotfleet.coordinatorAddress" -}}
{{- if .values.agent.coordinatorAddress -}}
{{- .values.agent.coordinatorAddress -}}
{{- else if .values.relay.enabled -}}
{{- printf "%s.%s.svc:%d" (include "hotfleet.relay.fullname" .) .root.Release.Namespace (int .values.relay.port) -}}
{{- else -}}
{{- include "hotfleet.coordinators" . -}}
{{- end -}}
{{- end -}}

{{/*
This release's coordinators: the one Service on the embedded store; every
replica's stable DNS name on etcd (clients follow the leader).
*/}}
{{- define "hotfleet.coordinators" -}}
{{- $ns := .root.Release.Namespace -}}
{{- $port := int .values.coordinator.port -}}
{{- if eq .values.coordinator.store.type "etcd" -}}
{{- $sts := include "hotfleet.coordinator.fullname" . -}}
{{- $headless := include "hotfleet.coordinator.headless" . -}}
{{- $addrs := list -}}
{{- range $i := until (int .values.coordinator.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc:%d" $sts $i $headless $ns $port) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "hotfleet.coordinator.fullname" .) $ns $port -}}
{{- end -}}
{{- end -}}

{{/* The identity an agent verifies when it calls (--relay-identity), if a relay. */}}
{{- define "hotfleet.agent.relayIdentity" -}}
{{- if .values.agent.relayIdentity -}}
{{- .values.agent.relayIdentity -}}
{{- else if and .values.relay.enabled (not .values.agent.coordinatorAddress) -}}
{{- .values.relay.identity -}}
{{- end -}}
{{- end -}}

{{/*
A liveness or readiness probe on a gRPC port. The kubelet's gRPC probe has no
TLS, and a TLS server cannot answer a plaintext HTTP/2 preface, so "auto"
picks the gRPC health probe only when TLS is off and a TCP connect otherwise.
Arguments: dict port, type, probe (timings), tls (bool).
*/}}
{{- define "hotfleet.probe" -}}
{{- $type := .type -}}
{{- if eq $type "auto" -}}
{{- $type = ternary "tcp" "grpc" .tls -}}
{{- end -}}
{{- if eq $type "grpc" }}
grpc:
  port: {{ .port }}
{{- else }}
tcpSocket:
  port: {{ .port }}
{{- end }}
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* The trusted-keys volume (a Secret or a ConfigMap of *.pub files). */}}
{{- define "hotfleet.trustedKeysVolume" -}}
- name: trusted-keys
{{- if .values.trustedKeys.existingSecret }}
  secret:
    secretName: {{ .values.trustedKeys.existingSecret }}
{{- else }}
  configMap:
    name: {{ .values.trustedKeys.existingConfigMap }}
{{- end }}
{{- end -}}

{{/* The address that listens on every interface of the pod's family. */}}
{{- define "hotfleet.anyAddress" -}}
{{- ternary "[::]" "0.0.0.0" (eq .values.ipFamily "IPv6") -}}
{{- end -}}

{{/* Flags both binaries take alike. `certName` is the file stem of the
certificate and key in /etc/hotfleet/tls ("tls": a cert-manager Secret). */}}
{{- define "hotfleet.commonArgs" -}}
{{- if .values.tls.enabled }}
- --tls-ca=/etc/hotfleet/tls/ca.crt
- --tls-cert=/etc/hotfleet/tls/{{ .certName | default "tls" }}.crt
- --tls-key=/etc/hotfleet/tls/{{ .certName | default "tls" }}.key
{{- else }}
- --insecure
{{- end }}
- --trusted-key=/etc/hotfleet/trusted-keys
{{- if .values.metrics.enabled }}
- --metrics-listen={{ include "hotfleet.anyAddress" . }}:{{ .values.metrics.port }}
{{- end }}
{{- if .values.logFormat }}
- --log-format={{ .values.logFormat }}
{{- end }}
{{- end -}}

{{/*
Checks across values that the schema cannot state; each message says what
to change.
*/}}
{{- define "hotfleet.validate" -}}
{{- $v := .values -}}
{{- if and (eq $v.coordinator.store.type "embedded") (gt (int $v.coordinator.replicas) 1) -}}
{{- fail "coordinator.replicas > 1 needs coordinator.store.type=etcd: the embedded store is one file on one volume" -}}
{{- end -}}
{{- if and (eq $v.coordinator.store.type "etcd") (empty $v.coordinator.store.etcd.endpoints) -}}
{{- fail "coordinator.store.type=etcd needs coordinator.store.etcd.endpoints (e.g. [http://etcd-0.etcd:2379])" -}}
{{- end -}}
{{- if and (not $v.trustedKeys.existingSecret) (not $v.trustedKeys.existingConfigMap) -}}
{{- fail "set trustedKeys.existingSecret or trustedKeys.existingConfigMap: the Secret or ConfigMap of *.pub release keys every agent and the coordinator trust" -}}
{{- end -}}
{{- if and $v.trustedKeys.existingSecret $v.trustedKeys.existingConfigMap -}}
{{- fail "set only one of trustedKeys.existingSecret and trustedKeys.existingConfigMap" -}}
{{- end -}}
{{- if and $v.relay.enabled (not $v.coordinator.enabled) -}}
{{- fail "relay.enabled needs coordinator.enabled: the relays carry this release's agents to this release's coordinators" -}}
{{- end -}}
{{- if and $v.agent.enabled (not $v.coordinator.enabled) (not $v.agent.coordinatorAddress) -}}
{{- fail "coordinator.enabled=false: set agent.coordinatorAddress to the coordinator release's Service (NAME.NAMESPACE.svc:7700), or every replica's address on etcd" -}}
{{- end -}}
{{- if and $v.agent.enabled (eq $v.agent.tls.source "csi") (ne $v.agent.nodeId "podName") -}}
{{- fail "agent.tls.source=csi issues each pod a certificate naming the pod: set agent.nodeId=podName" -}}
{{- end -}}
{{- if and $v.agent.enabled (eq $v.agent.mode "sidecar") (ne $v.agent.nodeId "podName") -}}
{{- fail "agent.mode=sidecar runs one agent per game pod: set agent.nodeId=podName" -}}
{{- end -}}
{{- if and $v.tls.enabled $v.tls.certManager.enabled (not $v.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (a CA Issuer or ClusterIssuer)" -}}
{{- end -}}
{{- if and $v.agent.enabled (eq $v.agent.tls.source "csi") $v.tls.enabled (not $v.tls.certManager.issuerRef.name) -}}
{{- fail "agent.tls.source=csi needs tls.certManager.issuerRef.name: the issuer the csi-driver asks for each pod's certificate" -}}
{{- end -}}
{{- if and $v.agent.enabled (eq $v.agent.tls.source "perNode") (ne $v.agent.mode "daemonset") -}}
{{- fail "agent.tls.source=perNode is for the DaemonSet (a certificate per node name); sidecars use agent.tls.source=csi" -}}
{{- end -}}
{{- if and $v.tls.enabled $v.tls.certManager.enabled $v.agent.enabled (eq $v.agent.tls.source "secret") (empty $v.tls.certManager.agentDnsNames) -}}
{{- fail "tls.certManager.agentDnsNames: list every node id (node name) the agents run as (one certificate names them all), or use agent.tls.source=csi with agent.nodeId=podName" -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled (the binaries serve no metrics port otherwise)" -}}
{{- end -}}
{{- end -}}
