"""The SSL metric stage (workflow_scripts/metrics/ssl.py, ssl_main.py) against hand-computed values, and its figures.

The worked example is docs/DESIGN.md §9's: four crops (a1, a2 in A; b1, b2 in B), k = 3, labels cat < dog < fox.
"""

import math
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from workflow_scripts.contracts import (
    AGREEMENT,
    SSL_AGREEMENT_POPULATION,
    SSL_POPULATION,
    SSL_PREDICTIONS,
    SSL_RECORDS,
    SSL_SAMPLE_LEVEL,
)
from workflow_scripts.io import DataError, read_metadata, write_parquet
from workflow_scripts.metrics.ssl import (
    CROP_SETS,
    MODELS,
    REFERENCE_KEYS,
    TARGET_KEYS,
    SSLMetricParams,
    cutoffs,
    evaluate,
    records_table,
    sample_level,
    vote,
)
from workflow_scripts.metrics.ssl_main import main
from workflow_scripts.ssl import agreement as ssl_agreement
from workflow_scripts.ssl import figures
from workflow_scripts.ssl import summary as ssl_summary
from workflow_scripts.ssl.predictions import apportion, predictions_table

LN2, LN3 = math.log(2), math.log(3)
H_TWO_ONE = LN3 - 2 / 3 * LN2  # entropy of the vote shares (2/3, 1/3)

# crop set -> record -> (label, {model: its 3 neighbours' labels, nearest first})
EXAMPLE = {
    "A": {
        "a1": ("cat", {"A": "cat cat cat", "B": "dog fox cat"}),
        "a2": ("dog", {"A": "dog fox fox", "B": "dog dog fox"}),
    },
    "B": {
        "b1": ("fox", {"A": "cat cat fox", "B": "fox fox cat"}),
        "b2": ("cat", {"A": "cat dog fox", "B": "cat cat cat"}),
    },
    "holdout": {
        "h1": ("cat", {"A": "cat cat dog", "B": "cat cat dog"}),
        "h2": ("dog", {"A": "cat dog dog", "B": "cat dog dog"}),
    },
}
VOCABULARY = ["cat", "dog", "fox"]


def coded(names: str) -> np.ndarray:
    """The codes of space-separated label names."""
    return np.array([VOCABULARY.index(name) for name in names.split()], np.int64)


def example_votes(example=EXAMPLE, vocabulary=VOCABULARY):
    """(sets, votes) of an example: sets[crop set] = (id, label) in id order, votes[crop set][model]."""
    sets, votes = {}, {}
    for crop_set, records in example.items():
        ids = sorted(records)
        truth = np.array([vocabulary.index(records[i][0]) for i in ids], np.int64)
        sets[crop_set] = pl.DataFrame({"id": ids, "label": [records[i][0] for i in ids]})
        votes[crop_set] = {
            model: vote(np.array([[vocabulary.index(x) for x in records[i][1][model].split()] for i in ids]), truth)
            for model in MODELS
        }
    return sets, votes


def two_model(votes) -> tuple[dict, dict]:
    """The two-model test's (target, reference) votes by MODEL:CROPSET: each model's votes on each crop set."""
    by_key = {f"{model}:{crop_set}": votes[crop_set][model] for crop_set in votes for model in MODELS}
    return {key: by_key[key] for key in TARGET_KEYS}, {key: by_key[key] for key in REFERENCE_KEYS}


def population(votes, params):
    return evaluate(*two_model(votes), params)[1]


def stat(table: pl.DataFrame, statistic: str, top_p: float = 100.0, prediction: str = "top1", column="value"):
    rows = table.filter(
        (pl.col("prediction") == prediction) & (pl.col("statistic") == statistic) & (pl.col("top_p") == top_p)
    )
    return rows[column].item()


# --- votes ---


