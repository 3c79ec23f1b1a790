{{/* Labels shared by every object; the component label is added per object. */}}
{{- define "pysnap.labels" -}}
app.kubernetes.io/name: pysnap
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The image: pysnap has no published one, so the repository must be set. */}}
{{- define "pysnap.image" -}}
{{ required "set image.repository: pysnap publishes no image, build and push your own" .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
