"""Over the training seeds: aggregation, the paired seed-and-record bootstrap, adjacent comparisons, CLI, figure."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.collections import PolyCollection

from workflow_scripts import figures, seeds
from workflow_scripts.contracts import COMPARISONS, METRIC_RECORDS, SEED_SUMMARY, SUMMARY
from workflow_scripts.io import read_metadata, write_parquet
from workflow_scripts.paramspace import POINT_KEYS, SSL_POINT_KEYS, point_segment

BASE = {"n_train": None, "epochs": 2, "temperature": None, "weight_decay": 0.1, "mask_ratio": 0.0, "seed": 0}
SCORES = ("precision", "recall", "f1")


def summary_rows(points: list[dict], values: list[float]) -> pl.DataFrame:
    """A summary-shaped table: each point's statistics derived from its `value`, utility columns A_/B_."""
    rows = []
    for point, value in zip(points, values):
        point = {**BASE, **point}
        by_statistic = {"value": value, "mean": value + 0.01, "std": 0.05}  # `mean`: a bootstrap mean, off a bit
        statistics = {
            f"{prefix}{metric}_{statistic}": number
            for prefix in ("", "holdout_")
            for metric in ("PPG", "PRG", "AUCG")
            for statistic, number in by_statistic.items()
        }
        nets = {f"{metric}_net": value / 2 for metric in ("PPG", "PRG", "AUCG")}
        extra = {"PPG_symmetric": value, "A_scene_zero_shot": 0.5 + value / 10, "B_scene_zero_shot": 0.4}
        rows.append({"split": "scenes", "point": point_segment(point), **point, **statistics, **nets, **extra})
    schema = SUMMARY.polars() | {"PPG_symmetric": pl.Float64, "A_scene_zero_shot": pl.Float64}
    return pl.DataFrame(rows, schema=schema | {"B_scene_zero_shot": pl.Float64})


def records(target: list[float], reference: list[float], ids: list[str] | None = None) -> pl.DataFrame:
    """A full metric records table: every score of record i is target[i] / reference[i]; a `top_n` copy with the
    sides swapped and a record without objects (both must be ignored)."""
    ids = ids or [f"r{i}" for i in range(len(target))]
    n = len(ids)

    def mode(label_mode, target, reference):
        sides = {"target": target, "reference": reference}
        return {
            "id": [*ids, "empty"],
            "label_mode": [label_mode] * (n + 1),
            "n_objects": [1] * n + [0],
            **{f"{name}_{side}": [0] * (n + 1) for name in ("n_predicted", "n_correct") for side in sides},
            **{f"{score}_{side}": [*values, 1.0] for score in SCORES for side, values in sides.items()},
            **{f"nn_score_{side}": [0.5] * (n + 1) for side in sides},
        }

    frame = pl.concat([pl.DataFrame(mode("all", target, reference)), pl.DataFrame(mode("top_n", reference, target))])
    return frame.cast(METRIC_RECORDS.polars())


def signed(signs: list[int]) -> pl.DataFrame:
    """Records whose win signs are `signs`."""
    return records([0.5 + 0.25 * s for s in signs], [0.5] * len(signs))


# --- aggregate_seeds ---


def test_aggregation_by_hand():
    points = [{"seed": s} for s in (0, 1, 2)] + [{"temperature": 0.07, "seed": s} for s in (0, 1, 2)]
    table = seeds.aggregate_seeds(summary_rows(points, [0.1, 0.2, 0.6, 0.4, 0.4, 0.4]), POINT_KEYS)
    assert table["temperature"].to_list() == [None, 0.07]  # a learned (null) temperature is a group of its own
    learned = table.row(0, named=True)
    assert learned["PPG_value"] == pytest.approx(0.3)
    assert learned["PPG_value_seed_std"] == pytest.approx(0.2646, abs=1e-4)
    assert (learned["PPG_value_seed_min"], learned["PPG_value_seed_max"]) == (0.1, 0.6)
    assert learned["PPG_net"] == pytest.approx(0.15) and learned["PPG_symmetric_seed_max"] == 0.6
    assert learned["A_scene_zero_shot_seed_min"] == pytest.approx(0.51)
    assert learned["PPG_std"] == pytest.approx(0.05) and "PPG_std_seed_std" not in table.columns  # averaged
    assert not [c for c in table.columns if c.endswith("_mean")]  # bootstrap means dropped
    assert (learned["n_seeds"], learned["seeds"], learned["split"]) == (3, [0, 1, 2], "scenes")
    assert "point" not in table.columns and "seed" not in table.columns
    assert table.row(1, named=True)["PPG_value_seed_std"] == pytest.approx(0.0)
    SEED_SUMMARY.conform(table, "seeds.parquet")