def test_vote_predicts_the_most_voted_label_ties_by_the_nearest_and_scores_entropy():
    labels = np.array([coded("cat cat dog"), coded("dog fox cat"), coded("fox fox fox")])
    votes = vote(labels, coded("cat fox dog"))
    assert votes.predicted.tolist() == coded("cat dog fox").tolist()  # a three-way tie: the nearest, dog
    np.testing.assert_allclose(votes.vote_share, [2 / 3, 1 / 3, 1.0])
    np.testing.assert_allclose(votes.entropy, [H_TWO_ONE, LN3, 0.0])
    assert votes.correct.tolist() == [[True, False, False], [True, True, False]]  # top-1, top-5


def test_a_tie_goes_to_the_nearest_tied_label_not_the_first_name():
    # fox and cat have two votes each; fox's nearest is at rank 0, cat's at rank 1; dog, nearer than cat, has one
    votes = vote(np.array([coded("fox cat dog cat fox")]), coded("cat"))
    assert votes.predicted.tolist() == coded("fox").tolist() and not votes.correct[0, 0]


def test_equal_vote_profiles_have_bit_equal_entropies_whatever_the_labels_order():
    labels = np.array([[0, 0, 1, 2, 2, 2], [2, 1, 1, 1, 0, 0], [1, 2, 0, 1, 0, 1]])
    entropy = vote(labels, np.zeros(3, np.int64)).entropy
    assert entropy[0] == entropy[1] == entropy[2]


def test_top5_holds_the_five_most_voted_labels():
    labels = np.array([[0, 1, 2, 3, 4, 5]] * 2)  # six labels, one vote each: ranked by nearness
    assert vote(labels, np.array([4, 5])).correct[1].tolist() == [True, False]


def test_top_p_counts_the_ceiling_in_exact_arithmetic():
    assert cutoffs((7.0, 25.0, 100.0), 100).tolist() == [7, 25, 100]  # 0.07 · 100 is 7.000000000000001 in floats
    assert cutoffs((5.0, 25.0, 50.0), 2).tolist() == [1, 1, 1]  # DejaVu's int(p/100 · n) would keep none
    assert cutoffs((12.5,), 9).tolist() == [2]


# --- the worked example (docs/DESIGN.md §9) ---


def check_example_population(table: pl.DataFrame) -> None:
    for top_p, target, reference in ((25.0, 1.0, 0.5), (50.0, 1.0, 0.5), (100.0, 0.75, 0.5)):
        assert stat(table, "target", top_p) == target and stat(table, "reference", top_p) == reference
        assert stat(table, "gap", top_p) == target - reference
        assert stat(table, "gap", top_p, "top5") == 0.0
        assert stat(table, "holdout_gap", top_p) == 0.0 and stat(table, "holdout_target", top_p) == 1.0
    shares = {q: stat(table, q) for q in ("memorized", "correlated", "forgotten", "misrepresented")}
    assert shares == {"memorized": 0.5, "correlated": 0.25, "forgotten": 0.25, "misrepresented": 0.0}
    assert stat(table, "correlated", prediction="top5") == 1.0
    assert stat(table, "target", 25.0, column="n_records") == 4 and stat(table, "holdout_gap", column="n_records") == 2


def test_the_worked_example_by_hand():
    sets, votes = example_votes()
    params = SSLMetricParams(k=3, top_p=(25, 50, 100), n_boot=0)
    pairs, table = evaluate(*two_model(votes), params)
    check_example_population(table)
    assert table["k"].unique().to_list() == [3] and table["mean"].is_nan().all()
    records = records_table(sets, pairs, pl.Series(VOCABULARY))
    assert records["id"].to_list() == ["a1", "a2", "b1", "b2", "h1", "h2"]
    assert records["target_model"].to_list()[:4] == ["A", "A", "B", "B"]
    assert sorted(records["target_model"].to_list()[4:]) == ["A", "B"]  # one holdout half each
    a1 = records.row(0, named=True)
    assert (a1["predicted_target"], a1["vote_share_target"], a1["entropy_target"]) == ("cat", 1.0, 0.0)
    assert a1["correct_top1_target"] and records.columns == SSL_RECORDS.names
    assert (a1["predicted_reference"], a1["correct_top1_reference"], a1["correct_top5_reference"]) == (
        "dog",
        False,
        True,
    )
    assert a1["vote_share_reference"] == pytest.approx(1 / 3) and a1["entropy_reference"] == pytest.approx(LN3)
    b1 = records.row(2, named=True)  # on B the target is f_B: fox fox cat
    assert (b1["predicted_target"], b1["predicted_reference"]) == ("fox", "cat")
    memorized = sample_level(records)
    assert memorized.select("rank", "id", "crop_set").rows() == [(1, "a1", "A"), (2, "b1", "B")]
    assert memorized["entropy_gap"].to_list() == pytest.approx([LN3, 0.0])
    assert memorized.columns == SSL_SAMPLE_LEVEL.names


