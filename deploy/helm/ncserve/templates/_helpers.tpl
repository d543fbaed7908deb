{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "ncserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified release name: <release>-<chart> unless the release name already
contains the chart name. Truncated to 63 characters.
*/}}
{{- define "ncserve.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "ncserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels on every object.
*/}}
{{- define "ncserve.labels" -}}
helm.sh/chart: {{ include "ncserve.chart" . }}
{{ include "ncserve.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ncserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (stable across upgrades); a component label is added per workload.
*/}}
{{- define "ncserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ncserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Names of the objects, kept short enough for pod hostnames (63 characters). */}}
{{- define "ncserve.serverName" -}}
{{- include "ncserve.fullname" . }}
{{- end }}

{{- define "ncserve.trainerName" -}}
{{- printf "%s-trainer" (include "ncserve.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "ncserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ncserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ncserve.pvcName" -}}
{{- default (printf "%s-data" (include "ncserve.fullname" .)) .Values.server.persistence.existingClaim }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the tag defaults to appVersion.
Argument: a dict with "image" and "ctx". */}}
{{- define "ncserve.imageRef" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The service image (slim, no torch): ncserve serve and the test pod. */}}
{{- define "ncserve.image" -}}
{{- include "ncserve.imageRef" (dict "image" .Values.image "ctx" .) }}
{{- end }}

{{/* The trainer image (CUDA PyTorch, the training extra): nclaunch. */}}
{{- define "ncserve.trainerImage" -}}
{{- include "ncserve.imageRef" (dict "image" .Values.trainer.image "ctx" .) }}
{{- end }}

{{/* DNS name of the ncserve Service, the name its TLS certificate must carry. */}}
{{- define "ncserve.serverHost" -}}
{{- printf "%s.%s.svc" (include "ncserve.serverName" .) .Release.Namespace }}
{{- end }}

{{- define "ncserve.serverTarget" -}}
{{- printf "%s:%d" (include "ncserve.serverHost" .) (int .Values.server.grpcPort) }}
{{- end }}

{{/* Training run id: the rendezvous id of every node and the run's name in ncserve. */}}
{{- define "ncserve.runId" -}}
{{- default .Release.Name .Values.trainer.runId }}
{{- end }}

{{/* Mount points of the Secrets. */}}
{{- define "ncserve.tokenDir" -}}/var/run/secrets/ncserve/token{{- end }}
{{- define "ncserve.tlsDir" -}}/var/run/secrets/ncserve/tls{{- end }}

{{- define "ncserve.tokenFile" -}}
{{- printf "%s/%s" (include "ncserve.tokenDir" .) .Values.auth.token.secretKey }}
{{- end }}

{{- define "ncserve.tlsCAFile" -}}
{{- printf "%s/%s" (include "ncserve.tlsDir" .) .Values.auth.tls.caKey }}
{{- end }}

{{/* Fail early, with the value to set, when a Secret is enabled without a name. */}}
{{- define "ncserve.validate" -}}
{{- if and .Values.auth.token.enabled (not .Values.auth.token.existingSecret) }}
{{- fail "auth.token.enabled is true but auth.token.existingSecret is empty: create a Secret holding the token (key auth.token.secretKey, default \"token\") and set auth.token.existingSecret to its name" }}
{{- end }}
{{- if and .Values.auth.tls.enabled (not .Values.auth.tls.existingSecret) }}
{{- fail "auth.tls.enabled is true but auth.tls.existingSecret is empty: create a kubernetes.io/tls Secret (tls.crt, tls.key and the CA under auth.tls.caKey) and set auth.tls.existingSecret to its name" }}
{{- end }}
{{- end }}

{{/*
Secret volumes and mounts shared by the service, the trainer and the test pod.
*/}}
{{- define "ncserve.secretVolumes" -}}
{{- if .Values.auth.token.enabled }}
- name: token
  secret:
    secretName: {{ .Values.auth.token.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if .Values.auth.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.auth.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "ncserve.secretMounts" -}}
{{- if .Values.auth.token.enabled }}
- name: token
  mountPath: {{ include "ncserve.tokenDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.auth.tls.enabled }}
- name: tls
  mountPath: {{ include "ncserve.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
gRPC health check command for exec probes and the helm test pod. Kubernetes' native
grpc probes speak plaintext only, so with TLS the probe runs this script in the pod
(3 s per call, inside the probes' 5 s timeout with the interpreter's start-up).
Argument: a dict with "ctx" (the root context) and "target" (host:port).
*/}}
{{- define "ncserve.healthCommand" -}}
{{- $ctx := .ctx }}
- ncserve-healthcheck
- --target
- {{ .target | quote }}
- --timeout
- "3"
{{- if $ctx.Values.auth.tls.enabled }}
- --tls-ca
- {{ include "ncserve.tlsCAFile" $ctx | quote }}
- --server-name
- {{ include "ncserve.serverHost" $ctx | quote }}
{{- end }}
{{- end }}

{{/*
The nclaunch command of a trainer pod. Node count, rank and rendezvous come from the
PET_* environment (ncserve.trainerEnv, or the PyTorchJob operator).
*/}}
{{- define "ncserve.trainerArgs" -}}
{{- $t := .Values.trainer }}
- nclaunch
- --sidecar
- {{ include "ncserve.serverTarget" . | quote }}
{{- if .Values.auth.token.enabled }}
- --sidecar-token-file
- {{ include "ncserve.tokenFile" . | quote }}
{{- end }}
{{- if .Values.auth.tls.enabled }}
- --sidecar-tls-ca
- {{ include "ncserve.tlsCAFile" . | quote }}
{{- end }}
- --run-id
- {{ include "ncserve.runId" . | quote }}
- --run-dir
- {{ printf "%s/%s" $t.runDir.mountPath (include "ncserve.runId" .) | quote }}
- --device
- {{ include "ncserve.trainerDevice" . | quote }}
- --model
- {{ $t.training.model | quote }}
- --dataset
- {{ $t.training.dataset | quote }}
{{- if $t.data.existingClaim }}
- --data-dir
- {{ $t.data.mountPath | quote }}
{{- end }}
- --optimizer
- {{ $t.training.optimizer | quote }}
- --epochs
- {{ $t.training.epochs | quote }}
{{- range $t.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{- define "ncserve.trainerDevice" -}}
{{- if ne .Values.trainer.device "auto" }}
{{- .Values.trainer.device }}
{{- else if gt (int .Values.trainer.gpusPerNode) 0 }}
{{- "cuda" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{/* Processes per node: one per GPU unless set explicitly. */}}
{{- define "ncserve.nprocPerNode" -}}
{{- if and (eq (toString .Values.trainer.nprocPerNode) "auto") (gt (int .Values.trainer.gpusPerNode) 0) }}
{{- .Values.trainer.gpusPerNode }}
{{- else if eq (toString .Values.trainer.nprocPerNode) "auto" }}
{{- "1" }}
{{- else }}
{{- .Values.trainer.nprocPerNode }}
{{- end }}
{{- end }}

{{/* Address of trainer pod 0 (node rank 0) through the headless Service. */}}
{{- define "ncserve.rdzvHost" -}}
{{- $name := include "ncserve.trainerName" . }}
{{- printf "%s-0.%s.%s.svc" $name $name .Release.Namespace }}
{{- end }}

{{/*
PET_* environment nclaunch reads, as torchrun does. Argument: a dict with "ctx" and
"indexed" (true: an Indexed Job, where the chart sets node rank and rendezvous itself;
false: a PyTorchJob, whose operator injects node rank and master address).
*/}}
{{- define "ncserve.trainerEnv" -}}
{{- $ctx := .ctx }}
{{- $t := $ctx.Values.trainer }}
- name: PET_NNODES
  value: {{ $t.nodes | quote }}
{{- if .indexed }}
- name: PET_NODE_RANK
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
- name: PET_MASTER_ADDR
  value: {{ include "ncserve.rdzvHost" $ctx | quote }}
- name: PET_MASTER_PORT
  value: {{ $t.rdzv.port | quote }}
- name: PET_RDZV_ENDPOINT
  value: {{ printf "%s:%d" (include "ncserve.rdzvHost" $ctx) (int $t.rdzv.port) | quote }}
- name: PET_RDZV_BACKEND
  value: {{ $t.rdzv.backend | quote }}
{{- end }}
- name: PET_NPROC_PER_NODE
  value: {{ include "ncserve.nprocPerNode" $ctx | quote }}
- name: PET_RDZV_ID
  value: {{ include "ncserve.runId" $ctx | quote }}
- name: PET_MAX_RESTARTS
  value: {{ $t.maxRestarts | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- with $t.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod spec body of a trainer pod (Indexed Job or PyTorchJob replica). Argument: a dict
with "ctx", "indexed" and "containerName".
*/}}
{{- define "ncserve.trainerPodSpec" -}}
{{- $ctx := .ctx }}
{{- $t := $ctx.Values.trainer }}
{{- $runs := dict "emptyDir" dict }}
{{- if $t.runDir.existingClaim }}
{{- $runs = dict "persistentVolumeClaim" (dict "claimName" $t.runDir.existingClaim) }}
{{- end }}
{{- include "ncserve.nclaunchPodSpec" (dict
    "ctx" $ctx
    "containerName" .containerName
    "command" (include "ncserve.trainerArgs" $ctx)
    "env" (include "ncserve.trainerEnv" (dict "ctx" $ctx "indexed" .indexed))
    "rdzvPort" $t.rdzv.port
    "gpus" $t.gpusPerNode
    "resources" $t.resources
    "runsMountPath" $t.runDir.mountPath
    "runsVolume" $runs) }}
{{- end }}
