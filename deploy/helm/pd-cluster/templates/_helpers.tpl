{{/* Names, labels and the pieces every pod of the chart shares. */}}

{{- define "pd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: <fullname>-<component>. */}}
{{- define "pd.name" -}}
{{- printf "%s-%s" (include "pd.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pd.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pd.labels" -}}
{{ include "pd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "pd.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "pd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The etcd client URLs every node is given. */}}
{{- define "pd.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $root := . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s:2379" (include "pd.etcdScheme" $root) (include "pd.name" (dict "root" $root "component" "etcd")) $i (include "pd.name" (dict "root" $root "component" "etcd-peers"))) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{/* https for the chart's etcd when the cluster runs TLS. */}}
{{- define "pd.etcdScheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* Where the TLS Secret's files are mounted. */}}
{{- define "pd.tlsDir" -}}/etc/pd-cluster/tls{{- end -}}

{{/* The TLS Secret as a volume and its mount, when the cluster runs TLS. */}}
{{- define "pd.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName names the Secret of ca.crt, tls.crt and tls.key" .Values.tls.secretName }}
    defaultMode: 0440
{{- end -}}
{{- end -}}

{{- define "pd.tlsVolumeMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "pd.tlsDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* Environment every pd node reads. */}}
{{- define "pd.commonEnv" -}}
- name: PD_ETCD_ENDPOINTS
  value: {{ include "pd.etcdEndpoints" . | quote }}
- name: PD_CLUSTER
  value: {{ .Values.clusterName | quote }}
- name: PD_LEASE_TTL_SECS
  value: {{ .Values.leaseTtlSeconds | quote }}
- name: PD_MODEL
  value: {{ .Values.model | quote }}
- name: PD_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- if .Values.tls.enabled }}
{{- $dir := include "pd.tlsDir" . }}
- name: PD_TLS_CA
  value: {{ printf "%s/ca.crt" $dir | quote }}
- name: PD_TLS_CERT
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: PD_TLS_KEY
  value: {{ printf "%s/tls.key" $dir | quote }}
- name: PD_TLS_SERVER_NAME
  value: {{ .Values.tls.serverName | quote }}
- name: PD_ETCD_CA
  value: {{ printf "%s/ca.crt" $dir | quote }}
- name: PD_ETCD_CERT
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: PD_ETCD_KEY
  value: {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
{{- end -}}

{{/* Pod and container hardening shared by every pod. */}}
{{- define "pd.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "pd.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Waits before SIGTERM, so that Services and the router stop sending first. */}}
{{- define "pd.preStop" -}}
preStop:
  exec:
    command: ["sleep", {{ .Values.preStopDelaySeconds | quote }}]
{{- end -}}

{{/* Pod annotations for annotation-based Prometheus scraping, when asked for. */}}
{{- define "pd.podAnnotations" -}}
{{- if .root.Values.monitoring.annotations -}}
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .port | quote }}
  prometheus.io/path: /metrics
{{- end -}}
{{- end -}}
