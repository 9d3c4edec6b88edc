"""The pd-cluster chart, checked without a Kubernetes cluster: rendered by Helm's own engine for
the default values and every file in deploy/helm/values/, each object validated strictly against
the OpenAPI schemas of the oldest and the newest Kubernetes the chart supports, `helm lint
--strict`, values.schema.json, and the policy of policy.py. The policy rules are also shown to
fail on renderings broken on purpose, so a rule that cannot fail is caught too.

Run through deploy/helm/check.sh, which installs the hash-pinned packages this needs.
"""

import copy
import pathlib
import unittest

import helm_python as helm
import kubernetes_validate
import yaml

import policy

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE / "pd-cluster"
VALUES = sorted((HERE / "values").glob("*.yaml"))
# The chart's kubeVersion floor, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
# Custom resources: no OpenAPI schema ships with Kubernetes; policy.py checks their wiring.
CUSTOM_KINDS = {"PodMonitor", "ServiceMonitor", "ScaledObject"}


def values_of(path):
    return helm.values_from_yaml(path.read_text()) if path else {}


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="pd", namespace="serving")
    objects = []
    for name, text in manifests.items():
        if name.endswith(".txt"):
            continue
        objects += [o for o in yaml.safe_load_all(text) if o]
    return objects


def variants():
    """(label, values) for the defaults and every values file."""
    return [("defaults", {})] + [(p.name, values_of(p)) for p in VALUES]


def find(objects, kind, role):
    return next(o for o in objects if o["kind"] == kind and policy.component(o) == role)


def container(objects, role):
    return policy.pod_spec(find(objects, "Deployment", role))["containers"][0]


class RendersAndValidates(unittest.TestCase):
    def test_every_values_file_renders_to_valid_objects(self):
        for label, values in variants():
            objects = render(values)
            self.assertGreater(len(objects), 5, label)
            for obj in objects:
                if obj["kind"] in CUSTOM_KINDS:
                    continue
                for version in KUBERNETES_VERSIONS:
                    with self.subTest(values=label, kind=obj["kind"], name=obj["metadata"]["name"], k8s=version):
                        kubernetes_validate.validate(obj, version, strict=True)

    def test_lint_is_clean_for_both_kubernetes_versions(self):
        for path in [None] + VALUES:
            for version in KUBERNETES_VERSIONS:
                report = helm.lint(str(CHART), values_of(path), strict=True, kube_version=f"v{version}")
                problems = [m for m in report.get("messages", []) if m["severity"] >= 2]
                with self.subTest(values=path and path.name, k8s=version):
                    self.assertEqual(problems + report.get("errors", []), [])

    def test_policy_holds_for_every_values_file(self):
        for label, values in variants():
            with self.subTest(values=label):
                self.assertEqual(policy.violations(render(values)), [])

    def test_the_gpu_values_give_workers_a_gpu_and_shared_memory(self):
        objects = render(values_of(HERE / "values" / "gpu.yaml"))
        self.assertEqual(policy.gpu_violations(objects), [])
        self.assertNotEqual(policy.gpu_violations(render({})), [], "the defaults are CPU-only")

    def test_custom_resources_are_rendered_only_when_asked_for(self):
        self.assertFalse([o for o in render({}) if o["kind"] in CUSTOM_KINDS])
        keda = render(values_of(HERE / "values" / "autoscaling-keda.yaml"))
        kinds = sorted(o["kind"] for o in keda if o["kind"] in CUSTOM_KINDS)
        self.assertEqual(kinds, ["PodMonitor", "ScaledObject", "ScaledObject", "ServiceMonitor"])
        for o in keda:
            if o["kind"] in CUSTOM_KINDS:
                self.assertIn(o["apiVersion"], ("monitoring.coreos.com/v1", "keda.sh/v1alpha1"))

    def test_external_etcd_replaces_the_statefulset(self):
        objects = render(values_of(HERE / "values" / "external-etcd.yaml"))
        self.assertFalse([o for o in objects if o["kind"] == "StatefulSet"])
        env = policy.env_of(container(objects, "decode"))
        self.assertTrue(env["PD_ETCD_ENDPOINTS"].startswith("http://etcd-0.etcd.infra.svc:2379,"))

    def test_tls_mounts_the_secret_everywhere_and_etcd_asks_for_certificates(self):
        objects = render(values_of(HERE / "values" / "tls.yaml"))
        for role in ("router", "prefill", "decode"):
            env = policy.env_of(container(objects, role))
            self.assertTrue(env["PD_ETCD_ENDPOINTS"].startswith("https://"), role)
            self.assertEqual(env["PD_TLS_CA"], "/etc/pd-cluster/tls/ca.crt", role)
            self.assertEqual(env["PD_TLS_SERVER_NAME"], "pd-cluster", role)
            mounts = {m["name"]: m for m in container(objects, role)["volumeMounts"]}
            self.assertTrue(mounts["tls"]["readOnly"], role)
        etcd = policy.pod_spec(next(o for o in objects if o["kind"] == "StatefulSet"))
        command = etcd["containers"][0]["command"]
        self.assertIn("--client-cert-auth", command)
        self.assertIn("--peer-client-cert-auth", command)
        self.assertTrue(all("http://" not in c for c in command if "urls=" in c and "metrics" not in c))
        self.assertEqual(etcd["containers"][0]["readinessProbe"]["httpGet"]["port"], "health")
        self.assertEqual(etcd["volumes"][0]["secret"]["secretName"], "pd-cluster-tls")
        # Without TLS nothing of it is rendered.
        env = policy.env_of(container(render({}), "decode"))
        self.assertNotIn("PD_TLS_CA", env)
        self.assertTrue(env["PD_ETCD_ENDPOINTS"].startswith("http://"))

    def test_tls_without_a_secret_is_refused(self):
        with self.assertRaises(helm.HelmError):
            render({"tls": {"enabled": True, "secretName": "", "serverName": "pd-cluster"}})

    def test_nodes_reach_every_etcd_member(self):
        objects = render({})
        env = policy.env_of(container(objects, "router"))
        self.assertEqual(len(env["PD_ETCD_ENDPOINTS"].split(",")), 3)


