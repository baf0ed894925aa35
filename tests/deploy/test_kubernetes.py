"""etc/kubernetes: the manifests parse, and carry what a fleet of memdefragd needs: one pod
per node in the host's PID namespace with exactly the four capabilities, the ConfigMap's
config valid and mounted where the container reads it, resource limits, a liveness probe
and Prometheus scraping on the port the config listens on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memdefragd.config import parse_config

from .conftest import REPO

K8S = REPO / "etc" / "kubernetes"
CAPS = {"SYS_ADMIN", "SYS_PTRACE", "SYS_NICE", "DAC_READ_SEARCH"}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    """kind/name -> manifest, from every YAML file in etc/kubernetes."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] == "Kustomization":
                out["Kustomization"] = doc
                continue
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in out, f"{key} twice"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def pod(docs) -> dict:
    return docs["DaemonSet/memdefragd"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (c,) = pod["spec"]["containers"]
    return c


def test_kustomization_lists_what_exists(docs):
    resources = docs["Kustomization"]["resources"]
    assert all((K8S / r).is_file() for r in resources)
    # The PodMonitor needs the Prometheus Operator's CRD: applied separately.
    assert set(resources) == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml", "podmonitor.yaml",
    }  # fmt: skip


def test_everything_in_one_namespace_that_admits_it(docs):
    ns = docs["Namespace/memdefragd"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for key, doc in docs.items():
        if key not in ("Kustomization", "Namespace/memdefragd"):
            assert doc["metadata"]["namespace"] == "memdefragd", key


def test_daemonset_runs_one_pod_per_node_in_the_host_pid_namespace(docs, pod):
    ds = docs["DaemonSet/memdefragd"]
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork") and not spec.get("hostIPC")
    assert {"operator": "Exists"} in spec["tolerations"]  # tainted nodes too
    assert spec["automountServiceAccountToken"] is False
    sa = docs[f"ServiceAccount/{spec['serviceAccountName']}"]
    assert sa["automountServiceAccountToken"] is False
    assert not any(v.get("hostPath") for v in spec.get("volumes", []))


def test_least_privilege_security_context(container):
    sc = container["securityContext"]
    assert sc["runAsUser"] == 0 and sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS
    # The runtime's default seccomp profile: process_madvise is allowed there only with
    # CAP_SYS_PTRACE, which the pod has.
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    # The API refuses allowPrivilegeEscalation: false together with CAP_SYS_ADMIN.
    assert sc.get("allowPrivilegeEscalation", True) is True


def test_resources_limited(container):
    res = container["resources"]
    assert res["limits"]["memory"] == "256Mi"  # the unit's MemoryMax
    assert res["limits"]["cpu"] and res["requests"]["cpu"] and res["requests"]["memory"]


def test_config_map_is_a_valid_config_mounted_where_the_daemon_reads_it(docs, pod, container):
    text = docs["ConfigMap/memdefragd-config"]["data"]["memdefragd.yaml"]
    cfg = parse_config(text, "configmap.yaml")
    assert cfg.targets and not cfg.daemon.compaction  # /sys is read-only in the pod
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert mount["readOnly"] is True
    # the file itself (subPath): a ConfigMap directory would hand memdefragd a symlink
    assert config_path == mount["mountPath"] and mount["subPath"] == "memdefragd.yaml"
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == "memdefragd-config"
    assert vol["configMap"]["defaultMode"] == 0o644  # memdefragd refuses group/other-writable


def test_liveness_and_scraping_hit_the_port_the_config_listens_on(docs, pod, container):
    cfg = parse_config(docs["ConfigMap/memdefragd-config"]["data"]["memdefragd.yaml"])
    host, port = cfg.daemon.metrics_listen
    assert host == "0.0.0.0", "the probe and Prometheus reach the pod IP, not its loopback"
    (p,) = container["ports"]
    assert (p["name"], p["containerPort"]) == ("metrics", port)
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/metrics", "metrics"), probe
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/path"] == "/metrics"
    pm = docs["PodMonitor/memdefragd"]
    assert pm["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert (ep["port"], ep["path"]) == ("metrics", "/metrics")
    # The alert rules expect job="memdefragd": the job comes from the pod's name label.
    assert pod["metadata"]["labels"][pm["spec"]["jobLabel"]] == "memdefragd"


def test_image_matches_the_dockerfile_entrypoint(container):
    """The DaemonSet passes only arguments: the image's ENTRYPOINT is memdefragd."""
    assert "command" not in container
    assert container["args"][0] == "run"
    assert container["image"].rsplit(":", 1)[-1] == "0.1.0"  # the package version
    assert Path(REPO / "Dockerfile").read_text().count('ENTRYPOINT ["memdefragd"]') == 1
