{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "labelmatch-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the release's resources. KServe appends "-predictor-..." to the InferenceService
name for its own objects, so keep it short enough for those to stay under 63 characters.
*/}}
{{- define "labelmatch-serving.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "labelmatch-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Recommended app.kubernetes.io labels. */}}
{{- define "labelmatch-serving.labels" -}}
helm.sh/chart: {{ include "labelmatch-serving.chart" . }}
{{ include "labelmatch-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: labelmatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "labelmatch-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "labelmatch-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}


{{- define "labelmatch-serving.modelName" -}}
{{- default (include "labelmatch-serving.fullname" .) .Values.model.name -}}
{{- end -}}

{{- define "labelmatch-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "labelmatch-serving.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret KServe reads S3 credentials and endpoint annotations from. */}}
{{- define "labelmatch-serving.s3SecretName" -}}
{{- default (printf "%s-s3" (include "labelmatch-serving.fullname" .)) .Values.s3.existingSecret -}}
{{- end -}}

{{/* An image of image.registry: the repository and digest of (dict "root" $ "repository" R
"digest" D), else the tag of the serving image (image.tag, default the chart appVersion). */}}
{{- define "labelmatch-serving.imageRef" -}}
{{- $values := .root.Values -}}
{{- $repo := printf "%s/%s" $values.image.registry .repository | trimPrefix "/" -}}
{{- if .digest -}}
{{- printf "%s@%s" $repo .digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion $values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "labelmatch-serving.image" -}}
{{- include "labelmatch-serving.imageRef" (dict "root" . "repository" .Values.image.repository "digest" .Values.image.digest) -}}
{{- end -}}

{{/* Mount path of the labels/thresholds ConfigMap. */}}
{{- define "labelmatch-serving.configDir" -}}
/etc/labelmatch
{{- end -}}

{{/* Mount path of the auth Secret's tokens file (auth.mode=tokens). */}}
{{- define "labelmatch-serving.authDir" -}}
/etc/labelmatch-auth
{{- end -}}

{{/* The annotations through which KServe's storage initializer finds the S3 endpoint. */}}
{{- define "labelmatch-serving.s3Annotations" -}}
serving.kserve.io/s3-endpoint: {{ .Values.s3.endpoint | quote }}
serving.kserve.io/s3-region: {{ .Values.s3.region | quote }}
serving.kserve.io/s3-usehttps: {{ ternary "1" "0" .Values.s3.useHttps | quote }}
serving.kserve.io/s3-verifyssl: {{ ternary "1" "0" .Values.s3.verifySsl | quote }}
serving.kserve.io/s3-useanoncredential: {{ .Values.s3.useAnonymousCredential | toString | quote }}
{{- end -}}

{{/* The step image of the canary reaper: image.registry and the tag of the serving image. */}}
{{- define "labelmatch-serving.reaperImage" -}}
{{- $reaper := .Values.canaryReaper.image -}}
{{- include "labelmatch-serving.imageRef" (dict "root" . "repository" $reaper.repository "digest" $reaper.digest) -}}
{{- end -}}

{{/* Name of the canary reaper's CronJob, ServiceAccount, Role and RoleBinding. */}}
{{- define "labelmatch-serving.reaperName" -}}
{{- printf "%s-canary-reaper" (include "labelmatch-serving.fullname" .) -}}
{{- end -}}

{{/*
An object's metadata: its name, the release's namespace, the chart's labels with the object's
component, and the common annotations. Call with (dict "root" $ "name" NAME "component" COMPONENT).
*/}}
{{- define "labelmatch-serving.metadata" -}}
name: {{ .name }}
namespace: {{ .root.Release.Namespace | quote }}
labels:
  {{- include "labelmatch-serving.labels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
{{- with .root.Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
What every pod of the release takes from the values: image pull secrets, the pod security context,
the node selector and tolerations.
*/}}
{{- define "labelmatch-serving.podPlacement" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