# --- planted sets: the gaps known by construction ---


def planted(n: int = 20) -> dict[str, dict]:
    """Sets of n crops (labels w, x, y, z by turns), k = 4. The target: right and unanimous on crops 0–4, right on a
    four-way tie on 5–9, wrong on a four-way tie on 10–19. The reference: right with votes (2, 1, 1) on 5–9, wrong
    with votes (3, 1) on the rest, its most confident. The holdout: both models vote as a reference does."""
    names = "wxyz"

    def neighbours(i: int, role: str) -> str:
        t, x, y, z = names[i % 4], *(c for c in names if c != names[i % 4])
        if role == "target":
            return " ".join([t] * 4 if i < 5 else [t, x, y, z] if i < 10 else [x, t, y, z])
        return " ".join([t, t, x, y] if 5 <= i < 10 else [x, x, x, t])

    example = {}
    for crop_set in CROP_SETS:
        example[crop_set] = {}
        for i in range(n):
            roles = {m: "target" if m == crop_set else "reference" for m in MODELS}
            example[crop_set][f"{crop_set}{i:02d}"] = (names[i % 4], {m: neighbours(i, r) for m, r in roles.items()})
    return example


def test_planted_sets_give_the_gaps_built_in():
    _, votes = example_votes(planted(), list("wxyz"))
    table = population(votes, SSLMetricParams(k=4, top_p=(25, 50, 100), n_boot=20, frac=0.5, seed=3))
    # all: target right on 10 of 20, reference on 5; top 25 % (5 crops) and 50 % (10): the target's unanimous
    # and then its lowest ids (right); the reference's (3, 1) votes, its lowest ids first (wrong)
    for top_p, target, reference in ((25.0, 1.0, 0.0), (50.0, 1.0, 0.0), (100.0, 0.5, 0.25)):
        assert (stat(table, "target", top_p), stat(table, "reference", top_p)) == (target, reference)
        assert stat(table, "gap", top_p) == target - reference
        assert stat(table, "holdout_gap", top_p) == 0.0 and stat(table, "holdout_gap", top_p, column="std") == 0.0
    assert {q: stat(table, q) for q in ("memorized", "correlated", "forgotten", "misrepresented")} == {
        "memorized": 0.25,
        "correlated": 0.25,
        "forgotten": 0.0,
        "misrepresented": 0.5,
    }
    assert stat(table, "gap", 25.0, column="mean") > 0.5 and stat(table, "gap", 100.0, column="std") > 0


def test_holdout_halves_are_drawn_by_the_seed():
    # f_A right on h0, h1 only; f_B never: "target" = acc_A(H1)/2, "reference" = acc_A(H2)/2
    records = {f"h{i}": ("cat", {"A": "cat cat dog" if i < 2 else "dog dog cat", "B": "dog dog dog"}) for i in range(4)}
    _, votes = example_votes({**EXAMPLE, "holdout": records})
    gaps = set()
    for seed in range(6):
        shuffled = np.random.default_rng(seed).permutation(4)
        first = np.sort(shuffled[:2])
        right_in_first = np.isin(first, [0, 1]).sum() / 2
        expected = (right_in_first / 2, (1 - right_in_first) / 2)
        table = population(votes, SSLMetricParams(k=3, n_boot=0, seed=seed))
        assert (stat(table, "holdout_target"), stat(table, "holdout_reference")) == expected
        assert table.equals(population(votes, SSLMetricParams(k=3, n_boot=0, seed=seed)))
        gaps.add(stat(table, "holdout_gap"))
    assert len(gaps) > 1  # the halves do follow the seed


