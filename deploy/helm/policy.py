"""What every rendering of the pd-cluster chart must hold, checked on the rendered objects.

Each rule returns the violations it finds as sentences; `violations(objects)` runs them all.
The rules say what running the cluster safely needs, not how the templates are written, so a
template change that breaks one fails the chart checks (deploy/helm/check.sh).
"""

import re

ROLES = ("router", "prefill", "decode")
WORKERS = ("prefill", "decode")
# The router drains open streams for this long after SIGTERM (built in).
ROUTER_DRAIN_SECONDS = 30
# A worker's stop after its drain: abort, let the server flush (2 s), join the engine (5 s).
WORKER_STOP_SECONDS = 7
HEALTH_SERVICE = {"prefill": "pd.v1.Prefill", "decode": "pd.v1.Decode"}
# A host:port made by pasting an IP variable before a port: wrong for IPv6 addresses.
PASTED_ADDRESS = re.compile(r"\$\([A-Z_]+\):\d+")


def component(obj):
    return obj.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def workloads(objects):
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def pre_stop_seconds(container):
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if command and command[0] == "sleep" and len(command) == 2 and command[1].isdigit():
        return int(command[1])
    return None


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def rule_disruption_budgets(objects):
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    out = []
    for w in workloads(objects):
        labels = w["spec"]["template"]["metadata"]["labels"]
        if not any(selects(b["spec"]["selector"], labels) for b in budgets):
            out.append(f"{w['metadata']['name']}: no PodDisruptionBudget selects its pods")
        if w["kind"] == "StatefulSet" and component(w) == "etcd":
            for b in budgets:
                if selects(b["spec"]["selector"], labels):
                    quorum = w["spec"]["replicas"] // 2 + 1
                    if b["spec"].get("minAvailable", 0) < quorum:
                        out.append(f"{b['metadata']['name']}: lets etcd lose its quorum")
    return out


def rule_memory_limits(objects):
    out = []
    for w in workloads(objects):
        for c in pod_spec(w)["containers"]:
            r = c.get("resources", {})
            if not r.get("limits", {}).get("memory") or not r.get("requests", {}).get("memory"):
                out.append(f"{w['metadata']['name']}/{c['name']}: no memory request and limit")
    return out


def rule_grace_periods(objects):
    """The grace period covers preStop, the whole drain and the stop after it."""
    out = []
    for w in workloads(objects):
        role = component(w)
        if role not in ROLES:
            continue
        spec = pod_spec(w)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in spec["containers"]:
            pre_stop = pre_stop_seconds(c)
            if pre_stop is None:
                out.append(f"{w['metadata']['name']}: no preStop delay")
                continue
            if role == "router":
                drain, after = ROUTER_DRAIN_SECONDS, 1
            else:
                drain = int(env_of(c).get("PD_DRAIN_TIMEOUT_SECS") or 30)
                after = WORKER_STOP_SECONDS + 1
            if grace < pre_stop + drain + after:
                out.append(
                    f"{w['metadata']['name']}: grace period {grace} s does not cover preStop "
                    f"{pre_stop} s + drain {drain} s + {after} s to stop"
                )
    return out


def probe_path(probe):
    return (probe or {}).get("httpGet", {}).get("path")


def rule_probes(objects):
    out = []
    for w in workloads(objects):
        role = component(w)
        if role not in ROLES:
            continue
        name = w["metadata"]["name"]
        for c in pod_spec(w)["containers"]:
            live, ready = c.get("livenessProbe"), c.get("readinessProbe")
            if not live or not ready or not c.get("startupProbe"):
                out.append(f"{name}: needs startup, readiness and liveness probes")
                continue
            if "/metrics" in (probe_path(live), probe_path(ready)):
                out.append(f"{name}: /metrics answers while the engine is wedged; not a probe")
            if role == "router":
                if probe_path(ready) != "/health":
                    out.append(f"{name}: readiness must be /health (can it serve)")
                continue
            command = live.get("exec", {}).get("command", [])
            if command[:2] != ["pd-probe", "live"]:
                out.append(f"{name}: liveness must ask the engine (pd-probe live)")
            if ready.get("grpc", {}).get("service") != HEALTH_SERVICE[role]:
                out.append(f"{name}: readiness must be the gRPC health of {HEALTH_SERVICE[role]}")
    return out


def rule_advertise_addresses(objects):
    out = []
    for w in workloads(objects):
        for c in pod_spec(w)["containers"]:
            env = env_of(c)
            for key, value in env.items():
                if value and PASTED_ADDRESS.search(value):
                    out.append(f"{w['metadata']['name']}: {key}={value} breaks on IPv6")
            if component(w) in WORKERS and env.get("PD_ADVERTISE_ADDRESS") != "auto":
                out.append(f"{w['metadata']['name']}: workers must advertise their own address")
    return out


