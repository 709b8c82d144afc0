{{/* vim: set filetype=mustache: */}}
{{/*
Expand the name of the chart.
*/}}
{{- define "metering-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, truncated at 63 characters because
some Kubernetes name fields are limited to that (by the DNS naming spec).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "metering-sidecar.fullname" -}}
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
Chart name and version, as used by the chart label.
*/}}
{{- define "metering-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "metering-sidecar.labels" -}}
helm.sh/chart: {{ include "metering-sidecar.chart" . }}
{{ include "metering-sidecar.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metering-sidecar
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "metering-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metering-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the ServiceAccount to use.
*/}}
{{- define "metering-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metering-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The sidecar's image reference: repository@digest, or repository:tag with the
chart's appVersion as the default tag.
*/}}
{{- define "metering-sidecar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Where the queue volume is mounted: the image's METERING_QUEUE_PATH folder.
*/}}
{{- define "metering-sidecar.queueMountPath" -}}
/var/lib/metering-sidecar
{{- end }}

{{/*
The port the sidecar listens on (sidecar.config.METERING_PORT, default 8080).
*/}}
{{- define "metering-sidecar.port" -}}
{{- $port := index .Values.sidecar.config "METERING_PORT" | default 8080 }}
{{- $port | int }}
{{- end }}

{{/*
The operations listener's port (sidecar.config.METERING_OPS_PORT, default
8081; 0: the listener is off). Not `default`: 0 is a value here.
*/}}
{{- define "metering-sidecar.opsPort" -}}
{{- $config := .Values.sidecar.config | default dict }}
{{- $port := index $config "METERING_OPS_PORT" }}
{{- if kindIs "invalid" $port }}8081{{ else }}{{ $port | int }}{{ end }}
{{- end }}

{{/*
"true" when a host string is a loopback address (takes the host).
*/}}
{{- define "metering-sidecar.isLoopback" -}}
{{- $host := . | toString }}
{{- if or (eq $host "localhost") (eq $host "::1") (eq $host "[::1]") (hasPrefix "127." $host) }}true{{ end }}
{{- end }}

{{/*
"true" when the API listener is on loopback only (METERING_HOST).
*/}}
{{- define "metering-sidecar.loopbackOnly" -}}
{{- include "metering-sidecar.isLoopback" (index .Values.sidecar.config "METERING_HOST" | default "127.0.0.1") }}
{{- end }}

{{/*
What of the rendered pod reaches the operations listener from outside the
sidecar container (the kubelet's httpGet probes, the metrics Service), as a
comma-separated list; empty when nothing does.
*/}}
{{- define "metering-sidecar.opsUsers" -}}
{{- $users := list }}
{{- range $probe := list "livenessProbe" "readinessProbe" "startupProbe" }}
{{- if (index $.Values.sidecar $probe).enabled }}
{{- $users = append $users (printf "sidecar.%s" $probe) }}
{{- end }}
{{- end }}
{{- if .Values.service.enabled }}
{{- $users = append $users "service.enabled" }}
{{- end }}
{{- if .Values.serviceMonitor.enabled }}
{{- $users = append $users "serviceMonitor.enabled" }}
{{- end }}
{{- join ", " $users }}
{{- end }}

{{/*
"true" when the classic layout's postStart hook waits for /readyz.
*/}}
{{- define "metering-sidecar.classicWait" -}}
{{- if and (not .Values.sidecar.native) .Values.sidecar.classic.waitForReady }}true{{ end }}
{{- end }}

{{/*
"true" when the sidecar calls RegisterUsage at start (METERING_REGISTER_USAGE).
*/}}
{{- define "metering-sidecar.registerUsage" -}}
{{- if eq (index .Values.sidecar.config "METERING_REGISTER_USAGE" | toString) "true" }}true{{ end }}
{{- end }}

{{/*
Where the auth token's Secret is mounted, and the file the sidecar reads.
*/}}
{{- define "metering-sidecar.tokenDir" -}}
/var/run/secrets/metering-sidecar
{{- end }}
{{- define "metering-sidecar.tokenFile" -}}
{{- printf "%s/token" (include "metering-sidecar.tokenDir" .) }}
{{- end }}

{{/*
Where the shared store's DSN Secret (queue.postgres) is mounted, and the file
the sidecar reads (METERING_QUEUE_DSN_FILE). A directory of its own: two
Secret volumes cannot share a mount path.
*/}}
{{- define "metering-sidecar.queueDsnDir" -}}
/var/run/secrets/metering-sidecar-queue
{{- end }}
{{- define "metering-sidecar.queueDsnFile" -}}
{{- printf "%s/dsn" (include "metering-sidecar.queueDsnDir" .) }}
{{- end }}

{{/*
"true" when the shared store's DSN is mounted (queue.storage none).
*/}}
{{- define "metering-sidecar.queueDsnMounted" -}}
{{- if and (eq .Values.queue.storage "none") .Values.queue.postgres.existingSecret }}true{{ end }}
{{- end }}

{{/*
The name of the PersistentVolumeClaim holding the queue.
*/}}
{{- define "metering-sidecar.queueClaimName" -}}
{{- default (printf "%s-queue" (include "metering-sidecar.fullname" .) | trunc 63 | trimSuffix "-") .Values.queue.persistentVolumeClaim.existingClaim }}
{{- end }}

{{/*
"true" when the workload is a StatefulSet whose queue claim comes from a
volumeClaimTemplate rather than from a claim of its own: the queue's own
(queue.storage persistentVolumeClaim), or the shared store's local spool
(queue.storage none, queue.spool.storage persistentVolumeClaim).
*/}}
{{- define "metering-sidecar.queueFromClaimTemplate" -}}
{{- $queueClaim := and (eq .Values.queue.storage "persistentVolumeClaim") (not .Values.queue.persistentVolumeClaim.existingClaim) }}
{{- $spoolClaim := and (eq .Values.queue.storage "none") (eq (include "metering-sidecar.spoolStorage" .) "persistentVolumeClaim") }}
{{- if and (eq .Values.workload.kind "StatefulSet") (or $queueClaim $spoolClaim) }}true{{ end }}
{{- end }}

{{/*
Where the shared store's local spool lives (queue.storage none):
queue.spool.storage, emptyDir unless set.
*/}}
{{- define "metering-sidecar.spoolStorage" -}}
{{- (.Values.queue.spool | default dict).storage | default "emptyDir" }}
{{- end }}

{{/*
The sidecar's queue mode (sidecar.config.METERING_QUEUE_MODE; unset: the
sidecar's own default, saas).
*/}}
{{- define "metering-sidecar.queueMode" -}}
{{- index .Values.sidecar.config "METERING_QUEUE_MODE" | default "saas" | toString }}
{{- end }}

{{/*
Checks that no schema can express, run once by the workload and by NOTES.
*/}}
{{- define "metering-sidecar.validate" -}}
{{- if and (not (include "metering-sidecar.loopbackOnly" .)) (not .Values.sidecar.authToken.existingSecret) }}
{{- fail "sidecar.config.METERING_HOST is not loopback, so other pods can reach the sidecar: set sidecar.authToken.existingSecret so that every /v1 call needs the token" }}
{{- end }}
{{- $opsPort := include "metering-sidecar.opsPort" . | int }}
{{- $opsUsers := include "metering-sidecar.opsUsers" . }}
{{- if and (eq $opsPort 0) $opsUsers }}
{{- fail (printf "sidecar.config.METERING_OPS_PORT is 0, which turns the operations listener off, but %s need it: the kubelet's httpGet probes and Prometheus reach /healthz, /readyz and /metrics on that port only (the API port may require the token and listens on loopback). Set METERING_OPS_PORT (default 8081), or turn those off" $opsUsers) }}
{{- end }}
{{- if and (eq $opsPort 0) (include "metering-sidecar.classicWait" .) }}
{{- fail "sidecar.config.METERING_OPS_PORT is 0, which turns the operations listener off, but sidecar.classic.waitForReady asks /readyz there: set METERING_OPS_PORT (default 8081), or sidecar.classic.waitForReady false" }}
{{- end }}
{{- if and $opsUsers (include "metering-sidecar.isLoopback" (index .Values.sidecar.config "METERING_OPS_HOST" | default "0.0.0.0")) }}
{{- fail (printf "sidecar.config.METERING_OPS_HOST is loopback, but %s reach the operations listener at the pod IP: leave METERING_OPS_HOST at 0.0.0.0 (it serves only /healthz, /readyz and /metrics, never the API)" $opsUsers) }}
{{- end }}
{{- if and (gt $opsPort 0) (eq $opsPort (include "metering-sidecar.port" . | int)) }}
{{- fail (printf "sidecar.config.METERING_OPS_PORT and METERING_PORT are both %d: the operations listener needs a port of its own" $opsPort) }}
{{- end }}
{{- if .Values.sidecar.authToken.existingSecret }}
{{- range $var := .Values.sidecar.extraEnv | default list }}
{{- if has $var.name (list "METERING_AUTH_TOKEN" "METERING_AUTH_TOKEN_FILE") }}
{{- fail (printf "sidecar.extraEnv sets %s while sidecar.authToken.existingSecret is set: the chart mounts the Secret as a file and sets METERING_AUTH_TOKEN_FILE itself, and the sidecar refuses two tokens. Remove it from sidecar.extraEnv" $var.name) }}
{{- end }}
{{- end }}
{{- if and .Values.workload.enabled (not (.Values.podSecurityContext | default dict).fsGroup) }}
{{- fail "sidecar.authToken.existingSecret is mounted as a file readable by the pod's fsGroup only (mode 0440): set podSecurityContext.fsGroup (the image's group, 10001)" }}
{{- end }}
{{- end }}
{{- if include "metering-sidecar.queueDsnMounted" . }}
{{- range $var := .Values.sidecar.extraEnv | default list }}
{{- if has $var.name (list "METERING_QUEUE_DSN" "METERING_QUEUE_DSN_FILE") }}
{{- fail (printf "sidecar.extraEnv sets %s while queue.postgres.existingSecret is set: the chart mounts the Secret as a file and sets METERING_QUEUE_DSN_FILE itself, and the sidecar refuses two DSNs. Remove it from sidecar.extraEnv" $var.name) }}
{{- end }}
{{- end }}
{{- if and .Values.workload.enabled (not (.Values.podSecurityContext | default dict).fsGroup) }}
{{- fail "queue.postgres.existingSecret is mounted as a file readable by the pod's fsGroup only (mode 0440): set podSecurityContext.fsGroup (the image's group, 10001)" }}
{{- end }}
{{- end }}
{{- if include "metering-sidecar.registerUsage" . }}
{{- if and .Values.sidecar.native (not .Values.sidecar.startupProbe.enabled) }}
{{- fail "sidecar.config.METERING_REGISTER_USAGE is true but sidecar.startupProbe is off: the startupProbe (/readyz, 503 until RegisterUsage has succeeded) is what keeps your app from starting unentitled. Set sidecar.startupProbe.enabled true" }}
{{- end }}
{{- if and (not .Values.sidecar.native) (not .Values.sidecar.classic.waitForReady) }}
{{- fail "sidecar.config.METERING_REGISTER_USAGE is true but sidecar.classic.waitForReady is false: the postStart hook (/readyz, 503 until RegisterUsage has succeeded) is what holds your app's start. Set sidecar.classic.waitForReady true" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.queue.storage "none") (not .Values.queue.postgres.existingSecret) }}
{{- fail "queue.storage none keeps no local queue: set queue.postgres.existingSecret to the Secret holding the shared store's DSN" }}
{{- end }}
{{- if and .Values.queue.postgres.iamAuth (not (include "metering-sidecar.queueDsnMounted" .)) }}
{{- fail "queue.postgres.iamAuth is RDS IAM authentication for the shared store: set queue.storage none and queue.postgres.existingSecret (a DSN without a password)" }}
{{- end }}
{{- if and .Values.queue.postgres.iamAuth (or (hasKey (.Values.sidecar.config | default dict) "METERING_QUEUE_IAM_AUTH") (hasKey (.Values.sidecar.config | default dict) "METERING_QUEUE_IAM_REGION")) }}
{{- fail "queue.postgres.iamAuth sets METERING_QUEUE_IAM_AUTH (and queue.postgres.iamRegion METERING_QUEUE_IAM_REGION): remove them from sidecar.config" }}
{{- end }}
{{- if and (eq (include "metering-sidecar.spoolStorage" .) "persistentVolumeClaim") (ne .Values.queue.storage "none") }}
{{- fail (printf "queue.spool.storage persistentVolumeClaim is the shared store's local spool, but queue.storage is %s: the spool is for queue.storage none only (the queue's own volume is queue.storage)" .Values.queue.storage) }}
{{- end }}
{{- if and (eq .Values.queue.storage "none") (eq (include "metering-sidecar.spoolStorage" .) "persistentVolumeClaim") .Values.workload.enabled (ne .Values.workload.kind "StatefulSet") }}
{{- fail "queue.spool.storage persistentVolumeClaim gives each pod a claim of its own from a volumeClaimTemplate: set workload.kind StatefulSet (a Deployment's pods cannot each have one)" }}
{{- end }}
{{- if and .Values.queue.postgres.existingSecret (ne .Values.queue.storage "none") }}
{{- fail (printf "queue.postgres.existingSecret is set but queue.storage is %s: the DSN would move the queue to PostgreSQL while the chart mounts a local one. Set queue.storage none (SaaS, a shared store) or leave queue.postgres.existingSecret empty" .Values.queue.storage) }}
{{- end }}
{{- $queueMode := include "metering-sidecar.queueMode" . }}
{{- if and (eq .Values.queue.storage "none") (eq $queueMode "container") }}
{{- fail "queue.storage none (a shared PostgreSQL store) does not go with METERING_QUEUE_MODE container: each pod is its own meter (MeterUsage), a shared store would merge different pods' meters, and the sidecar refuses a queue DSN in container mode. Use queue.storage emptyDir" }}
{{- end }}
{{- if and (eq .Values.queue.storage "persistentVolumeClaim") (gt (int .Values.replicas) 1) }}
{{- fail "queue.storage persistentVolumeClaim means one queue owner: replicas must be 1 (use queue.storage none with a shared PostgreSQL store to scale out)" }}
{{- end }}
{{- if and (eq $queueMode "saas") (eq .Values.queue.storage "emptyDir") }}
{{- fail "METERING_QUEUE_MODE saas with queue.storage emptyDir loses usage: the pod's open hour is deleted with its emptyDir at every rollout or eviction, and while an old and a new pod overlap both send the same grain (AWS bills only the first). Use queue.storage none (a shared PostgreSQL store, queue.postgres.existingSecret) or queue.storage persistentVolumeClaim (one owner, replicas 1, strategy Recreate)" }}
{{- end }}
{{- if and (eq $queueMode "saas") (ne .Values.queue.storage "none") (gt (int .Values.replicas) 1) }}
{{- fail (printf "METERING_QUEUE_MODE saas with replicas %v and queue.storage %s: every pod would keep its own queue and send the same grains, and AWS bills only the first record of each grain. Use queue.storage none (a shared PostgreSQL store, queue.postgres.existingSecret) to run several replicas, or replicas 1" .Values.replicas .Values.queue.storage) }}
{{- end }}
{{- with .Values.networkPolicy }}
{{- if .enabled }}
{{- if eq $opsPort 0 }}
{{- fail "networkPolicy.enabled guards the operations port, but sidecar.config.METERING_OPS_PORT is 0 (the listener is off): set METERING_OPS_PORT, or networkPolicy.enabled false" }}
{{- end }}
{{- $selector := .podSelector | default dict }}
{{- if and $.Values.workload.enabled $selector }}
{{- fail "networkPolicy.podSelector is for your own pods (workload.enabled false): the chart's workload is selected by the chart's own labels. Leave it empty" }}
{{- end }}
{{- if and (not $.Values.workload.enabled) (not (or (get $selector "matchLabels") (get $selector "matchExpressions"))) }}
{{- fail "networkPolicy.enabled with workload.enabled false: set networkPolicy.podSelector to the labels of your pods that run the sidecar (an empty selector would select every pod of the namespace)" }}
{{- end }}
{{- end }}
{{- end }}
{{- $shutdown := index .Values.sidecar.config "METERING_SHUTDOWN_TIMEOUT" | default 25 | float64 }}
{{- $pause := ternary 0 (.Values.sidecar.classic.preStopSleepSeconds | default 0) .Values.sidecar.native | float64 }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (addf $shutdown $pause) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed METERING_SHUTDOWN_TIMEOUT plus the preStop pause (%v s): the sidecar would be killed before its queue is flushed" .Values.terminationGracePeriodSeconds (addf $shutdown $pause)) }}
{{- end }}
{{- end }}

{{/*
metering-sidecar.appImage: repository[:tag][@digest] of an image dict.
*/}}
{{- define "metering-sidecar.appImage" -}}
{{- .repository -}}
{{- with .tag }}:{{ . }}{{ end -}}
{{- with .digest }}@{{ . }}{{ end -}}
{{- end }}