def test_the_bootstrap_is_seeded_and_resamples_each_set():
    _, votes = example_votes(planted(), list("wxyz"))
    params = SSLMetricParams(k=4, top_p=(100,), n_boot=50, frac=0.5, seed=7)
    table = population(votes, params)
    assert table.equals(population(votes, params))
    assert not table.equals(population(votes, SSLMetricParams(k=4, top_p=(100,), n_boot=50, frac=0.5, seed=8)))
    # by hand: the halves' permutation comes first, then A's draws, then B's (10 of 20 each)
    rng = np.random.default_rng(7)
    rng.permutation(20)
    on_a, on_b = rng.integers(0, 20, (50, 10)), rng.integers(0, 20, (50, 10))
    target = (votes["A"]["A"].correct[0][on_a].mean(axis=1) + votes["B"]["B"].correct[0][on_b].mean(axis=1)) / 2
    assert stat(table, "target", column="mean") == pytest.approx(target.mean())
    assert stat(table, "target", column="std") == pytest.approx(target.std(ddof=1))
    assert table["n_boot"].unique().to_list() == [50] and table["frac"].unique().to_list() == [0.5]


def test_an_empty_holdout_gives_nan_and_draws_nothing():
    _, votes = example_votes({**EXAMPLE, "holdout": {}})
    table = population(votes, SSLMetricParams(k=3, n_boot=1))
    assert math.isnan(stat(table, "holdout_gap")) and stat(table, "holdout_gap", column="n_records") == 0
    assert stat(table, "gap") == 0.25 and math.isnan(stat(table, "gap", column="std"))  # one resample: no std


# --- the files and the CLI ---


def write(table, path) -> str:
    pq.write_table(pa.table(table) if isinstance(table, dict) else table, path)
    return str(path)


def example_files(tmp_path, example=EXAMPLE) -> dict:
    """The example's inputs on disk (one crop dropped, public ids p-LABEL-RANK, images for the figures)."""
    (tmp_path / "images").mkdir(parents=True)
    ids = [i for records in example.values() for i in records]
    public = [f"p-{label}-{rank}" for label in VOCABULARY for rank in range(3)]
    for n, name in enumerate([*ids, *public, "a9"]):
        Image.new("RGB", (24, 16), ((40 * n) % 256, 90, 160)).save(tmp_path / "images" / f"{name}.png")
    labels = [records[i][0] for records in example.values() for i in records] + [p.split("-")[1] for p in public]
    every = [*ids, *public]
    files = {"records": tmp_path / "records.parquet", "crops": tmp_path / "crops.parquet"}
    write(
        {"id": every, "image_path": [f"images/{i}.png" for i in every], "captions": [[]] * len(every)}, files["records"]
    )
    pl.read_parquet(files["records"]).with_columns(label=pl.Series(labels)).write_parquet(files["records"])
    box = pa.array([2] * len(ids) + [None], pa.int32())
    crops = {"id": [*ids, "a9"], "label": [*labels[: len(ids)], "cat"], "x_min": box, "y_min": box}
    crops |= {"x_max": pa.array([12] * len(ids) + [None], pa.int32()), "y_max": pa.array([9] * len(ids) + [None])}
    write(crops | {"drop_reason": [None] * len(ids) + ["box covers the image"]}, files["crops"])
    for crop_set, records in example.items():
        members = [*records, "a9"] if crop_set == "A" else list(records)
        files[crop_set] = write({"id": members}, tmp_path / f"{crop_set}.parquet")
        for model in MODELS:
            rows = [(i, r, f"p-{x}-{r}") for i in records for r, x in enumerate(records[i][1][model].split())]
            files[f"{model}:{crop_set}"] = neighbours_file(rows, tmp_path / f"{model}_{crop_set}.parquet")
    return {name: str(path) for name, path in files.items()}


