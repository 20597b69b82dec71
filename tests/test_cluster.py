"""Cluster files and --dry-run: validated like configs, plans printed without a cluster, secrets hidden."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from distsft.config.cluster import ClusterConfig, load_cluster
from distsft.config.loader import build_typed
from distsft.errors import ConfigError
from distsft.launcher.ray_train import check_storage


def write(tmp_path, text):
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    return p


def test_shipped_cluster_files_load():
    a100 = load_cluster(REPO / "cluster" / "a100.yaml")
    assert a100.num_workers == 16 and a100.use_gpu and a100.bundle()["GPU"] == 1
    assert load_cluster(REPO / "cluster" / "h100.yaml").num_workers == 32
    assert load_cluster(REPO / "cluster" / "local.yaml").num_workers == 2


def test_unknown_key_names_file_line_and_nearest(tmp_path):
    p = write(tmp_path, "num_nodes: 2\nresources_per_worker:\n  gpu: 1\n")
    with pytest.raises(
        ConfigError,
        match=rf"{p}:3: unknown key 'resources_per_worker.gpu'; did you mean "
        r"resources_per_worker.gpus\?",
    ):
        load_cluster(p)


def test_wrong_types_and_ranges_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="placement_strategy.*did you mean 'SPREAD'"):
        load_cluster(write(tmp_path, "placement_strategy: SPRED\n"))
    with pytest.raises(ConfigError, match="num_nodes = 0 is out of range"):
        load_cluster(write(tmp_path, "num_nodes: 0\n"))
    with pytest.raises(ConfigError, match="env.*expected a string"):
        load_cluster(write(tmp_path, "env:\n  NCCL_DEBUG: [1, 2]\n"))


def test_remote_cluster_needs_workers_per_node(tmp_path):
    with pytest.raises(ConfigError, match="workers_per_node must be set for a remote cluster"):
        load_cluster(write(tmp_path, "address: auto\nnum_nodes: 2\n"))


def test_multi_node_without_shared_storage_is_refused_before_start():
    with pytest.raises(ConfigError, match="2 nodes but no storage_path"):
        check_storage(ClusterConfig(num_nodes=2, workers_per_node=8))
    with pytest.raises(ConfigError, match="ftp:// is not supported"):
        check_storage(ClusterConfig(num_nodes=2, workers_per_node=8, storage_path="ftp://host/x"))
    check_storage(ClusterConfig(num_nodes=2, workers_per_node=8, storage_path="s3://bucket/x"))
    check_storage(ClusterConfig(num_nodes=2, workers_per_node=8, storage_path="/shared"))


def test_dry_run_prints_the_a100_plan_for_16_workers(cli):
    code, out, err = cli(
        "launch",
        "--config",
        str(REPO / "configs" / "llama3-8b-zero3.yaml"),
        "--cluster",
        str(REPO / "cluster" / "a100.yaml"),
        "--dry-run",
    )
    assert code == 0, err
    assert "workers:        16 (8 per node)" in out and "global batch 128 rows" in out
    assert "8.03B parameters" in out and "GiB per GPU" in out and "stage 3" in out


def test_secrets_in_env_are_never_printed(cli, tmp_path):
    p = write(
        tmp_path, "env:\n  HF_TOKEN: hf_supersecret123\nruntime_env:\n  env_vars:\n    WANDB_API_KEY: wb_secret\n"
    )
    code, out, err = cli("launch", "--cluster", str(p), "--dry-run")
    assert code == 0, err
    assert "HF_TOKEN" in out and "hf_supersecret123" not in out + err
    redacted = str(load_cluster(p).redacted())
    assert "hf_supersecret123" not in redacted and "wb_secret" not in redacted


def test_a_bad_env_value_names_its_key_and_never_a_value(cli, tmp_path):
    p = write(
        tmp_path,
        "env:\n  HF_TOKEN: hf_supersecret123\n  AWS_SECRET_ACCESS_KEY: aws_secret456\n  NCCL_IB_DISABLE: 1\n"
        "  NCCL_DEBUG: [INFO]\n  GLOO_USE_IPV6: false\nhf_token: x\n",
    )
    code, out, err = cli("launch", "--cluster", str(p), "--dry-run")
    assert code == 2
    assert f"{p}:5: env.NCCL_DEBUG is invalid: expected a string" in err, err
    assert f"{p}:6: env.GLOO_USE_IPV6 is invalid: expected a string (quote it: 'true' or '1')" in err, err
    assert "hf_supersecret123" not in out + err and "aws_secret456" not in out + err and "INFO" not in err
    # a number is an environment value as written ("1"); a key that looks like a secret shows no value
    assert load_cluster(write(tmp_path, "env:\n  NCCL_IB_DISABLE: 1\n")).env == {"NCCL_IB_DISABLE": "1"}
    with pytest.raises(ConfigError, match=r"^f.yaml:3: api_token is invalid: expected an integer$"):
        build_typed(WithToken, {"api_token": "tok_secret"}, "f.yaml", {"api_token": 3})


@dataclasses.dataclass(frozen=True)
class WithToken:
    api_token: int = 0


def test_secrets_reach_workers_with_the_run_and_never_through_the_runtime_env(tmp_path):
    from distsft.checkpoint import auth
    from distsft.launcher.ray_train import worker_runtime_env, worker_secrets

    p = write(
        tmp_path,
        "env: {HF_TOKEN: a, WANDB_API_KEY: b, DEPLOY_PHRASE: c, NCCL_IB_DISABLE: '1', HF_HOME: /data/hf}\n"
        "runtime_env: {env_vars: {MLFLOW_TRACKING_PASSWORD: d, OMP_NUM_THREADS: '4'}}\nsecret_env: [DEPLOY_PHRASE]\n",
    )
    cluster = load_cluster(p)
    public = worker_runtime_env(cluster)["env_vars"]
    assert {"NCCL_IB_DISABLE": "1", "HF_HOME": "/data/hf", "OMP_NUM_THREADS": "4"}.items() <= public.items()
    assert not {"HF_TOKEN", "WANDB_API_KEY", "DEPLOY_PHRASE", "MLFLOW_TRACKING_PASSWORD"} & set(public)
    secrets = worker_secrets(cluster)
    assert {"HF_TOKEN": "a", "WANDB_API_KEY": "b", "DEPLOY_PHRASE": "c", "MLFLOW_TRACKING_PASSWORD": "d"}.items() <= (
        secrets.items()
    )
    assert secrets[auth.ENV_KEY] == auth.key().decode()  # the driver's checkpoint key, for rank 0 to sign with


def test_a_dashboard_beyond_loopback_needs_an_acknowledgement(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.yaml:1: dashboard_host: '0.0.0.0' opens Ray's dashboard"):
        load_cluster(write(tmp_path, "dashboard_host: 0.0.0.0\n"))
    assert load_cluster(write(tmp_path, "dashboard_host: localhost\n")).dashboard_host == "localhost"
    assert load_cluster(write(tmp_path, "dashboard_host: 0.0.0.0\nallow_remote_dashboard: true\n"))


def test_dry_run_plans_long_context_activations_and_the_sequence_parallel_size_needed(cli):
    """Llama-3.1-8B at 128k tokens per row on one 8-GPU node: split 8 ways it fits; unsplit it does not,
    and the plan names the smallest sequence-parallel size that fits."""
    args = ["launch", "--config", str(REPO / "configs" / "llama3-8b-128k.yaml"),
            "--cluster", str(REPO / "cluster" / "h100-node.yaml"), "--dry-run"]  # fmt: skip
    code, out, err = cli(*args)
    assert code == 0, err
    assert "(workers 8 = 1 x sequence_parallel 8)" in out and "= 16,384 per worker" in out
    assert "fits:           yes" in out and "needs:" not in out
    code, out, err = cli(*args, "--set", "train.sequence_parallel=1")
    assert code == 0, err
    assert "fits:           no" in out and "needs:          train.sequence_parallel=2" in out
    code, out, err = cli(*args, "--set", "train.sequence_parallel=3")
    assert code == 2 and "sequence_parallel" in err and "131072" in err


def test_data_engine_auto_picks_ray_data_only_where_every_node_can_share_the_cache(tmp_path):
    from distsft.config import load_config
    from distsft.errors import ConfigError
    from distsft.launcher.prepare import choose_data_runner as data_engine

    one, two = ClusterConfig(num_nodes=1, workers_per_node=2), ClusterConfig(num_nodes=2, workers_per_node=2)
    demo = load_config(None, [])
    assert data_engine(demo, None) == "local" and data_engine(demo, one) == "local"  # small, one node
    assert data_engine(demo, two) == "local"  # several nodes, but no shared cache named
    shared = load_config(None, [f"data.cache_dir={tmp_path}"])
    assert data_engine(shared, two) == "ray"
    (tmp_path / "a.json").write_text("[]")
    json_array = load_config(None, [f"data.cache_dir={tmp_path}", f"data.path={tmp_path / 'a.json'}"])
    assert data_engine(json_array, two) == "local"  # Ray Data does not read JSON arrays
    with pytest.raises(ConfigError, match="data.engine = ray on 2 nodes .* set data.cache_dir"):
        data_engine(load_config(None, ["data.engine=ray"]), two)
    assert data_engine(load_config(None, ["data.engine=ray"]), None) == "ray"


def test_a_worker_failure_reaches_the_console_without_terminal_colours():
    """Ray colours the remote traceback (seen on a failed two-node launch); a log file or a pipe would show
    the codes as text."""
    from distsft.launcher.ray_train import describe_failure

    class Failed(Exception):
        worker_failures = {
            1: RuntimeError(
                "rank 1 on node 198.51.100.2 failed:\n\x1b[36mray::execute._setup_torch_process_group()\x1b[39m"
            )
        }

    msg = describe_failure(Failed())
    assert "\x1b" not in msg and "[36m" not in msg
    assert msg == (
        "training failed on 1 worker(s); first: rank 1 on node 198.51.100.2 failed:\n"
        "ray::execute._setup_torch_process_group()"
    )
    assert "\x1b" not in describe_failure(RuntimeError("\x1b[31mboom\x1b[0m"))


def test_elastic_keys_are_checked_and_the_global_batch_picks_the_worker_counts(tmp_path):
    from distsft.config import load_config

    with pytest.raises(ConfigError, match="min_workers = 5 is more than the 4 workers"):
        load_cluster(write(tmp_path, "num_nodes: 2\nworkers_per_node: 2\nmin_workers: 5\n"))
    elastic = load_cluster(write(tmp_path, "num_nodes: 4\nworkers_per_node: 2\nmin_workers: 2\n"))
    assert elastic.elastic and elastic.with_nodes(3).num_workers == 6
    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    assert [cfg.batch_plan(w).grad_accum_steps for w in (1, 2, 4)] == [4, 2, 1]
    assert [w for w in range(1, 9) if cfg.fits_workers(w)] == [1, 2, 4]
    with pytest.raises(ConfigError, match=r"global_batch_size = 8 is not a multiple of .* 3 data-parallel"):
        cfg.batch_plan(3)
    with pytest.raises(ConfigError, match="train.grad_accum_steps.*derived from train.global_batch_size"):
        load_config(None, ["train.global_batch_size=8", "train.grad_accum_steps=2"])


def test_a_restart_line_names_who_failed_and_the_exception():
    from distsft.host import interface_of
    from distsft.launcher.ray_train import summary_line

    failure = (
        "training failed on 1 worker(s); first: rank 0 on node 10.0.0.2 failed:\nTraceback:\n  ...\nRuntimeError: x"
    )
    assert (
        summary_line(failure)
        == "training failed on 1 worker(s); first: rank 0 on node 10.0.0.2 failed: RuntimeError: x"
    )
    assert interface_of("127.0.0.1") == "lo" and interface_of("203.0.113.77") is None


def _node(ip: str, cpus: float, gpus: float = 0) -> dict:
    return {"NodeManagerAddress": ip, "Resources": {"CPU": cpus, "GPU": gpus, "memory": 8 * 1024**3}}


def test_doctor_counts_workers_by_placement_strategy_and_elastic_minimum():
    from distsft.config.cluster import ClusterConfig, WorkerResources
    from distsft.launcher.doctor import nodes_finding

    nodes = [_node("10.0.0.1", 4), _node("10.0.0.2", 1)]
    spread = ClusterConfig(num_nodes=3, workers_per_node=1, placement_strategy="STRICT_SPREAD")
    assert not nodes_finding(spread, nodes).ok and "only 2 fit" in nodes_finding(spread, nodes).text
    assert nodes_finding(ClusterConfig(num_nodes=1, workers_per_node=5, placement_strategy="PACK"), nodes).ok
    assert not nodes_finding(ClusterConfig(num_nodes=1, workers_per_node=5, placement_strategy="STRICT_PACK"), nodes).ok
    assert nodes_finding(ClusterConfig(num_nodes=3, workers_per_node=1, placement_strategy="STRICT_SPREAD",
                                       min_workers=2), nodes).ok  # fmt: skip
    gpus = ClusterConfig(num_nodes=2, workers_per_node=1, resources_per_worker=WorkerResources(gpus=1))
    finding = nodes_finding(gpus, nodes)
    assert not finding.ok and "only 0 fit" in finding.text and "GPU 1" in finding.text


def test_doctor_versions_name_the_node_and_the_package_that_differ():
    from distsft.launcher import probe
    from distsft.launcher.doctor import versions_finding

    mine = probe.versions()
    assert versions_finding({"10.0.0.1": {"versions": mine}, "10.0.0.2": mine}).ok
    other = {**mine, "transformers": "4.0.0"}
    finding = versions_finding({"10.0.0.1": {"versions": mine}, "10.0.0.2": {"versions": other}})
    assert not finding.ok and finding.text.startswith(f"transformers 4.0.0 on 10.0.0.2 but {mine['transformers']}")
    assert not versions_finding({"10.0.0.3": TimeoutError("no answer within 120s")}).ok


def test_checkpoint_size_counts_weights_in_their_dtype_and_adam_state_for_what_trains():
    from distsft.config import load_config
    from distsft.launcher.dry_run import ModelSize, checkpoint_bytes

    sizes = ModelSize(total=1000, largest=100, family="", trainable=1000, quantizable=0)
    one, most = checkpoint_bytes(load_config(None, ["model.dtype=bfloat16", "checkpoint.keep_last=2"]), sizes, True)
    assert one == 1000 * 2 + 1000 * 12 and most == 3 * one
    lora = sizes._replace(trainable=10)
    one, _ = checkpoint_bytes(load_config(None, ["model.dtype=float32", "lora.r=8"]), lora, False)
    assert one == 10 * 4 + 10 * 12  # only the adapters are saved
