{{/* Recommended app.kubernetes.io labels of every object. */}}
{{- define "labelmatch-pipelines.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: labelmatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
