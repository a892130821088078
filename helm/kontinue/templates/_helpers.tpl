{{/* The chart's name. */}}
{{- define "kontinue.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: <release>-operator (kontinue-operator for release kontinue). */}}
{{- define "kontinue.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* chart label: name-version */}}
{{- define "kontinue.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod. */}}
{{- define "kontinue.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kontinue.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kontinue.labels" -}}
helm.sh/chart: {{ include "kontinue.chart" . }}
{{ include "kontinue.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "kontinue.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kontinue.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image; the tag defaults to the chart's appVersion. */}}
{{- define "kontinue.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The trainer image passed as --image; defaults to the operator's image. */}}
{{- define "kontinue.trainerImage" -}}
{{- default (include "kontinue.image" .) .Values.trainerImage }}
{{- end }}

{{/* The ClusterKopfPeering (--peering) the operator creates at startup; defaults to the release's name. */}}
{{- define "kontinue.peeringName" -}}
{{- default .Release.Name .Values.peering.name }}
{{- end }}

{{/* Rules on the runs, their pods and events: in every namespace (ClusterRole) or in each of
`namespaces` (a Role there). README.md ("Permissions") says why each is needed. */}}
{{- define "kontinue.namespacedRules" -}}
# the runs: watched, finalizer and kopf's annotations patched, status written; never replaced or deleted
- apiGroups: [kontinue.dev]
  resources: [trainingruns, transferruns]
  verbs: [get, list, watch, patch]
- apiGroups: [kontinue.dev]
  resources: [trainingruns/status, transferruns/status]
  verbs: [get, patch]
# trainer and cleanup pods: one per attempt, deleted with the run
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]  # the trainer's status lines: progress, last checkpoint, metrics
- apiGroups: [""]
  resources: [events]
  verbs: [create]  # one Event per transition
{{- end }}

{{/* Rules that are cluster-scoped whatever the operator watches (kopf). */}}
{{- define "kontinue.clusterRules" -}}
# cluster-scoped, for kopf: which namespaces exist, which CRDs are served, the peering
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch, create]  # create: the peering object, at startup if missing
{{- end }}
