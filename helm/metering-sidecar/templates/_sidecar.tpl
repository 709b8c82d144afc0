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
Two ports: `metering`, the API (METERING_HOST, loopback by default), and
`ops`, the operations listener (/healthz, /readyz, /metrics, never a token;
METERING_OPS_HOST 0.0.0.0), which the probes and Prometheus use.
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
    {{- $opsPort := include "metering-sidecar.opsPort" . | int }}
    {{- if gt $opsPort 0 }}
    - name: ops
      containerPort: {{ $opsPort }}
      protocol: TCP
    {{- end }}
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
    {{- /*
    exec, not httpGet: the kubelet sends a lifecycle httpGet once, does not
    retry it and ignores its status code, so it cannot wait for a 200 from
    /readyz. Run in the sidecar container, this asks the operations listener
    on loopback until it answers 200. Through an opener without proxies:
    urlopen would send even 127.0.0.1 to HTTP_PROXY, which sellers behind an
    egress proxy set in the sidecar's environment for its AWS calls.
    */}}
    postStart:
      exec:
        command:
          - python3
          - -B
          - -c
          - |
            import os, time, urllib.request
            host = os.environ.get("METERING_OPS_HOST") or "0.0.0.0"
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
            host = "[%s]" % host if ":" in host and not host.startswith("[") else host
            url = "http://%s:%s/readyz" % (host, os.environ.get("METERING_OPS_PORT") or "8081")
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            deadline = time.monotonic() + {{ .waitTimeoutSeconds | int }}
            while True:
                try:
                    direct.open(url, timeout=2).close()
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
metering-sidecar.probe: an httpGet probe on the operations listener (port
`ops`, METERING_OPS_PORT), which the kubelet reaches at the pod IP and which
never asks for the token. Takes one of sidecar.livenessProbe /
readinessProbe / startupProbe.
*/}}
{{- define "metering-sidecar.probe" -}}
httpGet:
  path: {{ .path }}
  port: ops
  scheme: HTTP
{{- range $field := list "initialDelaySeconds" "periodSeconds" "timeoutSeconds" "successThreshold" "failureThreshold" "terminationGracePeriodSeconds" }}
{{- if hasKey $ $field }}
{{ $field }}: {{ index $ $field | int }}
{{- end }}
{{- end }}
{{- end }}

{{/*
metering-sidecar.env: the sidecar's environment. Every sidecar.config entry as
a METERING_* variable, the queue's path (on the queue volume; with the shared
store, the local spool's), the path of the
shared store's DSN file (queue.storage none: queue.postgres's Secret is
mounted), the path of the auth token's file (sidecar.authToken: its Secret is
mounted), then sidecar.extraEnv. Neither secret itself enters the environment.
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
{{- if not (hasKey $config "METERING_QUEUE_PATH") }}
{{- $env = append $env (dict "name" "METERING_QUEUE_PATH" "value" (printf "%s/queue.sqlite3" (include "metering-sidecar.queueMountPath" .))) }}
{{- end }}
{{- if include "metering-sidecar.queueDsnMounted" . }}
{{- $env = append $env (dict "name" "METERING_QUEUE_DSN_FILE" "value" (include "metering-sidecar.queueDsnFile" .)) }}
{{- if .Values.queue.postgres.iamAuth }}
{{- $env = append $env (dict "name" "METERING_QUEUE_IAM_AUTH" "value" "true") }}
{{- with .Values.queue.postgres.iamRegion }}
{{- $env = append $env (dict "name" "METERING_QUEUE_IAM_REGION" "value" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.sidecar.authToken }}
{{- if .existingSecret }}
{{- $env = append $env (dict "name" "METERING_AUTH_TOKEN_FILE" "value" (include "metering-sidecar.tokenFile" $)) }}
{{- end }}
{{- end }}
{{- concat $env (.Values.sidecar.extraEnv | default list) | toYaml }}
{{- end }}

{{/*
metering-sidecar.volumeMounts: the queue volume (with queue.storage none, the
local spool's), a small /tmp, since the root filesystem is read-only, the auth token's
Secret (sidecar.authToken) and the shared store's DSN Secret (queue.postgres,
queue.storage none), each read-only in a directory of its own, then
sidecar.extraVolumeMounts (their volumes: extraVolumes, or your pod's own).
*/}}
{{- define "metering-sidecar.volumeMounts" -}}
{{- $mounts := list }}
{{- $mounts = append $mounts (dict "name" "metering-queue" "mountPath" (include "metering-sidecar.queueMountPath" .)) }}
{{- $mounts = append $mounts (dict "name" "metering-tmp" "mountPath" "/tmp") }}
{{- if .Values.sidecar.authToken.existingSecret }}
{{- $mounts = append $mounts (dict "name" "metering-auth-token" "mountPath" (include "metering-sidecar.tokenDir" .) "readOnly" true) }}
{{- end }}
{{- if include "metering-sidecar.queueDsnMounted" . }}
{{- $mounts = append $mounts (dict "name" "metering-queue-dsn" "mountPath" (include "metering-sidecar.queueDsnDir" .) "readOnly" true) }}
{{- end }}
{{- concat $mounts (.Values.sidecar.extraVolumeMounts | default list) | toYaml }}
{{- end }}

