{{/*
The agent container and its volumes, one definition for both modes: the
DaemonSet (agent-daemonset.yaml) and the sidecar that game charts include.
Context: dict {root, values}.

A game chart (with this chart as a dependency, usually with
coordinator.enabled=false and agent.mode=sidecar) includes, in its pod spec:

  metadata:
    labels:
      {{- include "hotfleet.agent.podLabels" (dict "root" $ "values" .Values.hotfleet) | nindent 8 }}
  spec:
    containers:
      - name: game
        env:
          {{- include "hotfleet.agent.runtimeEnv" (dict "root" $ "values" .Values.hotfleet) | nindent 10 }}
        volumeMounts:
          {{- include "hotfleet.agent.runtimeVolumeMount" (dict "root" $ "values" .Values.hotfleet) | nindent 10 }}
      {{- include "hotfleet.agent.sidecar" (dict "root" $ "values" .Values.hotfleet) | nindent 6 }}
    volumes:
      {{- include "hotfleet.agent.sidecarVolumes" (dict "root" $ "values" .Values.hotfleet) | nindent 6 }}

charts/example-game is a working example (rendered by scripts/check-chart.sh).
*/}}

{{/* The label of every pod that runs an agent, DaemonSet or game pod (the
coordinator's NetworkPolicy admits these). Not app.kubernetes.io/*: a game
pod has its own of those. */}}
{{- define "hotfleet.agent.podLabels" -}}
hotfleet.io/agent: "true"
{{- end -}}

{{/* The game container's environment: where its runtime finds the agent. */}}
{{- define "hotfleet.agent.runtimeEnv" -}}
- name: HOTFLEET_AGENT_SOCKET
  value: {{ printf "%s/agent.sock" .values.agent.socketDir | quote }}
{{- end -}}

{{/* The game container's mount of the runtime socket's directory. */}}
{{- define "hotfleet.agent.runtimeVolumeMount" -}}
- name: hotfleet-runtime
  mountPath: {{ .values.agent.socketDir }}
{{- end -}}

{{/* The sidecar: the agent container, as a list item. */}}
{{- define "hotfleet.agent.sidecar" -}}
{{ include "hotfleet.agent.container" . }}
{{- end -}}

{{/* The sidecar's volumes, as list items: the socket and state on emptyDirs
(they live exactly as long as the game pod), keys and certificates. */}}
{{- define "hotfleet.agent.sidecarVolumes" -}}
- name: hotfleet-runtime
  emptyDir: {}
- name: hotfleet-agent-data
  emptyDir: {}
{{ include "hotfleet.agent.secretVolumes" . }}
{{- end -}}