def neighbours_file(rows, path) -> str:
    query, rank, public = zip(*rows)
    score = pa.array([1.0 - 0.1 * r for r in rank], pa.float32())
    return write({"query_id": query, "rank": pa.array(rank, pa.int16()), "public_id": public, "score": score}, path)


def cli_arguments(files: dict, out, k: int = 3) -> list[str]:
    arguments = ["--crops", files["crops"], "--records", files["records"], "--label-column", "label"]
    arguments += [item for s in CROP_SETS for item in ("--split", f"{s}={files[s]}")]
    arguments += [item for key in TARGET_KEYS for item in ("--target", f"{key}={files[key]}")]
    references = {key: files.get(f"reference {key}", files[key]) for key in REFERENCE_KEYS}  # default: two-model
    arguments += [item for key, file in references.items() for item in ("--reference", f"{key}={file}")]
    arguments += ["--k", str(k), "--top-p", "25", "50", "100", "--n-boot", "10", "--frac", "1", "--seed", "0"]
    tables = ("records", "population", "sample_level")
    return arguments + [item for t in tables for item in (f"--{t.replace('_', '-')}-out", f"{out}/{t}.parquet")]


def test_the_cli_writes_the_three_tables(tmp_path):
    files = example_files(tmp_path)
    command = [sys.executable, "-m", "workflow_scripts.metrics.ssl", *cli_arguments(files, tmp_path / "out")]
    subprocess.run(command, check=True, capture_output=True)
    records = SSL_RECORDS.read(tmp_path / "out/records.parquet")
    assert records["id"].to_list() == ["a1", "a2", "b1", "b2", "h1", "h2"]  # the dropped crop a9 is no query
    assert records["crop_set"].to_list() == ["A", "A", "B", "B", "holdout", "holdout"]
    table = SSL_POPULATION.read(tmp_path / "out/population.parquet")
    check_example_population(table)
    assert stat(table, "holdout_gap", column="std") == 0.0
    assert SSL_SAMPLE_LEVEL.read(tmp_path / "out/sample_level.parquet")["id"].to_list() == ["a1", "b1"]
    assert read_metadata(tmp_path / "out/population.parquet")["dejavu:stage"] == "ssl_metrics"


def run_with(tmp_path, change) -> None:
    """The CLI on the example's files after `change(files)` edits them."""
    files = example_files(tmp_path)
    change(files)
    main(cli_arguments(files, tmp_path / "out"))


def test_a_crop_with_fewer_than_k_neighbours_of_rank_below_k_is_refused(tmp_path):
    # a1 lists ranks 0, 1, 3 and 4: three rows would pass a "first k rows" reading; only two are of rank < 3
    rows = [("a1", 0, "p-cat-0"), ("a1", 1, "p-cat-1"), ("a1", 3, "p-dog-0"), ("a1", 4, "p-dog-1")]
    rows += [("a2", r, f"p-dog-{r}") for r in range(3)]
    with pytest.raises(DataError, match=r"A_A\.parquet: 1 kept crop\(s\) of set A with fewer than k=3 .*e\.g\. a1$"):
        run_with(tmp_path, lambda files: neighbours_file(rows, files["A:A"]))


def test_a_public_id_without_a_label_is_refused_naming_the_records_and_the_id(tmp_path):
    def unlabel(files):
        records = pl.read_parquet(files["records"])
        records.with_columns(label=pl.when(pl.col("id") == "p-fox-2").then(None).otherwise("label")).write_parquet(
            files["records"]
        )

    with pytest.raises(DataError, match=r"records\.parquet: 1 public id\(s\) without a label .*e\.g\. p-fox-2$"):
        run_with(tmp_path, unlabel)


