{{- define "berth.name" -}}berth-operator{{- end -}}

{{- define "berth.agentName" -}}berth-node-agent{{- end -}}

{{- define "berth.labels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "berth.testLabels" -}}
app.kubernetes.io/name: berth-helm-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "berth.selector" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "berth.agentLabels" -}}
app.kubernetes.io/name: {{ include "berth.agentName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "berth.agentSelector" -}}
app.kubernetes.io/name: {{ include "berth.agentName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "berth.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The node agent's image: its own when named, else the runtime's (already on every GPU node). */}}
{{- define "berth.agentImage" -}}
{{- if .Values.nodeAgent.image.repository -}}
{{ .Values.nodeAgent.image.repository }}:{{ .Values.nodeAgent.image.tag | default .Chart.AppVersion }}
{{- else if .Values.runtimeImage -}}
{{ .Values.runtimeImage }}
{{- else -}}
ghcr.io/berth-dev/berth-runtime:{{ .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "berth.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
