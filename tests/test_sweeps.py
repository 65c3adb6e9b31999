"""Parameter sweeps: exact caching (job-by-job dry runs), early stopping from one run, summary, figures from tables."""

import re
import shutil

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from conftest import POINT, REPO, SHORT_POINT, TINY, merged, planned_jobs, run_snakemake
from workflow_scripts import paramspace, summary, utility
from workflow_scripts.metrics import MetricParams
from workflow_scripts.metrics import tables as metric_tables

# `make figures`'s rules, read from the Makefile (the one place they are listed).
_MAKEFILE = (REPO / "Makefile").read_text().replace("\\\n", " ")
FIGURE_RULES = tuple(re.search(r"^FIGURE_RULES := (.*)$", _MAKEFILE, re.M)[1].split())


def with_sweep(**sweep):
    return {**TINY, "sweep": {**TINY["sweep"], **sweep}}


def test_points_and_runs():
    points = paramspace.expand_points(
        {"n_train": None, "epochs": 9, "temperature": None, "weight_decay": 0.1, "mask_ratio": 0.0, "seed": 0},
        {"epochs": [20, 200], "mask_ratio": [0.0, 0.5]},
    )
    assert len(points) == 4
    plan = paramspace.training_runs(points)
    runs = {entry["run"] for entry in plan.values()}
    assert runs == {s for s in points if "epochs~200/" in s}
    short = next(s for s in points if "epochs~20/" in s and "mask_ratio~0.5" in s)
    assert plan[short] == {"run": short.replace("epochs~20/", "epochs~200/"), "epoch": 20}
    assert paramspace.save_epochs(plan, plan[short]["run"]) == [20]
    assert paramspace.parse_segment(short) == {
        "n_train": None,
        "epochs": 20,
        "temperature": None,
        "weight_decay": 0.1,
        "mask_ratio": 0.5,
        "seed": 0,
    }
    assert re.fullmatch(paramspace.segment_regex(), short)


def test_adding_a_mask_value_schedules_only_the_new_points(tiny_workflow):
    result = run_snakemake(tiny_workflow, with_sweep(mask_ratio=[0.0, 0.5]), "--dry-run")
    jobs = planned_jobs(result.stdout)
    per_point = [(rule, wc) for rule, wc in jobs if "point" in wc]
    assert all("mask_ratio~0.5" in wc["point"] for _, wc in per_point), per_point
    counts = {}
    for rule, _ in jobs:
        counts[rule] = counts.get(rule, 0) + 1
    # Two new points (epochs 1 and 2 at mask 0.5) x two models, P in two shards, both one-model modes.
    assert counts == {
        "train": 2,
        "model": 4,
        "embed_public_shard": 8,
        "embed_public": 4,
        "knn_shard": 8,
        "knn": 4,
        "embed_captions": 4,
        "utility": 4,
        "metrics": 6,  # target, holdout and reverse
        "embed_public_captions": 2,
        "knn_captions": 2,
        "metrics_one_model": 8,
        "agreement": 2,
        "figures_point": 2,
        "figures_qualitative": 2,
        "summary": 1,
        "seeds": 1,
        "figures_sweep": 1,
        "all": 1,
    }, counts
    trained = {wc["point"] for rule, wc in jobs if rule == "train"}
    assert trained == {POINT.replace("mask_ratio~0.0", "mask_ratio~0.5")}  # one run serves both epoch values


def test_training_set_size_sweep_trains_on_nested_prefixes(tiny_workflow):
    result = run_snakemake(tiny_workflow, with_sweep(n_train=[48, 64], epochs=[2]), "--dry-run")
    jobs = planned_jobs(result.stdout)
    subsets = sorted((wc["n_train"], wc["side"]) for rule, wc in jobs if rule == "subset_split")
    assert subsets == [("48", "A"), ("48", "B"), ("64", "A"), ("64", "B")]
    assert {wc["point"].split("/")[0] for rule, wc in jobs if rule == "train"} == {"n_train~48", "n_train~64"}
    assert "results/splits/scenes/n_train~48/A.parquet" in result.stdout


def test_short_point_takes_the_runs_checkpoint(tiny_workflow):
    models = tiny_workflow / "results" / "models" / "scenes"
    short = torch.load(models / SHORT_POINT / "A" / "model.pt", weights_only=True)
    assert short["epoch"] == 1
    run_checkpoint = torch.load(models / POINT / "A" / "run" / "model_epoch1.pt", weights_only=True)
    assert all(torch.equal(short["state_dict"][k], v) for k, v in run_checkpoint["state_dict"].items())
    assert not (models / SHORT_POINT / "A" / "run").exists()  # never trained on its own
    assert pl.read_parquet(models / POINT / "A" / "run" / "train_log.parquet")["epoch"].to_list() == [1, 2]


