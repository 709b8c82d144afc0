{{/*
Named templates to include in your own pod specs. Each takes this chart's
context: `.` inside this chart, `(index .Subcharts "metering-sidecar")` from a
parent chart that depends on it (Helm 3.7+). See README.md.

  initContainers:                    # sidecar.native: true (the default)
    {{- include "metering-sidecar.container" $ctx | nindent 4 }}
  containers:                        # sidecar.native: false: list it first
    ...
  volumes:
    {{- include "metering-sidecar.volumes" $ctx | nindent 4 }}
*/}}

{{/*
metering-sidecar.container: the sidecar, as one item of a container list.
Native (sidecar.native: true): an init container with restartPolicy: Always
whose startupProbe gates the start of the app containers. Classic: a plain
container whose postStart hook holds the start of the containers after it
until /readyz answers, and whose preStop pause lets the app stop first.
*/}}
{{- define "metering-sidecar.container" -}}
- name: metering-sidecar
  image: {{ include "metering-sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  ports:
    - name: metering
      containerPort: {{ include "metering-sidecar.port" . }}
      protocol: TCP
  env:
    {{- include "metering-sidecar.env" . | nindent 4 }}
  {{- with .Values.sidecar.livenessProbe }}
  {{- if .enabled }}
  livenessProbe:
    {{- include "metering-sidecar.probe" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.sidecar.readinessProbe }}
  {{- if .enabled }}
  readinessProbe:
    {{- include "metering-sidecar.probe" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.sidecar.startupProbe }}
  {{- if .enabled }}
  startupProbe:
    {{- include "metering-sidecar.probe" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- if not .Values.sidecar.native }}
  {{- with .Values.sidecar.classic }}
  {{- if or .waitForReady .preStopSleepSeconds }}
  lifecycle:
    {{- if .waitForReady }}
    postStart:
      exec:
        command:
          - python3
          - -B
          - -c
          - |
            import os, time, urllib.request
            url = "http://127.0.0.1:%s/readyz" % (os.environ.get("METERING_PORT") or "8080")
            deadline = time.monotonic() + {{ .waitTimeoutSeconds | int }}
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise SystemExit("metering-sidecar: not ready in time: " + url)
                    time.sleep(0.5)
    {{- end }}
    {{- if .preStopSleepSeconds }}
    preStop:
      exec:
        command:
          - python3
          - -B
          - -c
          - import time; time.sleep({{ .preStopSleepSeconds | int }})
    {{- end }}
  {{- end }}
  {{- end }}
  {{- end }}
  {{- with .Values.sidecar.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "metering-sidecar.volumeMounts" . | nindent 4 }}
{{- end }}

{{/*
metering-sidecar.probe: an exec probe against 127.0.0.1 (the kubelet's
httpGet probes go to the pod IP, where a loopback-bound sidecar is not).
Takes one of sidecar.livenessProbe / readinessProbe / startupProbe.
*/}}
{{- define "metering-sidecar.probe" -}}
exec:
  command:
    - python3
    - -B
    - -c
    - import os, sys, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s%s" % (os.environ.get("METERING_PORT") or "8080", sys.argv[1]), timeout=3)
    - {{ .path | quote }}
{{- range $field := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "successThreshold" "failureThreshold" "terminationGracePeriodSeconds" }}
{{- if hasKey $ $field }}
{{ $field }}: {{ index $ $field | int }}
{{- end }}
{{- end }}
{{- end }}

{{/*
metering-sidecar.env: the sidecar's environment. Every sidecar.config entry as
a METERING_* variable, the queue's path (a queue volume) or its DSN from
queue.postgres's Secret (queue.storage none), the auth token from its Secret,
then sidecar.extraEnv.
*/}}
{{- define "metering-sidecar.env" -}}
{{- $env := list }}
{{- $config := .Values.sidecar.config | default dict }}
{{- range $name := keys $config | sortAlpha }}
{{- $value := index $config $name }}
{{- if not (kindIs "invalid" $value) }}
{{- $env = append $env (dict "name" $name "value" ($value | toString)) }}
{{- end }}
{{- end }}
{{- if and (ne .Values.queue.storage "none") (not (hasKey $config "METERING_QUEUE_PATH")) }}
{{- $env = append $env (dict "name" "METERING_QUEUE_PATH" "value" (printf "%s/queue.sqlite3" (include "metering-sidecar.queueMountPath" .))) }}
{{- end }}
{{- if eq .Values.queue.storage "none" }}
{{- with .Values.queue.postgres }}
{{- $env = append $env (dict "name" "METERING_QUEUE_DSN" "valueFrom" (dict "secretKeyRef" (dict "name" .existingSecret "key" .key))) }}
{{- end }}
{{- end }}
{{- with .Values.sidecar.authToken }}
{{- if .existingSecret }}
{{- $env = append $env (dict "name" "METERING_AUTH_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" .existingSecret "key" .key))) }}
{{- end }}
{{- end }}
{{- concat $env (.Values.sidecar.extraEnv | default list) | toYaml }}
{{- end }}

{{/*
metering-sidecar.volumeMounts: the queue volume (unless queue.storage is
none), a small /tmp, since the root filesystem is read-only, then
sidecar.extraVolumeMounts (their volumes: extraVolumes, or your pod's own).
*/}}
{{- define "metering-sidecar.volumeMounts" -}}
{{- $mounts := list }}
{{- if ne .Values.queue.storage "none" }}
{{- $mounts = append $mounts (dict "name" "metering-queue" "mountPath" (include "metering-sidecar.queueMountPath" .)) }}
{{- end }}
{{- $mounts = append $mounts (dict "name" "metering-tmp" "mountPath" "/tmp") }}
{{- concat $mounts (.Values.sidecar.extraVolumeMounts | default list) | toYaml }}
{{- end }}

{{/*
metering-sidecar.volumes: the volumes the sidecar mounts, as items of a pod's
volume list. With a StatefulSet's volumeClaimTemplate the queue volume comes
from the template and is not listed here.
*/}}
{{- define "metering-sidecar.volumes" -}}
{{- $volumes := list }}
{{- if eq .Values.queue.storage "emptyDir" }}
{{- $volumes = append $volumes (dict "name" "metering-queue" "emptyDir" (.Values.queue.emptyDir | default dict)) }}
{{- else if and (eq .Values.queue.storage "persistentVolumeClaim") (not (include "metering-sidecar.queueFromClaimTemplate" .)) }}
{{- $volumes = append $volumes (dict "name" "metering-queue" "persistentVolumeClaim" (dict "claimName" (include "metering-sidecar.queueClaimName" .))) }}
{{- end }}
{{- $volumes = append $volumes (dict "name" "metering-tmp" "emptyDir" (dict "sizeLimit" "64Mi")) }}
{{- toYaml $volumes }}
{{- end }}
