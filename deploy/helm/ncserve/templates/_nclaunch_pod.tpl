{{/*
Pod spec body of a pod running nclaunch in the trainer image: a trainer node (Indexed
Job or PyTorchJob replica) or a sweep point. Both share the trainer's image, placement,
environment, /dev/shm, datasets volume and the Secrets of the gRPC API. Argument: a dict
with
  ctx            the root context
  containerName  the container's name
  command        the container command (a rendered YAML list)
  env            the container environment (a rendered YAML list)
  rdzvPort       the rendezvous port to expose, or 0 for none
  gpus           nvidia.com/gpu requested and limited, 0 for none
  resources      the container resources, GPUs added
  runsMountPath  where the run directories are mounted
  runsVolume     the volume source of the run directories (a dict)
  extraMounts    optional: more volume mounts (a list of dicts)
  extraVolumes   optional: more volumes (a list of dicts)
*/}}
{{- define "ncserve.nclaunchPodSpec" -}}
{{- $ctx := .ctx }}
{{- $t := $ctx.Values.trainer }}
serviceAccountName: {{ include "ncserve.serviceAccountName" $ctx }}
automountServiceAccountToken: {{ $ctx.Values.serviceAccount.automountServiceAccountToken }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
containers:
  - name: {{ .containerName }}
    image: {{ include "ncserve.trainerImage" $ctx }}
    imagePullPolicy: {{ $t.image.pullPolicy }}
    command:
      {{- .command | trim | nindent 6 }}
    env:
      {{- .env | trim | nindent 6 }}
    {{- if .rdzvPort }}
    ports:
      - name: rdzv
        containerPort: {{ .rdzvPort }}
        protocol: TCP
    {{- end }}
    {{- with $ctx.Values.containerSecurityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    resources:
      {{- $resources := deepCopy .resources }}
      {{- if gt (int .gpus) 0 }}
      {{- $limits := default dict $resources.limits }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- $requests := default dict $resources.requests }}
      {{- $_ := set $requests "nvidia.com/gpu" (int .gpus) }}
      {{- $_ := set $resources "requests" $requests }}
      {{- end }}
      {{- toYaml $resources | nindent 6 }}
    volumeMounts:
      - name: dshm
        mountPath: /dev/shm
      - name: tmp
        mountPath: /tmp
      - name: runs
        mountPath: {{ .runsMountPath }}
      {{- if $t.data.existingClaim }}
      - name: data
        mountPath: {{ $t.data.mountPath }}
        readOnly: true
      {{- end }}
      {{- with .extraMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with include "ncserve.secretMounts" $ctx | trim }}
      {{- . | nindent 6 }}
      {{- end }}
volumes:
  # NCCL and DataLoader workers exchange tensors through /dev/shm; the container
  # runtime's default 64 MiB is far too small for multi-GPU training.
  - name: dshm
    emptyDir:
      medium: Memory
      {{- with $t.shmSize }}
      sizeLimit: {{ . }}
      {{- end }}
  - name: tmp
    emptyDir: {}
  - name: runs
    {{- toYaml .runsVolume | nindent 4 }}
  {{- if $t.data.existingClaim }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ $t.data.existingClaim }}
      readOnly: true
  {{- end }}
  {{- with .extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with include "ncserve.secretVolumes" $ctx | trim }}
  {{- . | nindent 2 }}
  {{- end }}
{{- end }}