def test_summary_has_one_row_per_point_matching_the_metric_tables(tiny_workflow):
    results = tiny_workflow / "results"
    table = pl.read_parquet(results / "summary" / "scenes.parquet")
    assert table["point"].sort().to_list() == sorted([POINT, SHORT_POINT])
    assert table["epochs"].sort().to_list() == [1, 2]
    population = pl.read_parquet(results / "metrics" / "scenes" / POINT / "target" / "population.parquet").filter(
        (pl.col("label_mode") == "all") & (pl.col("metric") == "PPG")
    )
    row = table.filter(pl.col("point") == POINT).row(0, named=True)
    assert row["PPG_mean"] == pytest.approx(population["mean"].item())
    assert row["PPG_symmetric"] == pytest.approx((row["PPG_value"] + row["reverse_PPG_value"]) / 2)
    assert 0 <= row["A_dominant_object_linear_probe_PJ"] <= 1 and "B_scene_zero_shot" in table.columns
    assert (results / "summary" / "scenes.csv").exists()
    points = [SHORT_POINT, POINT]
    again = summary.summarise(
        "scenes",
        {
            queries: {p: results / "metrics" / "scenes" / p / queries / "population.parquet" for p in points}
            for queries in ("target", "holdout", "reverse")
        },
        {side: {p: results / "utility" / "scenes" / p / f"{side}.parquet" for p in points} for side in ("A", "B")},
    )
    assert again.equals(table)


def test_figures_and_report_rebuild_from_the_tables_alone(tiny_workflow, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_workflow, workdir, symlinks=True)
    cached = ("models", "embeddings", "ssl/scenes_pool/models", "ssl/scenes_pool/embeddings")  # must stay gone
    for folder in (*cached, "figures", "ssl/scenes_pool/figures"):
        shutil.rmtree(workdir / "results" / folder)
    run_snakemake(workdir, TINY, "figures", "--forcerun", *FIGURE_RULES, "--allowed-rules", *FIGURE_RULES)
    figures = workdir / "results" / "figures"
    for name in ("recall_cdf", "gap_vs_top_l", "qualitative"):
        assert (figures / "scenes" / POINT / f"{name}.png").stat().st_size > 1000
    assert (figures / "sweep" / "scenes" / "epochs.svg").exists()
    ssl_figures = workdir / "results" / "ssl" / "scenes_pool" / "figures" / "method~simclr" / "epochs~2" / "seed~0"
    for name in ("accuracy", "qualitative"):
        assert (ssl_figures / "projector" / "two_model" / f"{name}.png").stat().st_size > 1000
    ssl_agreement = ssl_figures.parents[3] / "agreement" / "method~simclr" / "epochs~2" / "seed~0" / "projector"
    assert (ssl_agreement / "confidence.png").stat().st_size > 1000
    assert not [folder for folder in cached if (workdir / "results" / folder).exists()]
    run_snakemake(workdir, TINY, "--report", "report.html")
    report = (workdir / "report.html").read_text()
    assert "qualitative.png" in report and "scenes.csv" in report and "agreement.png" in report


def test_linear_probe_and_probe_split():
    mask = utility.probe_split(10, 0.3, seed=0)
    assert mask.sum() == 3 and np.array_equal(mask, utility.probe_split(10, 0.3, seed=0))
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    separable = np.eye(3)[labels] * 5 + rng.normal(scale=0.1, size=(120, 3))
    assert utility.linear_probe_accuracy(separable, labels, utility.probe_split(120, 0.5, 0)) == 1.0
    noise = rng.normal(size=(120, 3))
    assert utility.linear_probe_accuracy(noise, labels, utility.probe_split(120, 0.5, 0)) < 0.7


def planted_direction(tmp_path, name: str, target_right: set[str], reference_right: set[str], ids: list[str]):
    """A population table of the metric engine on `ids`: each record's single neighbour carries its object
    (label a) under the model that is right on it, a wrong object (d) otherwise."""
    public = pl.DataFrame({"id": ["right", "wrong"], "labels": [["a"], ["d"]]})
    truth = pl.DataFrame({"id": ids, "labels": [["a"]] * len(ids)})
    paths = {}
    for role, right in (("target", target_right), ("reference", reference_right)):
        rows = {"query_id": ids, "rank": [0] * len(ids), "score": [1.0] * len(ids)}
        rows["public_id"] = ["right" if i in right else "wrong" for i in ids]
        frame = pl.DataFrame(rows, schema_overrides={"rank": pl.Int16, "score": pl.Float32})
        paths[role] = str(tmp_path / f"{name}_{role}.parquet")
        frame.write_parquet(paths[role])
    for table, frame in (("public", public), ("truth", truth), ("queries", truth.select("id"))):
        paths[table] = str(tmp_path / f"{name}_{table}.parquet")
        frame.write_parquet(paths[table])
    params = MetricParams(k=1, top_n=1, top_l=[1], n_boot=10, frac=0.5, seed=0)
    inputs = [paths[key] for key in ("target", "reference", "truth", "public", "queries")]
    metric_tables.compute(*inputs, params, out_dir=tmp_path / name)
    return tmp_path / name / "population.parquet"