A1, A2 = ([(i, r, f"p-{label}-{r}") for r in range(3)] for i, label in (("a1", "cat"), ("a2", "dog")))
NOT_KEPT = [("a9", r, "p-cat-0") for r in range(3)]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([*A1, *A2, *NOT_KEPT], r"A_A\.parquet: 1 query id\(s\) that are not kept crops of set A, e\.g\. a9$"),
        ([*(("a1", r, "p-cat-0") for r in (0, 1, 1, 2)), *A2], r"A_A\.parquet: 1 query id\(s\) listing a rank twice"),
        ([*(("a1", r, "p-zebra-0") for r in range(3)), *A2], r"records\.parquet: 1 public id\(s\) .* p-zebra-0$"),
        ([*A1, *A2, ("a1", -1, "p-cat-0")], r"A_A\.parquet: 1 query id\(s\) with a negative rank, e\.g\. a1$"),
    ],
)
def test_bad_neighbours_are_refused_naming_the_file_and_id(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        run_with(tmp_path, lambda files: neighbours_file(rows, files["A:A"]))


def test_a_kept_crop_without_neighbours_and_ids_in_two_splits_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"A_A\.parquet: 1 kept crop\(s\) of set A with fewer .*e\.g\. a2$"):
        run_with(tmp_path / "one", lambda files: neighbours_file(A1, files["A:A"]))
    with pytest.raises(DataError, match=r"1 id\(s\) in two split files, e\.g\. b1$"):
        run_with(tmp_path / "two", lambda files: write({"id": ["h1", "h2", "b1"]}, files["holdout"]))


def test_the_cli_wants_every_neighbours_file(tmp_path):
    arguments = cli_arguments(example_files(tmp_path), tmp_path / "out")
    at = arguments.index("--reference")
    with pytest.raises(SystemExit):
        main(arguments[:at] + arguments[at + 2 :])


# --- figures ---