def test_one_seed_has_no_spread_and_the_seeds_come_sorted():
    table = seeds.aggregate_seeds(summary_rows([{"seed": 2}], [0.3]), POINT_KEYS)
    row = table.row(0, named=True)
    assert (row["n_seeds"], row["seeds"], row["PPG_value"], row["PPG_value_seed_std"]) == (1, [2], 0.3, None)
    assert row["PPG_value_seed_min"] == row["PPG_value_seed_max"] == 0.3
    shuffled = seeds.aggregate_seeds(summary_rows([{"seed": s} for s in (2, 0, 1)], [0.1, 0.2, 0.3]), POINT_KEYS)
    assert shuffled["seeds"].to_list() == [[0, 1, 2]]


def test_a_seed_twice_is_refused():
    with pytest.raises(ValueError, match="a seed appears twice"):
        seeds.aggregate_seeds(summary_rows([{"seed": 0}, {"seed": 0}], [0.1, 0.2]), POINT_KEYS)


def test_the_ssl_summary_aggregates_with_its_own_keys():
    long = pl.DataFrame(
        {
            "point": ["a", "b", "a", "b"],
            "method": ["simclr"] * 4,
            "epochs": [2] * 4,
            "seed": [0, 1, 0, 1],
            "layer": ["projector"] * 4,
            "test": ["two_model"] * 4,
            "statistic": ["gap", "gap", "target", "target"],
            "top_p": [100.0] * 4,
            "value": [0.1, 0.3, 0.5, 0.7],
            "mean": [0.1, 0.3, 0.5, 0.7],
            "std": [0.01, 0.03, 0.05, 0.07],
            "n_records": [10, 10, 10, 10],
        }
    )
    table = seeds.aggregate_seeds(long, (*SSL_POINT_KEYS, "layer", "test", "statistic", "top_p"))
    assert table["statistic"].to_list() == ["gap", "target"] and table["n_seeds"].to_list() == [2, 2]
    assert table["value"].to_list() == pytest.approx([0.2, 0.6]) and table["std"].to_list() == pytest.approx(
        [0.02, 0.06]
    )


# --- paired_difference ---

X = [signed([1, 0, -1, 0]), signed([1, 1, 1, -1])]
Y = [signed([0, 0, -1, -1]), signed([1, -1, 0, 0])]


def test_paired_difference_by_hand():
    # d = w_X − w_Y: seed 0 [1, 0, 0, 1], seed 1 [0, 2, 1, −1]; mean 4/8. Gaps: X 0 and 0.5, Y −0.5 and 0.
    result = seeds.paired_difference(X, Y, "PPG", "all", n_boot=200, seed=0)
    assert result["difference"] == 0.5
    assert (result["n_seeds"], result["n_records"], result["n_boot"]) == (2, 4, 200)
    assert result["ci_low"] <= 0.5 <= result["ci_high"]
    # top_n holds the sides swapped: every sign flips, and so does the difference
    assert seeds.paired_difference(X, Y, "PRG", "top_n", 10, 0)["difference"] == -0.5


def test_records_are_aligned_by_id_not_by_row():
    shuffled = records([0.75, 0.5, 0.25, 0.5][::-1], [0.5] * 4, ids=["r3", "r2", "r1", "r0"])
    assert seeds.paired_difference([shuffled], [X[0]], "PFG", "all", 10, 0)["difference"] == 0


