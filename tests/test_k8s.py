"""The Kubernetes kit (``cluster/k8s/``): no Kubernetes runs here, so what can be checked is: every
manifest parses, the RayJob's cluster is the RayCluster's, both agree with the cluster file they were
written for (nodes, resources per worker, storage, token), the entrypoint is the README's launch command
and parses as one, and the image recipe carries the files that command names and the manifests' Ray."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from conftest import REPO

from distsft.cli import build_parser
from distsft.config.cluster import load_cluster

K8S = REPO / "cluster" / "k8s"


def manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(docs) == 1 and docs[0]["apiVersion"] and docs[0]["kind"], name
    return docs[0]


@pytest.fixture(scope="module")
def kit():
    return {
        "cluster": load_cluster(K8S / "cluster.yaml"),
        "raycluster": manifest("raycluster.yaml"),
        "rayjob": manifest("rayjob.yaml"),
        "pvc": manifest("pvc.yaml"),
        "secret": manifest("secret.yaml"),
    }


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_rayjob_runs_the_raycluster_of_the_cluster_file(kit):
    spec, cluster = kit["raycluster"]["spec"], kit["cluster"]
    assert kit["rayjob"]["spec"]["rayClusterSpec"] == spec
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no distsft worker on the head
    (workers,) = spec["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == cluster.num_nodes
    r, n = cluster.resources_per_worker, cluster.workers_per_node
    assert workers["rayStartParams"] == {"num-cpus": f"{n * r.cpus:g}", "num-gpus": f"{n * r.gpus:g}"}
    (pod,) = workers["template"]["spec"]["containers"]
    res = pod["resources"]
    assert res["requests"] == res["limits"]
    assert float(res["limits"]["cpu"]) == n * r.cpus and float(res["limits"]["nvidia.com/gpu"]) == n * r.gpus
    assert res["limits"]["memory"] == f"{n * r.memory_gb:g}Gi"
    assert cluster.process_group_backend == "nccl"


def test_every_pod_has_the_token_and_checkpoint_key_from_the_secret_and_the_shared_volume(kit):
    spec, cluster, secret = kit["raycluster"]["spec"], kit["cluster"], kit["secret"]
    assert "ReadWriteMany" in kit["pvc"]["spec"]["accessModes"]
    for c in containers(spec):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        for name in ("RAY_AUTH_TOKEN", "DISTSFT_CHECKPOINT_KEY"):  # Ray's token; the checkpoint signing key
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
            assert not secret["stringData"][ref["key"]]  # no secret in the repository
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        shared = [p for p in mounts if cluster.storage_path.startswith(p.rstrip("/") + "/")]
        assert shared, f"{c['name']}: storage_path {cluster.storage_path} is on no volume"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        claims = {
            v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in g["template"]["spec"]["volumes"]
        }
        assert claims["shared"] == kit["pvc"]["metadata"]["name"]


def test_the_entrypoint_is_the_readmes_launch_command_and_the_image_carries_what_it_names(kit):
    entry = kit["rayjob"]["spec"]["entrypoint"]
    assert entry in (REPO / "README.md").read_text()
    argv = shlex.split(entry)
    assert argv[0] == "distsft"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "launch" and (REPO / args.cluster).resolve() == (K8S / "cluster.yaml").resolve()
    mounts = {m["mountPath"] for c in containers(kit["raycluster"]["spec"]) for m in c["volumeMounts"]}
    assert any(args.config.startswith(m + "/") for m in mounts)  # the ConfigMap distsft-run
    recipe = (K8S / "Dockerfile").read_text()
    ray = kit["raycluster"]["spec"]["rayVersion"]
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray)}-", recipe, re.M)
    assert "COPY --chown=ray:users cluster ./cluster" in recipe and "WORKDIR /opt/distsft" in recipe
    images = {c["image"] for c in containers(kit["raycluster"]["spec"])}
    assert len(images) == 1  # one image everywhere: the versions agree on every node
