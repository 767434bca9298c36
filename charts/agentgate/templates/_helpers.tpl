{{/*
The chart name, or nameOverride.
*/}}
{{- define "agentgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every namespaced object and the prefix of cluster-scoped ones: fullnameOverride,
else the release name when it already contains the chart name, else release-chart.
*/}}
{{- define "agentgate.fullname" -}}
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
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "agentgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "agentgate.labels" -}}
helm.sh/chart: {{ include "agentgate.chart" . }}
{{ include "agentgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: agentgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator Pods. Never change them: a Deployment's selector is immutable.
*/}}
{{- define "agentgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "agentgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository@digest when a digest is set, else repository:tag (tag defaults to
the chart's appVersion).
*/}}
{{- define "agentgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The price table file, in the format PriceTable::with_overrides_from_yaml reads.
*/}}
{{- define "agentgate.priceTable" -}}
# Model prices in USD per million tokens. Entries add to or override the operator's built-in
# list prices of common hosted models; an empty table keeps the built-in prices as they are.
# A self-hosted model needs an entry, for example:
#
# models:
#   llama-3-70b-local:
#     inputPerMillion: 0.20
#     cachedInputPerMillion: 0.05
#     outputPerMillion: 0.20
{{- if .Values.prices.models }}
models:
{{- range $model, $price := .Values.prices.models }}
  {{ $model | quote }}:
    inputPerMillion: {{ $price.inputPerMillion }}
    cachedInputPerMillion: {{ $price.cachedInputPerMillion }}
    outputPerMillion: {{ $price.outputPerMillion }}
{{- end }}
{{- else }}
models: {}
{{- end }}
{{- end }}