def test_points_are_compared_on_the_records_both_hold_and_disjoint_ones_refused():
    # x9 replaces r3 in Y's seed 1: only r0-r2 are in every table; d over them: seed 0 [1, 0, 0], seed 1 [0, 2, 1]
    other = records([0.75, 0.5, 0.25, 0.5], [0.5] * 4, ids=["r0", "r1", "r2", "x9"])
    partial = seeds.paired_difference(X, [Y[0], other], "PPG", "all", 10, 0)
    assert partial["n_records"] == 3
    disjoint = records([0.75, 0.5, 0.25, 0.5], [0.5] * 4, ids=["x0", "x1", "x2", "x9"])
    with pytest.raises(ValueError, match=r"mask~0\.3.*mask~0\.5.*share no id"):
        seeds.paired_difference(X, [Y[0], disjoint], "PPG", "all", 10, 0, names=("mask~0.3", "mask~0.5"))
    with pytest.raises(ValueError, match="same seeds"):
        seeds.paired_difference(X, Y[:1], "PPG", "all", 10, 0)


def test_the_interval_holds_the_difference_and_narrows_with_more_records():
    rng = np.random.default_rng(1)
    w_x, w_y = rng.integers(-1, 2, size=(2, 3, 50))
    frames = {n: [[signed(list(np.tile(row, n))) for row in w] for w in (w_x, w_y)] for n in (1, 16)}
    small = seeds.paired_difference(*frames[1], "PPG", "all", 400, 0)
    large = seeds.paired_difference(*frames[16], "PPG", "all", 400, 0)
    assert small["difference"] == pytest.approx(large["difference"])
    for result in (small, large):
        assert result["ci_low"] < result["difference"] < result["ci_high"]
    assert large["ci_high"] - large["ci_low"] < 0.6 * (small["ci_high"] - small["ci_low"])


def test_one_seed_is_the_record_bootstrap_and_blocks_do_not_change_its_law(monkeypatch):
    d = np.random.default_rng(2).integers(-2, 3, size=(1, 400))
    monkeypatch.setattr(seeds, "BLOCK_BYTES", 8 * 400 * 7)  # blocks of 7 resamples
    means = seeds._bootstrap(d, 2000, seed=3)
    assert len(means) == 2000
    assert means.std() == pytest.approx(d.std() / np.sqrt(400), rel=0.1)
    assert means.mean() == pytest.approx(d.mean(), abs=3 * d.std() / np.sqrt(400 * 2000))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.data())
def test_swapping_negates_and_identical_points_give_zero(n_seeds, n_records, data):
    signs = st.lists(st.integers(-1, 1), min_size=n_records, max_size=n_records)
    xs = [signed(data.draw(signs)) for _ in range(n_seeds)]
    ys = [signed(data.draw(signs)) for _ in range(n_seeds)]
    forward = seeds.paired_difference(xs, ys, "PPG", "all", 50, 7)
    backward = seeds.paired_difference(ys, xs, "PPG", "all", 50, 7)
    assert backward["difference"] == -forward["difference"]
    assert backward["ci_low"] == pytest.approx(-forward["ci_high"], abs=1e-12)
    assert backward["ci_high"] == pytest.approx(-forward["ci_low"], abs=1e-12)
    same = seeds.paired_difference(xs, xs, "PRG", "all", 50, 7)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0


# --- comparisons ---


def grid(masks=(0.0, 0.3, 0.5), temperatures=(None,), seed_values=(0, 1)) -> pl.DataFrame:
    points = [{"mask_ratio": m, "temperature": t, "seed": s} for m in masks for t in temperatures for s in seed_values]
    return summary_rows(points, [0.0] * len(points))


def point_records(table: pl.DataFrame, n_records: int = 6) -> dict[str, dict[str, pl.DataFrame]]:
    """Records per query set and point: the target model wins more often at a lower mask ratio (target set)."""
    by_queries = {}
    for queries in ("target", "holdout"):
        by_point = {}
        for row in table.iter_rows(named=True):
            rng = np.random.default_rng([row["seed"], int(10 * row["mask_ratio"])])
            edge = 0.2 * (1 - row["mask_ratio"]) if queries == "target" else 0.0
            by_point[row["point"]] = records(
                list(rng.uniform(size=n_records) + edge), list(rng.uniform(size=n_records))
            )
        by_queries[queries] = by_point
    return by_queries


