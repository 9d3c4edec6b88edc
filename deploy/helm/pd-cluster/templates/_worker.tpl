{{/*
A worker Deployment (prefill or decode). Arguments: root, component, values (that role's
values), grpcPort, metricsPort, healthService (the gRPC service whose health is the pod's
readiness), env (role-specific variables, a list).
*/}}
{{- define "pd.worker" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "pd.name" $ctx }}
  labels:
    {{- include "pd.labels" $ctx | nindent 4 }}
spec:
  {{- if eq $root.Values.autoscaling.mode "none" }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pd.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "pd.labels" $ctx | nindent 8 }}
      {{- with include "pd.podAnnotations" (dict "root" $root "port" .metricsPort) }}
      {{- . | nindent 6 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "pd.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.pullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      # preStop, the node's drain, then its bounded stop (abort, flush, engine exit).
      terminationGracePeriodSeconds: {{ add $root.Values.preStopDelaySeconds $v.drainTimeoutSeconds $v.shutdownMarginSeconds }}
      securityContext:
        {{- include "pd.podSecurityContext" $root | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "pd.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ printf "pd-%s" .component | quote }}]
          env:
            {{- include "pd.commonEnv" $root | nindent 12 }}
            - name: PD_{{ upper .component }}_LISTEN
              value: "{{ $root.Values.listenHost }}:{{ .grpcPort }}"
            - name: PD_METRICS_LISTEN
              value: "{{ $root.Values.listenHost }}:{{ .metricsPort }}"
            # The pod's own address (IPv4 or IPv6), found by the node itself.
            - name: PD_ADVERTISE_ADDRESS
              value: auto
            - name: PD_NODE_ID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: PD_DRAIN_TIMEOUT_SECS
              value: {{ $v.drainTimeoutSeconds | quote }}
            - name: PD_KV_CACHE_MB
              value: {{ $v.kvCacheMB | quote }}
            - name: PD_DEVICE
              value: {{ $v.device | quote }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- range $k, $val := $v.env }}
            - name: {{ $k }}
              value: {{ $val | quote }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ .grpcPort }}
            - name: metrics
              containerPort: {{ .metricsPort }}
          startupProbe:
            grpc:
              port: {{ .grpcPort }}
            periodSeconds: {{ $root.Values.startup.periodSeconds }}
            failureThreshold: {{ $root.Values.startup.failureThreshold }}
          # Ready = can serve: the role's own gRPC health, NOT_SERVING from the start of a drain.
          readinessProbe:
            grpc:
              port: {{ .grpcPort }}
              service: {{ .healthService }}
            periodSeconds: 5
            failureThreshold: 2
          # Alive = the engine answers: Node.Stats goes through the engine's own loop, so a
          # wedged engine stops answering although its servers still accept connections.
          livenessProbe:
            exec:
              command: ["pd-probe", "live", "--role", {{ .component | quote }}, "--timeout-ms", {{ mul $root.Values.liveness.timeoutSeconds 1000 | quote }}]
            periodSeconds: {{ $root.Values.liveness.periodSeconds }}
            timeoutSeconds: {{ add $root.Values.liveness.timeoutSeconds 2 }}
            failureThreshold: {{ $root.Values.liveness.failureThreshold }}
          lifecycle:
            {{- include "pd.preStop" $root | nindent 12 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- include "pd.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- include "pd.tlsVolumeMount" $root | nindent 12 }}
            {{- if gt (int $v.shmSizeMB) 0 }}
            - name: shm
              mountPath: /dev/shm
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- include "pd.tlsVolume" $root | nindent 8 }}
        {{- if gt (int $v.shmSizeMB) 0 }}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ printf "%dMi" (int $v.shmSizeMB) }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
