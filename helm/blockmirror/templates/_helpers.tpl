{{/* The chart name, or nameOverride. */}}
{{- define "blockmirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, or RELEASE-NAME
(just RELEASE when it already contains the chart name).
*/}}
{{- define "blockmirror.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "blockmirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels every object carries. */}}
{{- define "blockmirror.labels" -}}
helm.sh/chart: {{ include "blockmirror.chart" . }}
{{ include "blockmirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: node-daemon
app.kubernetes.io/part-of: blockmirror
{{- end }}

{{/* The labels that select the release's pods (immutable in a DaemonSet). */}}
{{- define "blockmirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blockmirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "blockmirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "blockmirror.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* REPOSITORY:TAG of the daemon image; the tag defaults to appVersion. */}}
{{- define "blockmirror.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The unix socket paths. */}}
{{- define "blockmirror.grpcSocket" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.paths.socketDir) .Values.grpc.socketName }}
{{- end }}

{{- define "blockmirror.nbdSocket" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.paths.socketDir) .Values.nbd.socketName }}
{{- end }}

{{/* HOST:PORT for blockmirrord's parsers: an IPv6 address goes in brackets. */}}
{{- define "blockmirror.hostPort" -}}
{{- if contains ":" .address }}
{{- printf "[%s]:%d" .address (int64 .port) }}
{{- else }}
{{- printf "%s:%d" .address (int64 .port) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value given, or 2 x grace + 15. Either way
it must exceed both of the daemon's shutdown waits (2 x grace).
*/}}
{{- define "blockmirror.terminationGracePeriodSeconds" -}}
{{- $grace := int64 .Values.shutdownGraceSeconds }}
{{- $tgps := add (mul 2 $grace) 15 }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $tgps = int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- if le (int64 $tgps) (mul 2 $grace) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be more than 2 x shutdownGraceSeconds (%d): at SIGTERM blockmirrord waits up to shutdownGraceSeconds for RPCs and again for jobs and volume flushes" (int64 $tgps) (mul 2 $grace)) }}
{{- end }}
{{- $tgps }}
{{- end }}

{{/* blockmirrord's flags (every one exists in `blockmirrord --help`). */}}
{{- define "blockmirror.args" -}}
- --state-dir={{ .Values.paths.stateDir }}
- --listen=unix:{{ include "blockmirror.grpcSocket" . }}
{{- if .Values.grpc.tcp.enabled }}
- --listen=tcp:{{ include "blockmirror.hostPort" .Values.grpc.tcp }}
{{- end }}
- --nbd-listen=unix:{{ include "blockmirror.nbdSocket" . }}
{{- if .Values.nbd.tcp.enabled }}
- --nbd-listen=tcp:{{ include "blockmirror.hostPort" .Values.nbd.tcp }}
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-listen={{ include "blockmirror.hostPort" .Values.metrics }}
{{- end }}
- --log={{ .Values.log }}
- --shutdown-grace-secs={{ int64 .Values.shutdownGraceSeconds }}
- --trace-write-sample-ratio={{ .Values.telemetry.traces.writeSampleRatio }}
- --trace-slow-write-ms={{ int64 .Values.telemetry.traces.slowWriteMs }}
{{- with .Values.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* One probe: the handler for probes.mode, then the timings. */}}
{{- define "blockmirror.probe" -}}
{{- $root := .root }}
{{- if eq $root.Values.probes.mode "grpc" -}}
grpc:
  port: {{ int64 $root.Values.grpc.tcp.port }}
  {{- with $root.Values.probes.grpcService }}
  service: {{ . | quote }}
  {{- end }}
{{- else -}}
exec:
  command:
    - {{ $root.Values.probes.mirrorctl }}
    - --socket
    - {{ include "blockmirror.grpcSocket" $root }}
    - volume
    - list
{{- end }}
periodSeconds: {{ int64 .probe.periodSeconds }}
timeoutSeconds: {{ int64 .probe.timeoutSeconds }}
failureThreshold: {{ int64 .probe.failureThreshold }}
{{- end }}

{{/*
OTEL_RESOURCE_ATTRIBUTES: the pod's identity from the downward API (the
K8S_* variables defined before it in env), then the extra attributes, sorted.
*/}}
{{- define "blockmirror.resourceAttributes" -}}
{{- $attrs := list "k8s.pod.name=$(K8S_POD_NAME)" "k8s.pod.uid=$(K8S_POD_UID)" "k8s.node.name=$(K8S_NODE_NAME)" "k8s.namespace.name=$(K8S_NAMESPACE_NAME)" (printf "k8s.daemonset.name=%s" (include "blockmirror.fullname" .)) }}
{{- $extra := .Values.telemetry.resourceAttributes }}
{{- range $k := keys $extra | sortAlpha }}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString (get $extra $k))) }}
{{- end }}
{{- join "," $attrs }}
{{- end }}