{{/*
metering-sidecar.volumes: the volumes the sidecar mounts, as items of a pod's
volume list. With a StatefulSet's volumeClaimTemplate the queue volume comes
from the template and is not listed here. With queue.storage none the queue
volume holds the local spool (queue.spool): an emptyDir, or a claim per pod
from the StatefulSet's volumeClaimTemplate (queue.spool.storage
persistentVolumeClaim; with your own pod spec, your template named
metering-queue). The auth token's Secret holds only
its one key, as the file `token`, and the shared store's DSN Secret only its
one key, as the file `dsn`; both mode 0440 (288 in decimal): readable by the
pod's fsGroup (10001, the image's group), and mounted in the sidecar only.
*/}}
{{- define "metering-sidecar.volumes" -}}
{{- $volumes := list }}
{{- if eq .Values.queue.storage "emptyDir" }}
{{- $volumes = append $volumes (dict "name" "metering-queue" "emptyDir" (.Values.queue.emptyDir | default dict)) }}
{{- else if and (eq .Values.queue.storage "none") (ne (include "metering-sidecar.spoolStorage" .) "persistentVolumeClaim") }}
{{- $volumes = append $volumes (dict "name" "metering-queue" "emptyDir" (.Values.queue.spool.emptyDir | default dict)) }}
{{- else if and (eq .Values.queue.storage "persistentVolumeClaim") (not (include "metering-sidecar.queueFromClaimTemplate" .)) }}
{{- $volumes = append $volumes (dict "name" "metering-queue" "persistentVolumeClaim" (dict "claimName" (include "metering-sidecar.queueClaimName" .))) }}
{{- end }}
{{- $volumes = append $volumes (dict "name" "metering-tmp" "emptyDir" (dict "sizeLimit" "64Mi")) }}
{{- with .Values.sidecar.authToken }}
{{- if .existingSecret }}
{{- $items := list (dict "key" .key "path" "token") }}
{{- $volumes = append $volumes (dict "name" "metering-auth-token" "secret" (dict "secretName" .existingSecret "items" $items "defaultMode" 288)) }}
{{- end }}
{{- end }}
{{- if include "metering-sidecar.queueDsnMounted" . }}
{{- with .Values.queue.postgres }}
{{- $items := list (dict "key" .key "path" "dsn") }}
{{- $volumes = append $volumes (dict "name" "metering-queue-dsn" "secret" (dict "secretName" .existingSecret "items" $items "defaultMode" 288)) }}
{{- end }}
{{- end }}
{{- toYaml $volumes }}
{{- end }}
