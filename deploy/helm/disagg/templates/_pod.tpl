{{/*
Pieces every disagg container shares (gateway and pools): image, security, the writable folders a
read-only root filesystem needs, the model volume.
*/}}

{{/* ctx: dict "root" $ "image" POOL_IMAGE_MAP "device" DEVICE */}}
{{- define "disagg.image" -}}
{{- $img := .root.Values.image }}
{{- $repo := default $img.repository .image.repository }}
{{- $tag := default (default .root.Chart.AppVersion $img.tag) .image.tag }}
{{- if and (hasPrefix "cuda" .device) (not .image.tag) }}{{ $tag = printf "%s%s" $tag $img.cudaTagSuffix }}{{ end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "disagg.podSecurity" -}}
serviceAccountName: {{ include "disagg.serviceAccountName" . }}
automountServiceAccountToken: false  # no pod talks to the Kubernetes API
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The container securityContext; `rdma` adds IPC_LOCK (verbs pin registered memory).
     ctx: dict "root" $ "rdma" BOOL */}}
{{- define "disagg.containerSecurity" -}}
{{- $sc := deepCopy .root.Values.securityContext }}
{{- if .rdma }}
{{- $caps := deepCopy (default dict $sc.capabilities) }}
{{- $_ := set $caps "add" (append (default list $caps.add) "IPC_LOCK" | uniq) }}
{{- $_ := set $sc "capabilities" $caps }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* Environment every disagg process gets. */}}
{{- define "disagg.baseEnv" -}}
- name: HOME  # the root filesystem is read-only: caches (triton, torch) go under /tmp
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- if ne .Values.model.source "bundled" }}
- name: DISAGG_CACHE_DIR  # a .gguf on the volume is converted here at start
  value: /var/cache/disagg
{{- end }}
{{- end }}

{{/* ctx: dict "root" $ "shm" SIZE_OR_EMPTY */}}
{{- define "disagg.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .shm }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}
{{- $m := .root.Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- end }}
{{- if ne $m.source "bundled" }}
- name: model-cache
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "disagg.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .shm }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if ne .root.Values.model.source "bundled" }}
- name: model
  mountPath: /models
  readOnly: true
- name: model-cache
  mountPath: /var/cache/disagg
{{- end }}
{{- end }}

{{/* Scheduling keys shared by the gateway and the pools. ctx: a map with those keys. */}}
{{- define "disagg.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}