class Schema(unittest.TestCase):
    def rejects(self, values):
        with helm.Chart.load(str(CHART)) as chart:
            with self.assertRaises(helm.HelmError, msg=str(values)):
                chart.validate_schema(values)

    def test_the_values_files_pass_the_schema(self):
        with helm.Chart.load(str(CHART)) as chart:
            for _, values in variants():
                chart.validate_schema(values)

    def test_bad_values_are_refused(self):
        self.rejects({"decode": {"replicas": -1}})
        self.rejects({"decod": {"replicas": 1}})
        self.rejects({"etcd": {"enabled": False}})
        self.rejects({"etcd": {"replicas": 2}})
        self.rejects({"decode": {"resources": {"limits": {"memory": None}}}})
        self.rejects({"decode": {"device": "gpu"}})
        self.rejects({"router": {"drainTimeoutSeconds": 5}})
        self.rejects({"listenHost": "::"})
        self.rejects({"autoscaling": {"mode": "vpa"}})


class PolicyCanFail(unittest.TestCase):
    """Each rule, shown a rendering broken the way it guards against, reports it."""

    def setUp(self):
        self.objects = render(values_of(HERE / "values" / "autoscaling-keda.yaml"))

    def broken(self, change):
        objects = copy.deepcopy(self.objects)
        change(objects)
        return policy.violations(objects)

    def assert_caught(self, change, words):
        found = self.broken(change)
        self.assertTrue(any(words in v for v in found), f"{words!r} not in {found}")

    def test_a_missing_disruption_budget(self):
        def drop(objects):
            objects[:] = [o for o in objects if not (o["kind"] == "PodDisruptionBudget" and policy.component(o) == "decode")]
        self.assert_caught(drop, "no PodDisruptionBudget")

    def test_an_etcd_budget_below_quorum(self):
        def weaken(objects):
            find(objects, "PodDisruptionBudget", "etcd")["spec"]["minAvailable"] = 1
        self.assert_caught(weaken, "quorum")

    def test_a_missing_memory_limit(self):
        self.assert_caught(lambda o: container(o, "prefill")["resources"]["limits"].pop("memory"), "memory")

    def test_a_grace_period_equal_to_the_drain(self):
        def shorten(objects):
            policy.pod_spec(find(objects, "Deployment", "decode"))["terminationGracePeriodSeconds"] = 30
        self.assert_caught(shorten, "does not cover")

    def test_the_router_grace_period_equal_to_its_drain(self):
        def shorten(objects):
            policy.pod_spec(find(objects, "Deployment", "router"))["terminationGracePeriodSeconds"] = 30
        self.assert_caught(shorten, "does not cover")

    def test_a_missing_pre_stop(self):
        self.assert_caught(lambda o: container(o, "router").pop("lifecycle"), "no preStop")

    def test_liveness_on_metrics(self):
        def metrics(objects):
            container(objects, "decode")["livenessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"}}
        self.assert_caught(metrics, "/metrics")

    def test_readiness_on_the_wrong_service(self):
        def anything(objects):
            container(objects, "prefill")["readinessProbe"] = {"grpc": {"port": 50061}}
        self.assert_caught(anything, "gRPC health")

    def test_a_pasted_pod_ip_address(self):
        def paste(objects):
            for e in container(objects, "decode")["env"]:
                if e["name"] == "PD_ADVERTISE_ADDRESS":
                    e["value"] = "$(POD_IP):50071"
        self.assert_caught(paste, "IPv6")

    def test_one_etcd_member_on_an_empty_dir(self):
        def single(objects):
            sts = find(objects, "StatefulSet", "etcd")
            sts["spec"]["replicas"] = 1
            sts["spec"].pop("volumeClaimTemplates")
            policy.pod_spec(sts)["volumes"] = [{"name": "data", "emptyDir": {}}]
        found = self.broken(single)
        self.assertTrue(any("1 members" in v for v in found), found)
        self.assertTrue(any("persistent volumes" in v for v in found), found)
        self.assertTrue(any("emptyDir" in v for v in found), found)

    def test_a_root_container(self):
        def root(objects):
            policy.pod_spec(find(objects, "Deployment", "router"))["securityContext"]["runAsUser"] = 0
        self.assert_caught(root, "non-root")

    def test_a_pod_no_network_policy_covers(self):
        def drop(objects):
            objects[:] = [o for o in objects if not (o["kind"] == "NetworkPolicy" and policy.component(o) == "etcd")]
        self.assert_caught(drop, "NetworkPolicy")

    def test_replicas_fighting_the_autoscaler(self):
        self.assert_caught(lambda o: find(o, "Deployment", "decode")["spec"].update(replicas=2), "autoscaler")

    def test_a_monitor_on_a_port_that_does_not_exist(self):
        def rename(objects):
            monitor = next(o for o in objects if o["kind"] == "PodMonitor")
            monitor["spec"]["podMetricsEndpoints"][1]["port"] = "prometheus"
        self.assert_caught(rename, "no port named prometheus")

    def test_a_trigger_on_no_pd_metric(self):
        def other(objects):
            scaled = next(o for o in objects if o["kind"] == "ScaledObject")
            scaled["spec"]["triggers"][0]["metadata"]["query"] = "sum(up)"
        self.assert_caught(other, "no pd_ metric")


if __name__ == "__main__":
    unittest.main()
