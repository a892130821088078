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