def test_the_figures_are_written_in_both_formats(tmp_path):
    files = example_files(tmp_path)
    main(cli_arguments(files, tmp_path / "out"))
    out = tmp_path / "figures"
    population_file = str(tmp_path / "out/population.parquet")
    figures.main(["accuracy", "--population", population_file, "--out", f"{out}/a.png", f"{out}/a.svg"])
    qualitative = ["qualitative", "--records", str(tmp_path / "out/records.parquet"), "--crops", files["crops"]]
    qualitative += ["--images-records", files["records"], "--public-records", files["records"]]
    qualitative += ["--neighbors-target", files["A:A"], "--neighbors-reference", files["B:A"], "--n-neighbors", "3"]
    figures.main([*qualitative, "--out", f"{out}/q.png", f"{out}/q.svg"])
    for name in ("a.png", "q.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    for name in ("a.svg", "q.svg"):
        assert b"<svg" in (out / name).read_bytes()[:1000]


# --- summary ---


def test_summary_keeps_top1_rows_with_the_point_and_layer(tmp_path):
    files = {}
    for point, gap in (("method~simclr/epochs~100/seed~0", 0.1), ("method~simclr/epochs~400/seed~0", 0.3)):
        rows = [
            {"prediction": prediction, "statistic": "gap", "top_p": 20.0, "value": gap + (prediction == "top5")}
            for prediction in ("top1", "top5")
        ]
        table = pl.DataFrame(rows).with_columns(mean=pl.col("value"), std=pl.lit(0.01), n_boot=pl.lit(10))
        table = table.with_columns(frac=pl.lit(1.0), n_records=pl.lit(8), k=pl.lit(3))
        path = tmp_path / f"{gap}.parquet"
        write_parquet(table, path, stage="test", params={}, contract=SSL_POPULATION)
        files[f"{point}/projector/two_model"] = str(path)
    out = tmp_path / "summary.parquet"
    ssl_summary.main(
        [arg for key, file in files.items() for arg in ("--population", f"{key}={file}")]
        + ["--out", str(out), "--out-csv", str(tmp_path / "summary.csv")]
    )
    table = pl.read_parquet(out)
    assert table.select("epochs", "layer", "statistic", "value").rows() == [
        (100, "projector", "gap", 0.1),
        (400, "projector", "gap", 0.3),
    ]
    assert table["test"].to_list() == ["two_model"] * 2
    assert table["method"].to_list() == ["simclr"] * 2 and (tmp_path / "summary.csv").read_text().count("\n") == 3


# --- one-model references: a classifier's distribution as k votes ---


def test_a_classifier_distribution_becomes_k_votes_by_largest_remainders():
    probabilities = np.array([[0.5, 0.3, 0.2], [0.34, 0.33, 0.33], [0.1, 0.45, 0.45], [0.0, 0.0, 1.0]])
    # k = 4: quotas (2, 1.2, 0.8) -> floors (2, 1, 0), the one vote left to the largest remainder, fox;
    # (1.36, 1.32, 1.32) -> (1, 1, 1) + cat. k = 3 on the third: (0.3, 1.35, 1.35) -> (0, 1, 1), the vote left to
    # the tied remainders' lower index, dog; one-hot: every vote.
    assert apportion(probabilities[:2], 4).tolist() == [[0, 0, 1, 2], [0, 0, 1, 2]]
    assert apportion(probabilities[2:], 3).tolist() == [[1, 1, 2], [2, 2, 2]]
    table = predictions_table(["a", "b", "c", "d"], probabilities, VOCABULARY, 3)
    assert table["predicted"].to_list() == ["cat", "cat", "dog", "fox"] and table.columns == SSL_PREDICTIONS.names
    assert table["probability"].to_list() == [0.5, 0.34, 0.45, 1.0] and table["entropy"][3] == 0.0
    assert table["entropy"][0] == pytest.approx(-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_apportioned_votes_are_k_and_within_one_of_each_quota(n_classes, k, seed):
    probabilities = np.random.default_rng(seed).dirichlet(np.ones(n_classes), size=5)
    votes = apportion(probabilities, k)
    counts = np.stack([np.bincount(row, minlength=n_classes) for row in votes])
    assert votes.shape == (5, k) and (np.abs(counts - k * probabilities) < 1).all()
    assert (np.diff(counts[np.arange(5)[:, None], votes], axis=1) <= 0).all()  # most votes first


ONE_MODEL_REFERENCE = {  # MODEL:CROPSET -> {id: the reference classifier's distribution over cat, dog, fox}
    "B:A": {"a1": (0.2, 0.7, 0.1), "a2": (0.0, 1.0, 0.0)},
    "A:B": {"b1": (1.0, 0.0, 0.0), "b2": (1.0, 0.0, 0.0)},
    "B:holdout": {"h1": (1.0, 0.0, 0.0), "h2": (0.0, 1.0, 0.0)},
    "A:holdout": {"h1": (1.0, 0.0, 0.0), "h2": (0.0, 1.0, 0.0)},
}


def predictions_files(tmp_path, reference=ONE_MODEL_REFERENCE, k=3) -> dict[str, str]:
    files = {}
    for key, by_id in reference.items():
        table = predictions_table(list(by_id), np.array(list(by_id.values())), VOCABULARY, k)
        files[f"reference {key}"] = str(tmp_path / f"predictions_{key.replace(':', '_')}.parquet")
        write_parquet(table, files[f"reference {key}"], stage="test", params={}, contract=SSL_PREDICTIONS)
    return files


def test_a_one_model_test_scores_a_classifier_reference_by_hand(tmp_path):
    # a1 (cat): k·p = (0.6, 2.1, 0.3) -> dog, dog, cat: wrong, share 2/3; a2: dog x 3, right. On B: cat x 3, wrong
    # on b1 (fox), right on b2. Targets (the example's f_A on A, f_B on B): a1 right, a2 wrong, b1 and b2 right.
    files = {**example_files(tmp_path), **predictions_files(tmp_path)}
    main([*cli_arguments(files, tmp_path / "out"), "--reference-kind", "predictions"])
    table = SSL_POPULATION.read(tmp_path / "out/population.parquet")
    assert (stat(table, "target"), stat(table, "reference"), stat(table, "gap")) == (0.75, 0.5, 0.25)
    shares = {q: stat(table, q) for q in ("memorized", "correlated", "forgotten", "misrepresented")}
    assert shares == {"memorized": 0.5, "correlated": 0.25, "forgotten": 0.25, "misrepresented": 0.0}
    records = SSL_RECORDS.read(tmp_path / "out/records.parquet")
    a1 = records.row(0, named=True)
    assert (a1["predicted_reference"], a1["vote_share_reference"]) == ("dog", pytest.approx(2 / 3))
    memorized = SSL_SAMPLE_LEVEL.read(tmp_path / "out/sample_level.parquet")
    assert memorized["id"].to_list() == ["a1", "b1"]
    assert memorized["entropy_gap"].to_list() == pytest.approx([H_TWO_ONE, -H_TWO_ONE])


@pytest.mark.parametrize(
    "reference, k, message",
    [
        ({**ONE_MODEL_REFERENCE, "B:A": {"a1": (1.0, 0.0, 0.0)}}, 3, r"1 kept crop\(s\) of set A without a .*a2$"),
        ({**ONE_MODEL_REFERENCE, "B:A": {**ONE_MODEL_REFERENCE["B:A"], "b1": (1, 0, 0)}}, 3, r"not kept crops .*b1$"),
        (ONE_MODEL_REFERENCE, 4, r"predictions_B_A\.parquet: 2 prediction\(s\) without exactly k=3 votes"),
    ],
)
def test_bad_predictions_are_refused_naming_the_file_and_id(tmp_path, reference, k, message):
    files = {**example_files(tmp_path), **predictions_files(tmp_path, reference, k)}
    with pytest.raises(DataError, match=message):
        main([*cli_arguments(files, tmp_path / "out"), "--reference-kind", "predictions"])


def test_the_tests_side_by_side_agree_as_counted_by_hand(tmp_path):
    # Two-model flags (target right, reference wrong) on a1, a2, b1, b2: T F T F. The one-model reference is
    # right on b1 here: T F F F. Agreement 3/4, Jaccard 1/2; the one-model gap (0.75 − 0.75) is 0.
    files = example_files(tmp_path)
    right_on_b1 = {**ONE_MODEL_REFERENCE, "A:B": {"b1": (0.0, 0.0, 1.0), "b2": (1.0, 0.0, 0.0)}}
    one_model = {**files, **predictions_files(tmp_path, right_on_b1)}
    main(cli_arguments(files, tmp_path / "two_model"))
    main([*cli_arguments(one_model, tmp_path / "naive_bayes"), "--reference-kind", "predictions"])
    arguments = [
        item
        for test in ("two_model", "naive_bayes")
        for flag, table in (("records", "records"), ("population", "population"), ("sample-level", "sample_level"))
        for item in (f"--{flag}", f"{test}={tmp_path / test / table}.parquet")
    ]
    out = tmp_path / "agreement"
    outputs = ["--out-agreement", f"{out}/a.parquet", "--out-population", f"{out}/p.parquet"]
    outputs += ["--out-heatmap", f"{out}/h.png", "--out-confidence", f"{out}/c.png", f"{out}/c.svg"]
    ssl_agreement.main([*arguments, *outputs])
    agreement = AGREEMENT.read(out / "a.parquet").filter(pl.col("test_a") != pl.col("test_b"))
    assert agreement["agreement"].to_list() == [0.75, 0.75] and agreement["jaccard"].to_list() == [0.5, 0.5]
    assert agreement.select("n_flagged_a", "n_flagged_b", "n_both_flagged").row(0) == (2, 1, 1)
    side_by_side = SSL_AGREEMENT_POPULATION.read(out / "p.parquet").filter(pl.col("statistic") == "gap")
    gaps = dict(side_by_side.filter(pl.col("top_p") == 100.0).select("test", "value").iter_rows())
    assert gaps == {"two_model": 0.25, "naive_bayes": 0.0}
    for name in ("h.png", "c.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