@pytest.mark.parametrize(
    "case, expected",
    [
        # f_A retrieves better than f_B on every set: one way, the holdout shows the same gap as A's records.
        ("better_retriever", {"PRG_value": 1.0, "holdout_PRG_value": 1.0, "PRG_symmetric": 0.0, "PRG_net": 0.0}),
        # each model right exactly on its own training records: memorization, seen from both sides.
        ("memorizes", {"PRG_value": 1.0, "holdout_PRG_value": 0.0, "PRG_symmetric": 1.0, "PRG_net": 1.0}),
    ],
)
def test_symmetric_gap_cancels_what_one_model_retrieves_better_everywhere(tmp_path, case, expected):
    a, b, holdout = ["a1", "a2", "a3"], ["b1", "b2", "b3"], ["h1", "h2", "h3"]
    everyone = {*a, *b, *holdout}
    f_a, f_b = (everyone, set()) if case == "better_retriever" else ({*a, *holdout}, {*b, *holdout})
    populations = {
        "target": {POINT: planted_direction(tmp_path, "target", f_a, f_b, a)},
        "holdout": {POINT: planted_direction(tmp_path, "holdout", f_a, f_b, holdout)},
        "reverse": {POINT: planted_direction(tmp_path, "reverse", f_b, f_a, b)},  # f_B the target on B
    }
    utility_table = pl.DataFrame(
        {"task": ["scene"], "metric": ["zero_shot"], "accuracy": [0.5], "chance": [0.1], "n_classes": [10]}
    ).with_columns(n_eval=pl.lit(10, pl.Int64))
    utility_table.write_parquet(tmp_path / "utility.parquet")
    utilities = {side: {POINT: tmp_path / "utility.parquet"} for side in ("A", "B")}
    row = summary.summarise("scenes", populations, utilities).row(0, named=True)
    assert {key: row[key] for key in expected} == pytest.approx(expected)
    assert row["reverse_PRG_value"] == pytest.approx(2 * expected["PRG_symmetric"] - 1.0)


def test_a_list_of_sweeps_is_the_union_of_their_grids():
    base = {"n_train": None, "epochs": 40, "temperature": None, "weight_decay": 0.1, "mask_ratio": 0.0, "seed": 0}
    points = paramspace.expand_points(base, [{"mask_ratio": [0.0, 0.5], "seed": [0, 1]}, {"temperature": [0.05]}])
    assert sorted((p["mask_ratio"], p["temperature"] or 0, p["seed"]) for p in points.values()) == [
        (0.0, 0, 0),
        (0.0, 0, 1),
        (0.0, 0.05, 0),
        (0.5, 0, 0),
        (0.5, 0, 1),
    ]
    assert paramspace.swept_keys(points) == ["temperature", "mask_ratio", "seed"]
    assert paramspace.expand_points(base, [{"seed": [0]}, {"seed": [0]}]) == paramspace.expand_points(base, {})


def shrunken_directions() -> dict:
    """config/directions.yaml on the tiny data: its five one-parameter sweeps, two seeds, epochs 1 and 2."""
    directions = yaml.safe_load((REPO / "config" / "directions.yaml").read_text())
    sweeps = []
    for grid in directions["sweep"]:
        grid = {**grid, "seed": [0, 1]}
        grid |= {"epochs": [1, 2]} if "epochs" in grid else {}
        grid |= {"n_train": [48, None]} if "n_train" in grid else {}
        sweeps.append(grid)
    shrunk = {"sweep": sweeps, "training": {"epochs": 2}, "seeds": {"n_boot": 50}, "embedding": {"public_shards": 1}}
    return merged(TINY, {**directions, **shrunk})


def test_the_directions_config_plans_its_runs(tmp_path):
    config = yaml.safe_load((REPO / "config" / "directions.yaml").read_text())
    jobs = planned_jobs(run_snakemake(tmp_path, config, "--dry-run").stdout)
    rules = [rule for rule, _ in jobs]
    assert rules.count("train") == 42 and rules.count("metrics") == 24 * 3 and rules.count("seeds") == 1
    assert not {"ssl_train", "metrics_one_model"} & set(rules)


@pytest.mark.slow
def test_a_shrunken_directions_config_compares_every_parameter_over_seeds(tmp_path):
    run_snakemake(tmp_path, shrunken_directions())
    results = tmp_path / "results"
    over_seeds = pl.read_parquet(results / "seeds" / "scenes" / "seeds.parquet")
    assert over_seeds.height == 8 and (over_seeds["n_seeds"] == 2).all()
    assert over_seeds["PRG_value_seed_std"].null_count() == 0
    compared = pl.read_parquet(results / "seeds" / "scenes" / "comparisons.parquet")
    pairs = compared.filter((pl.col("queries") == "target") & (pl.col("metric") == "PRG"))
    assert sorted(pairs["parameter"].to_list()) == sorted(
        ["n_train", "epochs", "temperature", "temperature", "weight_decay", "weight_decay", "mask_ratio"]
    )
    assert (compared["n_seeds"] == 2).all() and (compared["n_records"] > 0).all()
    inside = (compared["ci_low"] <= compared["difference"]) & (compared["difference"] <= compared["ci_high"])
    assert inside.all()
    for parameter in ("n_train", "epochs", "temperature", "weight_decay", "mask_ratio"):
        assert (results / "figures" / "sweep" / "scenes" / f"{parameter}.png").stat().st_size > 1000
