{{/*
Helpers of the enhanced-locking chart. Every helper is prefixed with the chart name so that
a parent chart's helpers of the same short name never shadow them.
*/}}

{{/*
enhanced-locking.name: the chart name (or nameOverride), cut to the 63 characters of a label.
*/}}
{{- define "enhanced-locking.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
enhanced-locking.fullname: the base name of every resource, `<release>-<chart>`; just the
release name when it already contains the chart name.
*/}}
{{- define "enhanced-locking.fullname" -}}
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
enhanced-locking.chart: `<chart>-<version>` for the helm.sh/chart label.
*/}}
{{- define "enhanced-locking.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
enhanced-locking.selectorLabels: the labels that select the operator pod; never change them
(a Deployment's selector is immutable).
*/}}
{{- define "enhanced-locking.selectorLabels" -}}
app.kubernetes.io/name: {{ include "enhanced-locking.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
enhanced-locking.labels: the common labels of every resource.
*/}}
{{- define "enhanced-locking.labels" -}}
helm.sh/chart: {{ include "enhanced-locking.chart" . }}
{{ include "enhanced-locking.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: enhanced-locking
{{- end }}

{{/*
enhanced-locking.serviceAccountName: the ServiceAccount the operator runs as.
*/}}
{{- define "enhanced-locking.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "enhanced-locking.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
enhanced-locking.image: `repository@digest` when a digest is given, else `repository:tag`
(the tag defaults to the chart's appVersion).
*/}}
{{- define "enhanced-locking.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
enhanced-locking.watchNamespace: the namespace whose CRs the operator reconciles, and where
its Role, the default CRs and the Redis Secret live.
*/}}
{{- define "enhanced-locking.watchNamespace" -}}
{{- default .Release.Namespace .Values.operator.watchNamespace }}
{{- end }}

{{/*
enhanced-locking.peersName: the headless Service that lists every replica, ready or not (the
replicas ask each other whether they reach the stores, docs/06-kubernetes.md); a DNS label.
*/}}
{{- define "enhanced-locking.peersName" -}}
{{- printf "%s-peers" (include "enhanced-locking.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
enhanced-locking.redisSecretName: the Secret with the Redis password, or "" when none.
*/}}
{{- define "enhanced-locking.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if .Values.redis.auth.create }}
{{- printf "%s-redis" (include "enhanced-locking.fullname" .) }}
{{- end }}
{{- end }}

{{/*
enhanced-locking.etcdSecretName: the Secret with the etcd password, or "" when none.
*/}}
{{- define "enhanced-locking.etcdSecretName" -}}
{{- if .Values.etcd.auth.existingSecret }}
{{- .Values.etcd.auth.existingSecret }}
{{- else if .Values.etcd.auth.create }}
{{- printf "%s-etcd" (include "enhanced-locking.fullname" .) }}
{{- end }}
{{- end }}

{{/*
enhanced-locking.readableSecrets: the Secrets the operator may get, by name, as a JSON list:
the Redis and etcd Secrets and rbac.extraSecretNames.
*/}}
{{- define "enhanced-locking.readableSecrets" -}}
{{- $names := list }}
{{- with include "enhanced-locking.redisSecretName" . }}
{{- $names = append $names . }}
{{- end }}
{{- with include "enhanced-locking.etcdSecretName" . }}
{{- $names = append $names . }}
{{- end }}
{{- $names = concat $names .Values.rbac.extraSecretNames | uniq }}
{{- toJson $names }}
{{- end }}

{{/*
enhanced-locking.defaultCRs: how this render carries the default LockPolicy and LockMigration:
  "release": as release resources (the kinds are served, or crds.install=false and the CRDs
             are managed elsewhere): `helm upgrade` patches them, `helm rollback` restores them;
  "hook":    in the install that brings the CRDs. Helm maps every object of the release
             manifest to a kind before it creates any, so a LockPolicy cannot be in the very
             manifest that creates its CRD; it is created by a `post-install` hook instead,
             which runs once the manifest (the CRDs included) is applied. The hook also runs on
             `post-rollback`, so a rollback to the install revision restores the install's CRs.
The hook's objects carry the release's ownership metadata, so the next upgrade takes them into
the release (see enhanced-locking.crAdoption).
*/}}
{{- define "enhanced-locking.defaultCRs" -}}
{{- $served := and (.Capabilities.APIVersions.Has "locking.runatlantis.io/v1alpha1/LockPolicy") (.Capabilities.APIVersions.Has "locking.runatlantis.io/v1alpha1/LockMigration") }}
{{- if or $served (not .Values.crds.install) }}release{{ else }}hook{{ end }}
{{- end }}

{{/*
enhanced-locking.crAdoption: "true" when this upgrade takes a default CR created by the install's
hook into the release; called with (dict "ctx" $ "plural" "lockpolicies" "name" "default").
Helm takes an existing object into a release by patching it from the new manifest to the new
manifest, an empty patch for a custom resource (helm/helm#11638): the values of that upgrade
would never reach it. So that one upgrade re-creates the CR from its new spec with a
`pre-upgrade` hook (enhanced-locking.crAdoptionHook) before adopting it; the re-created object
no longer carries the install's mark, so later upgrades patch it as usual.
*/}}
{{- define "enhanced-locking.crAdoption" -}}
{{- $ctx := .ctx }}
{{- if and $ctx.Release.IsUpgrade (eq (include "enhanced-locking.defaultCRs" $ctx) "release") }}
{{- $live := lookup "locking.runatlantis.io/v1alpha1" (index (dict "lockpolicies" "LockPolicy" "lockmigrations" "LockMigration") .plural) (include "enhanced-locking.watchNamespace" $ctx) .name }}
{{- if eq (dig "metadata" "annotations" "locking.runatlantis.io/created-by" "" $live) "install-hook" }}true{{ end }}
{{- end }}
{{- end }}

{{/*
enhanced-locking.crMetadata: metadata of a default CR; called with (dict "ctx" $ "name" N
"mode" M) where M is "release", "hook" (created by the install) or "adoption" (re-created by
the upgrade that adopts it).
*/}}
{{- define "enhanced-locking.crMetadata" -}}
{{- $ctx := .ctx -}}
name: {{ .name }}
namespace: {{ include "enhanced-locking.watchNamespace" $ctx }}
labels:
  {{- include "enhanced-locking.labels" $ctx | nindent 2 }}
annotations:
  # Kept on uninstall and on a rollback to before it existed: deleting it would switch
  # lock routing back to the static config while locks are held.
  helm.sh/resource-policy: keep
  {{- if ne .mode "release" }}
  {{- if eq .mode "hook" }}
  helm.sh/hook: post-install,post-rollback
  locking.runatlantis.io/created-by: install-hook
  {{- else }}
  helm.sh/hook: pre-upgrade
  {{- end }}
  helm.sh/hook-delete-policy: before-hook-creation
  # The release's ownership, so that the next upgrade may take the object into the release.
  meta.helm.sh/release-name: {{ $ctx.Release.Name }}
  meta.helm.sh/release-namespace: {{ $ctx.Release.Namespace }}
  {{- end }}
{{- end }}

{{/*
enhanced-locking.lockPolicy: the default LockPolicy as YAML; called with (dict "ctx" $ "mode" M).
*/}}
{{- define "enhanced-locking.lockPolicy" -}}
{{- $ctx := .ctx }}
{{- $spec := deepCopy $ctx.Values.lockPolicy.spec }}
{{- $redisSecret := include "enhanced-locking.redisSecretName" $ctx }}
{{- if and $redisSecret (eq (get $spec "backend") "redis") }}
{{- $redis := get $spec "redis" | default dict }}
{{- if not (hasKey $redis "passwordSecretRef") }}
{{- $_ := set $redis "passwordSecretRef" (dict "name" $redisSecret "key" $ctx.Values.redis.auth.key) }}
{{- end }}
{{- $_ := set $spec "redis" $redis }}
{{- end }}
{{- $etcdSecret := include "enhanced-locking.etcdSecretName" $ctx }}
{{- if and $etcdSecret (eq (get $spec "backend") "etcd") }}
{{- $etcd := get $spec "etcd" | default dict }}
{{- if not (hasKey $etcd "passwordSecretRef") }}
{{- $_ := set $etcd "passwordSecretRef" (dict "name" $etcdSecret "key" $ctx.Values.etcd.auth.key) }}
{{- /* The CRD refuses a password without its user: a user of the static settings goes with it. */}}
{{- if not (get $etcd "username") }}
{{- $user := get $ctx.Values.config "enhanced-locking-etcd-username" | default "" }}
{{- if not $user }}
{{- fail "etcd.auth needs an etcd user: set lockPolicy.spec.etcd.username or config.enhanced-locking-etcd-username" }}
{{- end }}
{{- $_ := set $etcd "username" $user }}
{{- end }}
{{- end }}
{{- $_ := set $spec "etcd" $etcd }}
{{- end }}
apiVersion: locking.runatlantis.io/v1alpha1
kind: LockPolicy
metadata:
  {{- include "enhanced-locking.crMetadata" (dict "ctx" $ctx "name" $ctx.Values.operator.policyName "mode" .mode) | nindent 2 }}
spec:
  {{- toYaml $spec | nindent 2 }}
{{- end }}

{{/*
enhanced-locking.lockMigration: the default LockMigration as YAML; called with (dict "ctx" $
"mode" M). Its policyRef is operator.policyName unless the spec names one.
*/}}
{{- define "enhanced-locking.lockMigration" -}}
{{- $ctx := .ctx }}
{{- $spec := deepCopy $ctx.Values.lockMigration.spec }}
{{- /* Helm merges the user's values into the chart's: steps written in a values file come with
the default `weight: 0`, which the CRD refuses next to them. A weight of 0 gives way to steps; any
other weight stays (and is refused with them: which one was meant cannot be told). */}}
{{- if and (get $spec "steps") (hasKey $spec "weight") (eq (toString (get $spec "weight")) "0") }}
{{- $_ := unset $spec "weight" }}
{{- end }}
{{- if not (hasKey $spec "policyRef") }}
{{- $_ := set $spec "policyRef" (dict "name" $ctx.Values.operator.policyName) }}
{{- end }}
apiVersion: locking.runatlantis.io/v1alpha1
kind: LockMigration
metadata:
  {{- include "enhanced-locking.crMetadata" (dict "ctx" $ctx "name" $ctx.Values.operator.migrationName "mode" .mode) | nindent 2 }}
spec:
  {{- toYaml $spec | nindent 2 }}
{{- end }}

{{/*
enhanced-locking.configYaml: the static config file of the service: `config` plus the data
directory the chart mounts.
*/}}
{{- define "enhanced-locking.configYaml" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "data-dir" "/data" }}
{{- toYaml $config }}
{{- end }}

{{/*
enhanced-locking.metricsOn: "true" when the service exports /metrics (config key
enhanced-locking-metrics, true by default).
*/}}
{{- define "enhanced-locking.metricsOn" -}}
{{- if not (hasKey .Values.config "enhanced-locking-metrics") }}true
{{- else if (get .Values.config "enhanced-locking-metrics") }}true
{{- end }}
{{- end }}

{{/*
enhanced-locking.pdbOn: "true" when the chart renders a PodDisruptionBudget: enabled, or
several replicas (a drain must evict them one at a time).
*/}}
{{- define "enhanced-locking.pdbOn" -}}
{{- if or .Values.podDisruptionBudget.enabled (gt (int .Values.replicaCount) 1) }}true
{{- end }}
{{- end }}

{{/*
enhanced-locking.validate: refuses value combinations that cannot work, with a message that
says why and what to set instead. Included by the Deployment, which every render has.
*/}}
{{- define "enhanced-locking.validate" -}}
{{- $ns := include "enhanced-locking.watchNamespace" . }}
{{- $static := index .Values.config "enhanced-locking-backend" | default "" }}
{{- range $backend, $secret := dict "redis" (include "enhanced-locking.redisSecretName" .) "etcd" (include "enhanced-locking.etcdSecretName" .) }}
{{- if and $secret (eq $static $backend) (ne $ns $.Release.Namespace) }}
{{- fail (printf "config.enhanced-locking-backend=%s with operator.watchNamespace=%s: the pod cannot read the %s password Secret %q there (a pod reads Secrets of its own namespace, %s), so the static layer would connect without it; choose the backend in lockPolicy.spec.backend (the operator reads the Secret for it) or install the release in %s" $backend $ns (ternary "Redis" "etcd" (eq $backend "redis")) $secret $.Release.Namespace $ns) }}
{{- end }}
{{- end }}
{{- if and .Values.redis.auth.create .Values.redis.auth.existingSecret }}
{{- fail "redis.auth: set either create (with password) or existingSecret, not both" }}
{{- end }}
{{- if and .Values.redis.auth.create (not .Values.redis.auth.password) }}
{{- fail "redis.auth.create needs redis.auth.password (or use redis.auth.existingSecret)" }}
{{- end }}
{{- if and .Values.redis.auth.password (not .Values.redis.auth.create) }}
{{- fail "redis.auth.password is only used with redis.auth.create=true" }}
{{- end }}
{{- if and .Values.etcd.auth.create .Values.etcd.auth.existingSecret }}
{{- fail "etcd.auth: set either create (with password) or existingSecret, not both" }}
{{- end }}
{{- if and .Values.etcd.auth.create (not .Values.etcd.auth.password) }}
{{- fail "etcd.auth.create needs etcd.auth.password (or use etcd.auth.existingSecret)" }}
{{- end }}
{{- if and .Values.etcd.auth.password (not .Values.etcd.auth.create) }}
{{- fail "etcd.auth.password is only used with etcd.auth.create=true" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if include "enhanced-locking.pdbOn" . }}
{{- if and (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if and (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "string" $pdb.minAvailable)) }}
{{- if ge (int $pdb.minAvailable) (int .Values.replicaCount) }}
{{- fail (printf "podDisruptionBudget.minAvailable=%v with replicaCount=%v would block every node drain; use maxUnavailable: 1" $pdb.minAvailable .Values.replicaCount) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.prometheusRule.enabled) (not (include "enhanced-locking.metricsOn" .)) }}
{{- fail "metrics.serviceMonitor/prometheusRule need config.enhanced-locking-metrics=true: with it false /metrics answers 404" }}
{{- end }}
{{- if and .Values.lockPolicy.create .Values.rbac.create }}
{{- $readable := include "enhanced-locking.readableSecrets" . | fromJsonArray }}
{{- $spec := .Values.lockPolicy.spec }}
{{- $refs := dict "redis.passwordSecretRef" (dig "redis" "passwordSecretRef" "name" "" $spec) "redis.tls.caSecretRef" (dig "redis" "tls" "caSecretRef" "name" "" $spec) }}
{{- $_ := set $refs "etcd.passwordSecretRef" (dig "etcd" "passwordSecretRef" "name" "" $spec) }}
{{- range $ref := list "caSecretRef" "certSecretRef" "keySecretRef" }}
{{- $_ := set $refs (printf "etcd.tls.%s" $ref) (dig "etcd" "tls" $ref "name" "" $spec) }}
{{- end }}
{{- range $field, $name := $refs }}
{{- if and $name (not (has $name $readable)) }}
{{- fail (printf "lockPolicy.spec.%s names Secret %q, which the operator may not read: use redis.auth.existingSecret (etcd.auth.existingSecret) or add it to rbac.extraSecretNames" $field $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.auth.mode "none") (not .Values.auth.insecureAllowUnauthenticated) }}
{{- fail "auth.mode=none serves the pod's address without authentication: anyone who reaches it may force-unlock every lock; use kubernetes or static, or set auth.insecureAllowUnauthenticated=true" }}
{{- end }}
{{- if and (eq .Values.auth.mode "static") (not .Values.auth.tokensSecret) }}
{{- fail "auth.mode=static needs auth.tokensSecret (a Secret with tokens.csv)" }}
{{- end }}
{{- if eq (int .Values.operator.livenessPort) (int .Values.service.port) }}
{{- fail (printf "operator.livenessPort=%v is service.port: kopf's liveness endpoint needs a port of its own" .Values.operator.livenessPort) }}
{{- end }}
{{- if and .Values.persistence.existingClaim (not .Values.persistence.enabled) }}
{{- fail "persistence.existingClaim is set but persistence.enabled is false" }}
{{- end }}
{{- end }}
