{{/*
Names, labels and small shared pieces. Pool-specific pieces are in _pool.tpl, the container
pieces every pod shares in _pod.tpl.
*/}}

{{- define "disagg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "disagg.fullname" -}}
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

{{/* A component's object name; fails instead of truncating, so two names never collide.
     StatefulSet names stay <= 52 characters (their pods' controller-revision-hash label). */}}
{{- define "disagg.componentName" -}}
{{- $name := printf "%s-%s" (include "disagg.fullname" .root) .component }}
{{- if .pool }}{{ $name = printf "%s-%s" $name .pool }}{{ end }}
{{- if gt (len $name) 52 }}
{{- fail (printf "the object name %q is longer than 52 characters: set fullnameOverride or shorter pool names" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "disagg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "disagg.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .pool }}
disagg.io/pool: {{ .pool }}
{{- end }}
{{- end }}

{{/* ctx: dict "root" $ "component" "gateway|prefill|decode|attention|redis" ["pool" NAME] */}}
{{- define "disagg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "disagg.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: disagg
{{- end }}

{{/* Every pod of the release: what the NetworkPolicies select and admit. */}}
{{- define "disagg.releaseSelector" -}}
app.kubernetes.io/name: {{ include "disagg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "disagg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "disagg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A number or string as a flag/env value: integral numbers without an exponent (Helm reads YAML
     numbers as float64, and 1073741824 would otherwise print as 1.073741824e+09). */}}
{{- define "disagg.scalar" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}{{ int64 . }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/* ---- model ---------------------------------------------------------------------------- */}}
{{- define "disagg.modelArg" -}}
{{- if eq .Values.model.source "bundled" }}{{ .Values.model.name }}
{{- else }}{{ printf "/models/%s" (trimPrefix "/" .Values.model.path) | trimSuffix "/" }}
{{- end }}
{{- end }}

{{- define "disagg.servedModelNames" -}}
{{- if .Values.model.servedModelNames }}{{ toJson .Values.model.servedModelNames }}
{{- else if eq .Values.model.source "bundled" }}{{ list .Values.model.name | toJson }}
{{- else }}{{ list (base (include "disagg.modelArg" .) | trimSuffix ".gguf") | toJson }}
{{- end }}
{{- end }}

{{- define "disagg.checkModel" -}}
{{- $m := .Values.model }}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) }}
{{- fail "model.source is pvc: set model.pvc.claimName (a PVC holding the model) and model.path" }}
{{- end }}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) }}
{{- fail "model.source is hostPath: set model.hostPath.path (a folder on every node) and model.path" }}
{{- end }}
{{- if and (ne $m.source "bundled") (not $m.path) }}
{{- fail (printf "model.source is %s: set model.path, the model folder or .gguf file inside the volume" $m.source) }}
{{- end }}
{{- end }}

{{/* ---- Redis ---------------------------------------------------------------------------- */}}
{{- define "disagg.redisInternal" -}}
{{- if not (or .Values.redis.external.url .Values.redis.external.existingSecret) }}true{{ end }}
{{- end }}

{{- define "disagg.redisSecretName" -}}
{{- default (printf "%s-redis" (include "disagg.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* The env vars that point a process at Redis: `urlVar` gets the URL (a pod's
     DISAGG_<ROLE>_REDIS_URL, the gateway's DISAGG_CLUSTER_REDIS_URL); the password, when the
     in-cluster Redis has one, goes in DISAGG_REDIS_PASSWORD (RedisSettings), not in the URL, so
     that it is never logged. ctx: dict "root" $ "urlVar" NAME */}}
{{- define "disagg.redisEnv" -}}
{{- $v := .root.Values.redis }}
{{- if $v.external.existingSecret -}}
- name: {{ .urlVar }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.external.existingSecret }}
      key: {{ $v.external.existingSecretKey }}
{{- else if $v.external.url -}}
- name: {{ .urlVar }}
  value: {{ $v.external.url | quote }}
{{- end }}
{{- if and (not (include "disagg.redisInternal" .root)) $v.external.passwordSecret }}
- name: DISAGG_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.external.passwordSecret }}
      key: {{ $v.external.passwordSecretKey }}
{{- end }}
{{- if include "disagg.redisInternal" .root -}}
- name: {{ .urlVar }}
  value: {{ printf "redis://%s-redis.%s.svc.%s:%d/0" (include "disagg.fullname" .root) .root.Release.Namespace .root.Values.clusterDomain (int $v.port) | quote }}
{{- if $v.auth.enabled }}
- name: DISAGG_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "disagg.redisSecretName" .root }}
      key: {{ $v.auth.existingSecretKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---- API keys ------------------------------------------------------------------------- */}}
{{- define "disagg.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "disagg.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/* A random value kept across upgrades: the live Secret's, when there is one to look up. */}}
{{- define "disagg.keptSecret" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- if and $live $live.data (hasKey $live.data .key) }}{{ index $live.data .key | b64dec }}
{{- else }}{{ printf "%s%s" .prefix (randAlphaNum .length) }}
{{- end }}
{{- end }}

{{/* A settings value as an environment variable: lists and maps as JSON (pydantic-settings
     parses complex fields from JSON), numbers without an exponent, the rest as text. */}}
{{- define "disagg.envValue" -}}
{{- if or (kindIs "slice" .) (kindIs "map" .) }}{{ toJson . }}
{{- else }}{{ include "disagg.scalar" . }}
{{- end }}
{{- end }}
