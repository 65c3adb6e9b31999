"""Scale-out: sharded public sets with an exact merge, GPU placement, and the SLURM / local-GPU profiles."""

import logging
import re
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, run_snakemake
from workflow_scripts import embed, knn, models
from workflow_scripts.contracts import EMBEDDINGS
from workflow_scripts.io import DataError, embeddings_table, read_embeddings, write_parquet

GPU_RULES = ("train", "embed_public_shard", "embed_captions", "knn_shard", "ssl_train", "ssl_embed", "ssl_knn")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.normal(size=(n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference_neighbors(query_ids, queries, public_ids, public, k: int) -> pl.DataFrame:
    """The documented order, by brute force: float64 dot products rounded to float32, score desc, then id asc."""
    scores = (queries.astype(np.float64) @ public.astype(np.float64).T).astype(np.float32)
    id_rank = np.argsort(np.argsort(np.asarray(public_ids)))
    order = np.lexsort((np.broadcast_to(id_rank, scores.shape), -scores), axis=1)[:, :k]
    return pl.DataFrame(
        {
            "query_id": np.repeat(query_ids, k),
            "rank": np.tile(np.arange(k, dtype=np.int16), len(query_ids)),
            "public_id": np.asarray(public_ids)[order.reshape(-1)],
            "score": np.take_along_axis(scores, order, axis=1).reshape(-1),
        }
    )


@pytest.fixture(scope="module")
def embedded_sets(tmp_path_factory):
    """Queries and a public set with exact ties: 40 copies of one vector and some queries equal to public rows."""
    root = tmp_path_factory.mktemp("scaleout")
    rng = np.random.default_rng(0)
    public = unit_rows(rng, 1200, 16)
    public[-40:] = public[0]
    public_ids = np.array([f"p{i:05d}" for i in rng.permutation(len(public))])  # id order != row order
    queries = np.concatenate([unit_rows(rng, 230, 16), public[[0, 5, 6, 7]]])
    query_ids = np.array([f"q{i:04d}" for i in range(len(queries))])
    write_parquet(embeddings_table(public_ids, public), root / "public.parquet", stage="test", contract=EMBEDDINGS)
    write_parquet(embeddings_table(query_ids, queries), root / "captions.parquet", stage="test", contract=EMBEDDINGS)
    return root, (query_ids, queries, public_ids, public)


def test_seven_shards_merge_to_exactly_the_unsharded_neighbours(embedded_sets):
    root, arrays = embedded_sets
    k = 10
    knn.knn(str(root / "captions.parquet"), str(root / "public.parquet"), str(root / "whole.parquet"), k, batch_size=64)
    shards = [str(root / f"shard{i}.parquet") for i in range(7)]
    for i, path in enumerate(shards):
        knn.search_shard(
            str(root / "captions.parquet"), str(root / "public.parquet"), path, k, f"{i}-of-7", batch_size=50
        )
    knn.merge(shards, str(root / "merged.parquet"), k, batch_size=33)
    whole = pl.read_parquet(root / "whole.parquet")
    merged = pl.read_parquet(root / "merged.parquet")
    assert merged.equals(whole)  # bit for bit, order included
    assert whole.equals(reference_neighbors(*arrays, k))
    assert pq.read_schema(root / "merged.parquet").metadata[b"dejavu:stage"] == b"knn"
    assert pq.read_schema(root / "merged.parquet").equals(pq.read_schema(root / "whole.parquet"), check_metadata=False)


def test_ties_beyond_the_candidate_margin_break_by_public_id(embedded_sets, caplog):
    _, (_query_ids, queries, public_ids, public) = embedded_sets
    copies = public_ids[np.r_[0, len(public) - 40 : len(public)]]  # 41 public rows hold the same vector
    with caplog.at_level(logging.INFO, logger="workflow_scripts.knn"):
        scores, rows = knn.search(queries[-4:-3], public, k=20, public_ids=pa.array(public_ids))
    assert "exhaustive search" in caplog.text  # 41 ties > k + CANDIDATE_MARGIN candidates
    assert list(public_ids[rows[0]]) == sorted(copies)[:20]
    assert len(set(scores[0])) == 1


def test_search_of_plain_arrays_matches_brute_force_for_any_batch_size():
    rng = np.random.default_rng(1)
    public, queries = unit_rows(rng, 500, 32), unit_rows(rng, 90, 32)
    expected = np.argsort(-(queries.astype(np.float64) @ public.astype(np.float64).T), axis=1, kind="stable")[:, :7]
    for batch_size in (1, 16, 1000):
        _, rows = knn.search(queries, public, k=7, batch_size=batch_size)
        assert np.array_equal(rows, expected)


def test_shard_ranges_tile_the_public_set(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet(
        embeddings_table([f"p{i}" for i in range(10)], np.eye(10, dtype=np.float32)),
        path,
        stage="test",
        contract=EMBEDDINGS,
    )
    ranges = [knn.shard_range(str(path), f"{i}-of-3") for i in range(3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    ids, matrix = knn.read_embedding_rows(str(path), 3, 6)
    assert ids.to_pylist() == ["p3", "p4", "p5"] and np.array_equal(matrix, np.eye(10, dtype=np.float32)[3:6])
    with pytest.raises(ValueError, match="I-of-N"):
        knn.parse_shard("3-of-3")
    with pytest.raises(DataError, match="cannot be split into 11 shards"):
        knn.shard_range(str(path), "0-of-11")


def test_merge_refuses_shards_of_different_query_sets(embedded_sets, tmp_path):
    root, (query_ids, queries, _public_ids, _public) = embedded_sets
    write_parquet(
        embeddings_table(query_ids[:5], queries[:5]), tmp_path / "few.parquet", stage="test", contract=EMBEDDINGS
    )
    knn.search_shard(str(tmp_path / "few.parquet"), str(root / "public.parquet"), str(tmp_path / "a.parquet"), 3)
    knn.search_shard(str(root / "captions.parquet"), str(root / "public.parquet"), str(tmp_path / "b.parquet"), 3)
    with pytest.raises(DataError, match="another query set"):
        knn.merge([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tmp_path / "m.parquet"), 3)


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory):
    """An untrained dejavu-vit-tiny checkpoint and a tiny public set: enough to test the embed plumbing."""
    from workflow_scripts import synthetic

    root = tmp_path_factory.mktemp("embed")
    synthetic.generate("public", 23, seed=2, config=synthetic.SyntheticConfig(image_size=64), out_dir=root / "public")
    model, _, _ = models.create_model("dejavu-vit-tiny", torch.device("cpu"))
    models.save_checkpoint(root / "model.pt", model, "dejavu-vit-tiny", epoch=0)
    return root


def test_embedded_shards_concatenate_to_the_unsharded_embeddings(untrained_model):
    root = untrained_model
    model, records = str(root / "model.pt"), str(root / "public" / "records.parquet")
    embed.embed(model, records, [], "image", str(root / "whole.parquet"), embed.EmbedParams(batch_size=8))
    shards = [str(root / f"{i}-of-3.parquet") for i in range(3)]
    for i, path in enumerate(shards):
        embed.embed(model, records, [], "image", path, embed.EmbedParams(batch_size=8), shard=f"{i}-of-3")
    assert [pq.ParquetFile(path).metadata.num_rows for path in shards] == [7, 8, 8]
    knn.main(["gather", "--shards", *shards, "--out", str(root / "public.parquet")])
    whole_ids, whole = read_embeddings(root / "whole.parquet")
    ids, joined = read_embeddings(root / "public.parquet")
    assert list(ids) == list(whole_ids)
    assert joined == pytest.approx(whole, abs=1e-5)  # batch composition differs: last-bit BLAS differences only
    assert pq.read_schema(root / "public.parquet").equals(pq.read_schema(root / "whole.parquet"), check_metadata=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_embedding_on_a_missing_gpu_fails_unless_fallback_is_allowed(untrained_model, caplog):
    root = untrained_model
    args = (str(root / "model.pt"), str(root / "public" / "records.parquet"), [], "image")
    with pytest.raises(models.DeviceError, match="no GPU is visible"):
        embed.embed(*args, str(root / "cuda.parquet"), embed.EmbedParams(device="cuda"), shard="0-of-3")
    assert not (root / "cuda.parquet").exists()
    with caplog.at_level(logging.INFO):
        fallback = embed.EmbedParams(device="cuda", allow_cpu_fallback=True)
        embed.embed(*args, str(root / "fallback.parquet"), fallback, shard="0-of-3")
        knn.build_index(np.eye(4, dtype=np.float32), "auto")
    assert "falling back to the CPU" in caplog.text
    assert "searching on the CPU" in caplog.text


FAISS_GPUS = knn.faiss.get_num_gpus() if hasattr(knn.faiss, "StandardGpuResources") else 0


@pytest.mark.skipif(FAISS_GPUS == 0, reason="needs faiss-gpu (envs/dejavu-gpu.yaml) and a visible GPU")
def test_gpu_search_gives_the_cpu_table(embedded_sets):
    root, _ = embedded_sets
    for device in ("never", "always"):
        knn.search_shard(
            str(root / "captions.parquet"),
            str(root / "public.parquet"),
            str(root / f"gpu_{device}.parquet"),
            10,
            "0-of-1",
            64,
            device,
        )
    assert pl.read_parquet(root / "gpu_always.parquet").equals(pl.read_parquet(root / "gpu_never.parquet"))


# --- profiles: what Snakemake plans, and the sbatch call the SLURM plugin builds from it ---


class PlannedResources(dict):
    """Snakemake's job.resources: a mapping with attribute access."""

    __getattr__ = dict.__getitem__


def planned_jobs(output: str) -> dict[str, SimpleNamespace]:
    """rule name -> its first job (threads and resources, as the plugin reads them), from a dry run's listing."""
    planned = {}
    for rule, block in re.findall(r"^rule (\w+):\n((?:    .*\n)+)", output, re.MULTILINE):
        threads = re.search(r"^    threads: (\d+)$", block, re.MULTILINE)
        listed = re.search(r"^    resources: (.*)$", block, re.MULTILINE).group(1)
        values = dict(item.split("=", 1) for item in listed.split(", "))
        resources = PlannedResources({name: int(v) if v.isdigit() else v for name, v in values.items()})
        planned.setdefault(
            rule,
            SimpleNamespace(
                name=rule, threads=int(threads.group(1)) if threads else 1, resources=resources, is_group=lambda: False
            ),
        )
    return planned


def sbatch_call(job: SimpleNamespace) -> str:
    from snakemake_executor_plugin_slurm import Executor
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    # _fallback_partition "": no partition set, so no -p (the plugin would name the one sinfo marks as default)
    executor = SimpleNamespace(_partitions=None, _fallback_partition="", logger=logging.getLogger("slurm"))
    params = {
        "run_uuid": "run",
        "slurm_logfile": "slurm.log",
        "comment_str": f"rule_{job.name}",
        "account": "",
        "partition": Executor.get_partition_arg(executor, job),
        "workdir": None,
    }
    return get_submit_command(job, params) + set_gres_string(job)


def planned_sbatch_calls(tmp_path, config: dict | None, *args: str) -> dict[str, str]:
    result = run_snakemake(tmp_path, config, "--dry-run", "--workflow-profile", str(REPO / "profiles" / "slurm"), *args)
    output = result.stdout + result.stderr
    assert "Using workflow specific profile" in output
    return {rule: sbatch_call(job) for rule, job in planned_jobs(output).items()}


def test_slurm_profile_requests_gpus_for_the_gpu_rules_of_the_default_config(tmp_path):
    calls = planned_sbatch_calls(tmp_path, None)  # config.yaml: device auto, knn.use_gpu auto
    for rule in (*GPU_RULES, "utility"):
        assert " --gpus=1" in calls[rule], (rule, calls[rule])
    for call in calls.values():
        assert " -p " not in call, call  # the cluster's default partition: the profile runs unedited
        assert re.search(r" --mem \d+", call) and re.search(r" -t \d+", call), call
        assert " --cpus-per-task=1" in call, call  # config.yaml's threads: 1 everywhere
    for rule in ("knn", "embed_public", "metrics", "splits", "synthetic_dataset"):
        assert "--gpus" not in calls[rule], (rule, calls[rule])
    assert " --mem 32000" in calls["embed_public_shard"] and " -t 1440" in calls["train"]


def test_slurm_profile_requests_no_gpu_for_a_cpu_only_config(tmp_path):
    from test_slurm import CPU_ONLY

    calls = planned_sbatch_calls(tmp_path, CPU_ONLY)
    assert set(GPU_RULES) <= set(calls)
    assert not [call for call in calls.values() if "--gpus" in call or "--gres" in call]


def test_slurm_cpus_and_gpus_follow_the_config(tmp_path):
    config = {
        "training": {"threads": 6, "gpus_per_node": 2},
        "embedding": {"threads": 3},
        "knn": {"threads": 4, "use_gpu": "never"},
    }
    calls = planned_sbatch_calls(tmp_path, config, "--cores", "8")  # --cores caps every job's threads
    assert " --gpus=2" in calls["train"] and " --cpus-per-task=6" in calls["train"]
    assert " --gpus=1" in calls["embed_public_shard"] and " --cpus-per-task=3" in calls["embed_public_shard"]
    assert "--gpus" not in calls["knn_shard"] and " --cpus-per-task=4" in calls["knn_shard"]


@pytest.mark.parametrize("device, gpus", [("cuda", " --gpus=1"), ("cpu", "")])
def test_slurm_detic_chunks_request_a_gpu_unless_pinned_to_the_cpu(tmp_path, device, gpus):
    for name in ("names.txt", "ViT-B-32.pt", "detic.pth"):
        (tmp_path / name).write_text("stand-in")  # inputs of the plan; a dry run reads none of them
    spec = {
        "repo": str(tmp_path / "Detic"),
        "vocabulary": str(tmp_path / "names.txt"),
        "device": device,
        "clip_weights": str(tmp_path / "ViT-B-32.pt"),
        "weights": str(tmp_path / "detic.pth"),
        "workers": 3,
    }
    config = {
        "datasets": {
            "scenes_public": {"source": "synthetic", "n_records": 150, "seed": 2, "annotator": "detic", "detic": spec}
        }
    }
    calls = planned_sbatch_calls(tmp_path, config, "--cores", "8")
    assert calls["detic_chunk"].endswith(" --cpus-per-task=4" + gpus), calls["detic_chunk"]  # workers + the job


def test_local_gpu_profile_plans_one_gpu_per_gpu_job(tmp_path):
    result = run_snakemake(tmp_path, None, "--dry-run", "--workflow-profile", str(REPO / "profiles" / "local-gpu"))
    planned = planned_jobs(result.stdout + result.stderr)
    assert all(planned[rule].resources["gpu"] == 1 for rule in GPU_RULES)
    assert "gpu" not in planned["knn"].resources