{{/* Keys and certificates (both modes). */}}
{{- define "hotfleet.agent.secretVolumes" -}}
{{- $v := .values -}}
{{- include "hotfleet.trustedKeysVolume" . }}
{{- if $v.tls.enabled }}
{{- if eq $v.agent.tls.source "csi" }}
- name: hotfleet-agent-tls
  csi:
    driver: csi.cert-manager.io
    readOnly: true
    volumeAttributes:
      csi.cert-manager.io/issuer-name: {{ $v.tls.certManager.issuerRef.name }}
      csi.cert-manager.io/issuer-kind: {{ $v.tls.certManager.issuerRef.kind }}
      csi.cert-manager.io/issuer-group: {{ $v.tls.certManager.issuerRef.group }}
      csi.cert-manager.io/common-name: "${POD_NAME}"
      csi.cert-manager.io/dns-names: "${POD_NAME}"
      csi.cert-manager.io/key-usages: "digital signature,key encipherment,server auth,client auth"
      csi.cert-manager.io/duration: {{ $v.tls.certManager.duration | quote }}
      csi.cert-manager.io/fs-group: {{ $v.agent.securityContext.runAsGroup | quote }}
{{- else }}
- name: hotfleet-agent-tls
  secret:
    secretName: {{ include "hotfleet.agentSecret" . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The agent container (both modes). */}}
{{- define "hotfleet.agent.container" -}}
{{- $v := .values -}}
{{- $a := $v.agent -}}
- name: hotfleet-agent
  image: {{ include "hotfleet.image" (dict "root" .root "image" $a.image) }}
  imagePullPolicy: {{ $a.image.pullPolicy }}
  args:
    - --listen={{ include "hotfleet.anyAddress" . }}:{{ $a.port }}
    # The coordinator calls back on the pod's own address.
    {{- if eq $v.ipFamily "IPv6" }}
    - --advertise-addr=[$(POD_IP)]:{{ $a.port }}
    {{- else }}
    - --advertise-addr=$(POD_IP):{{ $a.port }}
    {{- end }}
    - --coordinator={{ include "hotfleet.coordinatorAddress" . }}
    - --node-id=$(HOTFLEET_NODE_ID)
    - --runtime-socket={{ $a.socketDir }}/agent.sock
    - --data-dir=/var/lib/hotfleet-agent
    - --prepare-ttl={{ $a.prepareTtl }}
    - --runtime-timeout={{ $a.runtimeTimeout }}
    {{- range $a.runtimeAllowedUids }}
    - --runtime-allowed-uid={{ . }}
    {{- end }}
    {{- range $i, $label := $a.labels }}
    - --label={{ $label.name }}=$(HOTFLEET_LABEL_{{ $i }})
    {{- end }}
    {{- if $v.tls.enabled }}
    - --coordinator-identity={{ $v.tls.coordinatorIdentity }}
    {{- with include "hotfleet.agent.relayIdentity" . }}
    - --relay-identity={{ . }}
    {{- end }}
    {{- end }}
    {{- /* perNode: one Secret, a certificate per node id as <id>.crt/<id>.key. */}}
    {{- $certName := ternary "$(HOTFLEET_NODE_ID)" "tls" (eq $a.tls.source "perNode") }}
    {{- include "hotfleet.commonArgs" (dict "root" .root "values" $v "certName" $certName) | trim | nindent 4 }}
    {{- with $a.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: HOTFLEET_NODE_ID
      valueFrom:
        fieldRef:
          fieldPath: {{ ternary "spec.nodeName" "metadata.name" (eq $a.nodeId "nodeName") }}
    {{- range $i, $label := $a.labels }}
    - name: HOTFLEET_LABEL_{{ $i }}
      {{- if $label.fieldPath }}
      valueFrom:
        fieldRef:
          fieldPath: {{ $label.fieldPath }}
      {{- else }}
      value: {{ $label.value | quote }}
      {{- end }}
    {{- end }}
    {{- with $a.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: agent-grpc
      containerPort: {{ $a.port }}
      protocol: TCP
    {{- if $v.metrics.enabled }}
    - name: agent-metrics
      containerPort: {{ $v.metrics.port }}
      protocol: TCP
    {{- end }}
  livenessProbe:
    {{- include "hotfleet.probe" (dict "port" $a.port "type" $a.probes.type "probe" $a.probes.liveness "tls" $v.tls.enabled) | trim | nindent 4 }}
  {{- /* A sidecar has no readiness probe: the game pod's readiness decides
  whether players are sent to it, and an agent restarting must not take the
  game server out of its Service. Its liveness probe restarts it alone. */}}
  {{- if eq $a.mode "daemonset" }}
  readinessProbe:
    {{- include "hotfleet.probe" (dict "port" $a.port "type" $a.probes.type "probe" $a.probes.readiness "tls" $v.tls.enabled) | trim | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml $a.resources | nindent 4 }}
  securityContext:
    {{- toYaml $a.securityContext | nindent 4 }}
  volumeMounts:
    - name: hotfleet-runtime
      mountPath: {{ $a.socketDir }}
    - name: hotfleet-agent-data
      mountPath: /var/lib/hotfleet-agent
    - name: trusted-keys
      mountPath: /etc/hotfleet/trusted-keys
      readOnly: true
    {{- if $v.tls.enabled }}
    - name: hotfleet-agent-tls
      mountPath: /etc/hotfleet/tls
      readOnly: true
    {{- end }}
{{- end -}}