def rule_etcd(objects):
    out = []
    for w in workloads(objects):
        if component(w) != "etcd":
            continue
        replicas = w["spec"].get("replicas", 1)
        if replicas < 3 or replicas % 2 == 0:
            out.append(f"{w['metadata']['name']}: {replicas} members; an odd 3 or more survive one loss")
        if not w["spec"].get("volumeClaimTemplates"):
            out.append(f"{w['metadata']['name']}: etcd data must be on persistent volumes")
        if any("emptyDir" in v for v in pod_spec(w).get("volumes", [])):
            out.append(f"{w['metadata']['name']}: etcd data on an emptyDir is lost with the pod")
    return out


def rule_non_root(objects):
    out = []
    for w in workloads(objects):
        spec = pod_spec(w)
        pod = spec.get("securityContext", {})
        for c in spec["containers"]:
            ctx = {**pod, **c.get("securityContext", {})}
            if not ctx.get("runAsNonRoot") or ctx.get("runAsUser", 0) == 0:
                out.append(f"{w['metadata']['name']}/{c['name']}: must run as a non-root user")
            if ctx.get("allowPrivilegeEscalation", True):
                out.append(f"{w['metadata']['name']}/{c['name']}: privilege escalation allowed")
    return out


def rule_network_policies(objects):
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    if not policies:
        return []
    out = []
    for w in workloads(objects):
        labels = w["spec"]["template"]["metadata"]["labels"]
        if not any(selects(p["spec"]["podSelector"], labels) for p in policies):
            out.append(f"{w['metadata']['name']}: no NetworkPolicy covers its pods")
    return out


def rule_scaling_targets(objects):
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    out = []
    for o in objects:
        if o["kind"] == "HorizontalPodAutoscaler":
            target = o["spec"]["scaleTargetRef"]["name"]
        elif o["kind"] == "ScaledObject":
            target = o["spec"]["scaleTargetRef"]["name"]
            for t in o["spec"]["triggers"]:
                if not re.search(r"\bpd_[a-z_]+\{", t["metadata"].get("query", "")):
                    out.append(f"{o['metadata']['name']}: a trigger that reads no pd_ metric")
        else:
            continue
        if target not in deployments:
            out.append(f"{o['metadata']['name']}: scales {target}, which is not rendered")
        elif "replicas" in deployments[target]["spec"]:
            out.append(f"{target}: sets replicas although an autoscaler owns them")
    return out


def rule_monitor_ports(objects):
    """Every PodMonitor/ServiceMonitor port names a port of what it selects."""
    pod_ports = set()
    for w in workloads(objects):
        for c in pod_spec(w)["containers"]:
            pod_ports |= {p.get("name") for p in c.get("ports", [])}
    service_ports = {p.get("name") for o in objects if o["kind"] == "Service" for p in o["spec"]["ports"]}
    out = []
    for o in objects:
        if o["kind"] == "PodMonitor":
            ports, known = [e["port"] for e in o["spec"]["podMetricsEndpoints"]], pod_ports
        elif o["kind"] == "ServiceMonitor":
            ports, known = [e["port"] for e in o["spec"]["endpoints"]], service_ports
        else:
            continue
        out += [f"{o['metadata']['name']}: no port named {p}" for p in ports if p not in known]
    return out


RULES = [
    rule_disruption_budgets,
    rule_memory_limits,
    rule_grace_periods,
    rule_probes,
    rule_advertise_addresses,
    rule_etcd,
    rule_non_root,
    rule_network_policies,
    rule_scaling_targets,
    rule_monitor_ports,
]


def violations(objects):
    return [v for rule in RULES for v in rule(objects)]


def gpu_violations(objects):
    """What the GPU values file must add: a GPU per worker and a memory-backed /dev/shm."""
    out = []
    for w in workloads(objects):
        if component(w) not in WORKERS:
            continue
        spec = pod_spec(w)
        c = spec["containers"][0]
        if "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
            out.append(f"{w['metadata']['name']}: no nvidia.com/gpu limit")
        shm = [v for v in spec.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounted = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        if not any(mounted.get(v["name"]) == "/dev/shm" for v in shm):
            out.append(f"{w['metadata']['name']}: no memory-backed /dev/shm")
        if env_of(c).get("PD_DEVICE", "cpu") == "cpu":
            out.append(f"{w['metadata']['name']}: runs on the CPU")
    return out
