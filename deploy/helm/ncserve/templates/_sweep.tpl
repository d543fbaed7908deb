{{/*
Helpers of the sweep (sweep-*.yaml): every point of a grid file as one pod of an
Indexed Job, each running `nclaunch sweep GRID --point INDEX` against the release's
ncserve service.
*/}}

{{/* "true" when the release runs a sweep (sweep.grid is set), else empty. */}}
{{- define "ncserve.sweepEnabled" -}}
{{- if .Values.sweep.grid }}true{{ end }}
{{- end }}

{{/* "true" when the release runs the trainer's single run: a sweep replaces it. */}}
{{- define "ncserve.trainerEnabled" -}}
{{- if and .Values.trainer.enabled (not (include "ncserve.sweepEnabled" .)) }}true{{ end }}
{{- end }}

{{- define "ncserve.sweepName" -}}
{{- printf "%s-sweep" (include "ncserve.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{/* The sweep id: its folder under sweep.runs.mountPath and every run's sweep at ncserve. */}}
{{- define "ncserve.sweepId" -}}
{{- default .Release.Name .Values.sweep.id }}
{{- end }}

{{/* Where the pods find the grid (the ConfigMap, mounted read-only). */}}
{{- define "ncserve.sweepGridDir" -}}/etc/ncserve/sweep{{- end }}
{{- define "ncserve.sweepGridFile" -}}grid.yaml{{- end }}

{{- define "ncserve.sweepRunsClaim" -}}
{{- default (printf "%s-sweep-runs" (include "ncserve.fullname" .)) .Values.sweep.runs.persistentVolumeClaim.existingClaim }}
{{- end }}

{{/* Volume source of the run directories: the claim, or an emptyDir per pod. */}}
{{- define "ncserve.sweepRunsVolume" -}}
{{- if .Values.sweep.runs.persistentVolumeClaim.enabled }}
persistentVolumeClaim:
  claimName: {{ include "ncserve.sweepRunsClaim" . }}
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}

{{/*
Fail early, with what to run, when the sweep's values do not fit together. Helm cannot
count a grid's points (groups, axes and --set pins decide it), so the user passes the
count of the points `nclaunch sweep GRID --list` prints, one line each.
*/}}
{{- define "ncserve.validateSweep" -}}
{{- $s := .Values.sweep }}
{{- if $s.grid }}
{{- if kindIs "invalid" $s.points }}
{{- fail "sweep.grid is set but sweep.points is not: pass the number of points of the grid, the lines of `nclaunch sweep GRID.yaml --list | wc -l`, as --set sweep.points=N" }}
{{- else if not (regexMatch "^[1-9][0-9]*$" (toString $s.points)) }}
{{- fail (printf "sweep.points must be a positive integer, the number of points of sweep.grid, the lines of `nclaunch sweep GRID.yaml --list | wc -l`; got %q" (toString $s.points)) }}
{{- end }}
{{- else if not (kindIs "invalid" $s.points) }}
{{- fail "sweep.points is set but sweep.grid is empty: pass the grid file with --set-file sweep.grid=GRID.yaml" }}
{{- end }}
{{- end }}

{{/*
The command of a sweep pod: the point whose index is the pod's completion index. The
grid's own settings decide the run (nodes must be 1: a point is one pod, one node).
*/}}
{{- define "ncserve.sweepArgs" -}}
{{- $s := .Values.sweep }}
- nclaunch
- sweep
- {{ printf "%s/%s" (include "ncserve.sweepGridDir" .) (include "ncserve.sweepGridFile" .) | quote }}
- --point
- $(JOB_COMPLETION_INDEX)
- --out
- {{ printf "%s/%s" $s.runs.mountPath (include "ncserve.sweepId" .) | quote }}
- --sidecar
- {{ include "ncserve.serverTarget" . | quote }}
- --sweep-id
- {{ include "ncserve.sweepId" . | quote }}
{{- if .Values.auth.token.enabled }}
- --set
- {{ printf "sidecar-token-file=%s" (include "ncserve.tokenFile" .) | quote }}
{{- end }}
{{- if .Values.auth.tls.enabled }}
- --set
- {{ printf "sidecar-tls-ca=%s" (include "ncserve.tlsCAFile" .) | quote }}
{{- end }}
{{- if .Values.trainer.data.existingClaim }}
- --set
- {{ printf "data-dir=%s" .Values.trainer.data.mountPath | quote }}
{{- end }}
{{- range $s.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Environment of a sweep pod: its completion index is the point it runs. */}}
{{- define "ncserve.sweepEnv" -}}
- name: JOB_COMPLETION_INDEX
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.trainer.env }}
{{ toYaml . }}
{{- end }}
{{- end }}