def test_comparisons_pair_adjacent_values_with_the_other_keys_fixed():
    table = grid(temperatures=(None, 0.07))
    compared = seeds.comparisons(table, point_records(table), n_boot=20, seed=0)
    pairs = compared.select("parameter", "value_x", "value_y", "fixed").unique(maintain_order=True).rows()
    fixed = "n_train~all/epochs~2/temperature~{}/weight_decay~0.1"
    assert sorted(pairs) == sorted(
        [
            *[("temperature", "learned", "0.07", f"n_train~all/epochs~2/weight_decay~0.1/mask_ratio~{m}") for m in ("0.0", "0.3", "0.5")],
            *[("mask_ratio", x, y, fixed.format(t)) for t in ("learned", "0.07") for x, y in (("0.0", "0.3"), ("0.3", "0.5"))],
        ]
    )  # fmt: skip
    assert len(compared) == 7 * 2 * 3  # pairs × query sets × win gaps
    assert set(compared["queries"]) == {"target", "holdout"} and set(compared["metric"]) == {"PPG", "PRG", "PFG"}
    assert (
        set(compared["n_seeds"]) == {2} and set(compared["n_records"]) == {6} and set(compared["label_mode"]) == {"all"}
    )
    assert compared["separated"].to_list() == ((compared["ci_low"] > 0) | (compared["ci_high"] < 0)).to_list()
    COMPARISONS.conform(compared, "comparisons.parquet")


def test_comparisons_use_the_seeds_both_points_have():
    table = grid(masks=(0.0, 0.3)).filter(~((pl.col("mask_ratio") == 0.3) & (pl.col("seed") == 1)))
    compared = seeds.comparisons(table, point_records(table), n_boot=10, seed=0)
    assert set(compared["n_seeds"]) == {1}
    lone = grid(masks=(0.0, 0.3)).filter(pl.col("seed") == pl.when(pl.col("mask_ratio") == 0.3).then(1).otherwise(0))
    assert seeds.comparisons(lone, point_records(lone), n_boot=10, seed=0).is_empty()


def test_a_comparison_is_the_paired_difference_of_its_points():
    table = grid(masks=(0.0, 0.3))
    by_queries = point_records(table)
    row = seeds.comparisons(table, by_queries, n_boot=30, seed=5).row(0, named=True)
    assert (row["queries"], row["metric"]) == ("target", "PPG")
    points = {m: table.filter(pl.col("mask_ratio") == m).sort("seed")["point"] for m in (0.0, 0.3)}
    direct = seeds.paired_difference(
        *([by_queries["target"][p] for p in points[m]] for m in (0.0, 0.3)), "PPG", "all", 30, 5
    )
    assert {key: row[key] for key in direct} == direct


# --- command line ---


def test_the_cli_end_to_end(tmp_path):
    table = grid(masks=(0.0, 0.3))
    write_parquet(table, tmp_path / "summary.parquet", contract=SUMMARY, stage="summary")
    flags = []
    for queries, by_point in point_records(table).items():
        for number, (point, frame) in enumerate(by_point.items()):
            path = tmp_path / f"{queries}{number}.parquet"
            write_parquet(frame, path, contract=METRIC_RECORDS, stage="metrics")
            flags += [f"--{queries}-records", f"{point}={path}"]
    outputs = {
        "seeds": "seeds.parquet",
        "seeds-csv": "seeds.csv",
        "comparisons": "c.parquet",
        "comparisons-csv": "c.csv",
    }
    seeds.main(
        ["--summary", str(tmp_path / "summary.parquet"), *flags, "--n-boot", "25", "--seed", "1"]
        + [f"--out-{name}={tmp_path / file}" for name, file in outputs.items()]
    )
    over_seeds = SEED_SUMMARY.read(tmp_path / "seeds.parquet", extra=True)
    assert over_seeds["mask_ratio"].to_list() == [0.0, 0.3] and over_seeds["seeds"].to_list() == [[0, 1], [0, 1]]
    compared = COMPARISONS.read(tmp_path / "c.parquet")
    assert len(compared) == 6 and set(compared["n_boot"]) == {25}
    assert '"n_boot": 25' in read_metadata(tmp_path / "c.parquet")["dejavu:params"]
    assert read_metadata(tmp_path / "seeds.parquet")["dejavu:stage"] == "seeds"
    assert pl.read_csv(tmp_path / "seeds.csv")["seeds"].to_list() == ["0,1", "0,1"]
    assert pl.read_csv(tmp_path / "c.csv").height == 6


