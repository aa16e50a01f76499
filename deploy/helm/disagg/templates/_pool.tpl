{{/*
One pool of prefill, decode or attention pods: its values (poolDefaults <- role defaults <- pool),
its command line (`disagg serve ROLE` with flags generated from the pod's settings class, see
services/core/pod.py) and its pod template, shared by the Deployment (prefill, decode) and the
StatefulSet (attention) that run it.
*/}}

{{/* The pool's effective values as YAML. ctx: dict "root" $ "role" ROLE "pool" POOL */}}
{{- define "disagg.pool" -}}
{{- $roleDefaults := default dict (index .root.Values .role).defaults }}
{{- $merged := deepCopy .root.Values.poolDefaults }}
{{- $_ := set $merged "transport" .root.Values.transport }}
{{- range $k, $v := $roleDefaults }}{{ $_ := set $merged $k $v }}{{ end }}
{{- range $k, $v := .pool }}{{ $_ := set $merged $k $v }}{{ end }}
{{- $settings := deepCopy (default dict $roleDefaults.settings) }}
{{- range $k, $v := (default dict .pool.settings) }}{{ $_ := set $settings $k $v }}{{ end }}
{{- $_ := set $merged "settings" $settings }}
{{- toYaml $merged }}
{{- end }}

{{/* The pools of a role, each merged, as a YAML list under `pools`; fails on duplicate names and
     on what a role cannot do. ctx: dict "root" $ "role" ROLE */}}
{{- define "disagg.pools" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $seen := dict }}
{{- $out := list }}
{{- range (index $root.Values $role).pools }}
{{- if hasKey $seen .name }}
{{- fail (printf "%s.pools: two pools are named %q; pool names must be unique within a role" $role .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- $p := include "disagg.pool" (dict "root" $root "role" $role "pool" .) | fromYaml }}
{{- if and (eq $role "attention") $p.autoscaling.enabled }}
{{- fail (printf "attention.pools[%s].autoscaling: attention pods hold the KV of running requests and cannot be scaled by an HPA; set replicas" .name) }}
{{- end }}
{{- $out = append $out $p }}
{{- end }}
{{- toYaml (dict "pools" $out) }}
{{- end }}

{{/* ctx: dict "root" $ "role" ROLE "p" POOL_VALUES */}}
{{- define "disagg.poolArgs" -}}
{{- $v := .root.Values -}}
- serve
- {{ .role }}
- --host=0.0.0.0
- --port={{ int (index $v .role).port }}
- --model={{ include "disagg.modelArg" .root }}
- --dtype={{ $v.model.dtype }}
- --device={{ .p.device }}
- --torch-threads={{ int .p.torchThreads }}
- {{ printf "--cost-usd-per-hour=%s" (include "disagg.scalar" .p.costUsdPerHour) | quote }}
- {{ printf "--shutdown-grace-s=%s" (include "disagg.scalar" .p.shutdownGraceSeconds) | quote }}
{{- if ne .role "decode" }}
- --transport={{ .p.transport }}
{{- end }}
{{- if eq .role "attention" }}
- --step-port={{ int $v.attention.stepPort }}
{{- end }}
{{- range $k, $val := .p.settings }}
{{- if not (kindIs "invalid" $val) }}{{/* null: the setting's default */}}
- {{ printf "--%s=%s" ($k | replace "_" "-") (include "disagg.scalar" $val) | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* ctx: dict "root" $ "role" ROLE "p" POOL_VALUES */}}
{{- define "disagg.poolEnv" -}}
{{- $prefix := printf "DISAGG_%s_" (upper .role) -}}
- name: {{ $prefix }}POD_ID  # the registry id: the pod's name (stable for attention StatefulSets)
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: DISAGG_POD_IP  # bound to 0.0.0.0, the pod registers this address in Redis
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{ include "disagg.redisEnv" (dict "root" .root "urlVar" (printf "%sREDIS_URL" $prefix)) }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ include "disagg.scalar" .p.metrics.port | quote }}
{{- with .p.attentionPolicy }}
{{- with .name }}
- name: DISAGG_ATTENTION_DEFAULT_POLICY
  value: {{ . | quote }}
{{- end }}
{{- if hasKey . "budget" }}
- name: DISAGG_ATTENTION_DEFAULT_BUDGET
  value: {{ include "disagg.scalar" .budget | quote }}
{{- end }}
{{- end }}
{{ include "disagg.baseEnv" .root }}
{{- with .p.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Requests and limits plus accelerators and RDMA devices (extended resources: request = limit). */}}
{{- define "disagg.poolResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- $req := default dict $res.requests }}
{{- $lim := default dict $res.limits }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $req .gpuResourceName (int .gpus) }}
{{- $_ := set $lim .gpuResourceName (int .gpus) }}
{{- end }}
{{- if .rdma.resourceName }}
{{- $_ := set $req .rdma.resourceName (int .rdma.count) }}
{{- $_ := set $lim .rdma.resourceName (int .rdma.count) }}
{{- end }}
{{- $_ := set $res "requests" $req }}
{{- $_ := set $res "limits" $lim }}
{{- toYaml $res }}
{{- end }}

{{/* ctx: dict "root" $ "role" ROLE "p" POOL_VALUES */}}
{{- define "disagg.poolPodTemplate" -}}
{{- $ctx := dict "root" .root "component" .role "pool" .p.name }}
{{- $port := int (index .root.Values .role).port -}}
metadata:
  labels:
    {{- include "disagg.labels" $ctx | nindent 4 }}
    {{- with .p.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .p.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- include "disagg.podSecurity" .root | nindent 2 }}
  # Service links would put e.g. DISAGG_GATEWAY_PORT=tcp://... into the environment, which the
  # pods' settings (env prefix DISAGG_<ROLE>_) would read as their own.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .p.terminationGracePeriodSeconds | default (add (int .p.shutdownGraceSeconds) 15) }}
  {{- with include "disagg.scheduling" .p }}{{ . | nindent 2 }}{{ end }}
  containers:
    - name: {{ .role }}
      image: {{ include "disagg.image" (dict "root" .root "image" .p.image "device" .p.device) }}
      imagePullPolicy: {{ .root.Values.image.pullPolicy }}
      command: [disagg]
      args:
        {{- include "disagg.poolArgs" . | nindent 8 }}
      env:
        {{- include "disagg.poolEnv" . | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ $port }}
        - name: metrics
          containerPort: {{ int .p.metrics.port }}
        {{- if eq .role "attention" }}
        - name: step
          containerPort: {{ int .root.Values.attention.stepPort }}
        {{- end }}
      startupProbe:
        grpc:
          port: {{ $port }}
        periodSeconds: {{ int .p.startupProbe.periodSeconds }}
        failureThreshold: {{ int .p.startupProbe.failureThreshold }}
      readinessProbe:
        grpc:
          port: {{ $port }}
        periodSeconds: 5
        failureThreshold: 2
      livenessProbe:
        grpc:
          port: {{ $port }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      resources:
        {{- include "disagg.poolResources" .p | nindent 8 }}
      securityContext:
        {{- include "disagg.containerSecurity" (dict "root" .root "rdma" .p.rdma.resourceName) | nindent 8 }}
      volumeMounts:
        {{- include "disagg.volumeMounts" (dict "root" .root "shm" .p.shmSizeLimit) | nindent 8 }}
  volumes:
    {{- include "disagg.volumes" (dict "root" .root "shm" .p.shmSizeLimit) | nindent 4 }}
{{- end }}