def test_the_cli_refuses_a_point_without_records(tmp_path):
    table = grid(masks=(0.0, 0.3))
    write_parquet(table, tmp_path / "summary.parquet", contract=SUMMARY, stage="summary")
    path = tmp_path / "r.parquet"
    write_parquet(signed([1, 0]), path, contract=METRIC_RECORDS, stage="metrics")
    one = table["point"][0]
    with pytest.raises(ValueError, match="no --target-records for point"):
        seeds.main(
            ["--summary", str(tmp_path / "summary.parquet"), "--target-records", f"{one}={path}"]
            + ["--holdout-records", f"{one}={path}", "--n-boot", "5", "--seed", "0"]
            + [f"--out-{name}={tmp_path / name}" for name in ("seeds", "seeds-csv", "comparisons", "comparisons-csv")]
        )


# --- the sweep figure ---


def two_seed_summary(tmp_path, seed_values=(0, 1), masks=(0.0, 0.3, 0.5)):
    points = [{"mask_ratio": m, "seed": s} for m in masks for s in seed_values]
    table = summary_rows(points, [0.1 * (i % 3) + 0.05 * i for i in range(len(points))])
    path = tmp_path / "summary.parquet"
    write_parquet(table, path, contract=SUMMARY, stage="summary")
    return table, path


def bands(figure) -> int:
    return sum(isinstance(c, PolyCollection) for axis in figure.axes for c in axis.collections)


def test_the_sweep_figure_shows_the_seed_spread(tmp_path):
    table, path = two_seed_summary(tmp_path)
    utility = ["A_scene_zero_shot"]
    figure = figures.sweep_figure(seeds.aggregate_seeds(table, POINT_KEYS), "mask_ratio", utility)
    assert "mean over 2 seeds" in figure.axes[0].get_title() and "band: seed min–max" in figure.axes[0].get_title()
    assert bands(figure) == 3 + 3 + 1  # the gaps, the net gaps, the utility
    assert len(figure.axes[0].get_legend().get_texts()) == 3  # the seed is no line group
    figures.make_sweep_figures(path, {"mask_ratio": [tmp_path / "mask.png"], "seed": [tmp_path / "seed.svg"]})
    assert (tmp_path / "mask.png").stat().st_size > 1000 and (tmp_path / "seed.svg").exists()


def test_one_seed_draws_no_band_and_a_seed_only_sweep_has_the_seed_on_x(tmp_path):
    table, path = two_seed_summary(tmp_path, seed_values=(0,))
    figure = figures.sweep_figure(seeds.aggregate_seeds(table, POINT_KEYS), "mask_ratio", ["A_scene_zero_shot"])
    assert bands(figure) == 0 and figure.axes[0].get_title() == "target records: value ± bootstrap std"
    table, path = two_seed_summary(tmp_path, seed_values=(0, 1, 2), masks=(0.0,))
    figure = figures.sweep_figure(table, "seed", ["A_scene_zero_shot"])
    assert list(figure.axes[0].lines[0].get_xdata()) == [0, 1, 2] and bands(figure) == 0
    figures.make_sweep_figures(path, {"seed": [tmp_path / "seed.png"]})
    assert (tmp_path / "seed.png").stat().st_size > 1000
