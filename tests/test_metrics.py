"""Metric definitions against hand-computed expectations, plus the laws they must obey."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from workflow_scripts.io import DataError
from workflow_scripts.metrics import MetricParams, definitions, encoding, plan, population, tables
from workflow_scripts.metrics import sample_level as sample_engine

PUBLIC = pl.DataFrame(
    {"id": ["p1", "p2", "p3", "p4"], "labels": [["a", "b"], ["b", "c"], ["d"], []]},
    schema={"id": pl.String, "labels": pl.List(pl.String)},
)
TRUTH = pl.DataFrame(
    {"id": ["q1", "q2", "q3", "q4"], "labels": [["a", "b", "e"], ["c"], [], ["b", "c"]]},
    schema={"id": pl.String, "labels": pl.List(pl.String)},
)


def neighbors(rows: dict[str, list[str]]) -> pl.DataFrame:
    data = [
        (query, rank, public, 1.0 - 0.1 * rank)
        for query, publics in rows.items()
        for rank, public in enumerate(publics)
    ]
    return pl.DataFrame(
        data,
        schema={"query_id": pl.String, "rank": pl.Int16, "public_id": pl.String, "score": pl.Float32},
        orient="row",
    )


def scores(rows, k=2, top_n=1) -> pl.DataFrame:
    frame = definitions.record_scores(neighbors(rows).lazy(), PUBLIC.lazy(), TRUTH.lazy(), k, top_n).collect()
    return frame.sort("id", "label_mode")


def row(frame, record_id, mode):
    return frame.filter((pl.col("id") == record_id) & (pl.col("label_mode") == mode)).row(0, named=True)


def test_record_scores_hand_computed():
    frame = scores({"q1": ["p1", "p2"], "q2": ["p4", "p3"], "q3": ["p1", "p2"], "q4": ["p4", "p4"]})
    q1 = row(frame, "q1", "all")  # predicted {a, b, c}, truth {a, b, e}
    assert (q1["n_predicted"], q1["n_correct"], q1["n_objects"]) == (3, 2, 3)
    assert q1["precision"] == pytest.approx(2 / 3) and q1["recall"] == pytest.approx(2 / 3)
    assert q1["f1"] == pytest.approx(2 / 3)
    assert q1["nn_score"] == pytest.approx(1.0)
    q1_top = row(frame, "q1", "top_n")  # b is carried by both neighbours: the single top label
    assert (q1_top["n_predicted"], q1_top["n_correct"]) == (1, 1)
    assert q1_top["precision"] == 1.0 and q1_top["recall"] == pytest.approx(1 / 3)
    assert q1_top["f1"] == pytest.approx(0.5)
    q2 = row(frame, "q2", "all")  # predicted {d}, truth {c}
    assert (q2["precision"], q2["recall"], q2["f1"]) == (0.0, 0.0, 0.0)


def test_empty_prediction_is_zero_not_nan():
    frame = scores({"q1": ["p4"], "q2": ["p4"], "q3": ["p4"], "q4": ["p4", "p4"]})
    q4 = row(frame, "q4", "all")
    assert q4["n_predicted"] == 0
    assert (q4["precision"], q4["recall"], q4["f1"]) == (0.0, 0.0, 0.0)


def test_record_without_objects_has_no_recall():
    q3 = row(scores({"q1": ["p1"], "q2": ["p1"], "q3": ["p1", "p2"], "q4": ["p1"]}), "q3", "all")
    assert q3["n_objects"] == 0 and q3["recall"] is None and q3["f1"] is None
    assert q3["precision"] == 0.0


def test_top_n_ties_break_by_nearest_rank_then_name():
    # q4: p2 (rank 0: b, c) then p1 (rank 1: a, b). Counts b=2, c=1 (best rank 0), a=1 (best rank 1).
    labels = definitions.predicted_labels(neighbors({"q4": ["p2", "p1"]}).lazy(), PUBLIC.lazy(), k=2, top_n=2)
    top = labels.filter(pl.col("label_mode") == "top_n").collect()["label"].to_list()
    assert top == ["b", "c"]
    # Equal count and rank: alphabetical.
    labels = definitions.predicted_labels(neighbors({"q1": ["p1"]}).lazy(), PUBLIC.lazy(), k=1, top_n=1)
    assert labels.filter(pl.col("label_mode") == "top_n").collect()["label"].to_list() == ["a"]


def test_k_limits_neighbours_used():
    frame = scores({"q1": ["p3", "p1"], "q2": ["p1"], "q3": ["p1"], "q4": ["p1"]}, k=1)
    assert row(frame, "q1", "all")["n_predicted"] == 1  # only p3's {d}


def test_duplicate_labels_in_one_image_count_once():
    public = pl.DataFrame({"id": ["x", "y"], "labels": [["a", "a", "a"], ["b"]]})
    truth = pl.DataFrame({"id": ["q"], "labels": [["a", "b"]]})
    nb = neighbors({"q": ["x", "y"]})
    frame = definitions.record_scores(nb.lazy(), public.lazy(), truth.lazy(), k=2, top_n=1).collect()
    assert frame.filter(pl.col("label_mode") == "all")["n_predicted"].item() == 2
    # a and b each come from one image; a's image is nearer, so a wins the single top slot.
    top = frame.filter(pl.col("label_mode") == "top_n").row(0, named=True)
    assert top["n_correct"] == 1


def test_win_gap_hand_computed():
    target = np.array([0.5, 0.2, 0.3, 0.3])
    reference = np.array([0.4, 0.5, 0.3, 0.1])
    assert definitions.win_gap(target, reference) == pytest.approx(0.25)  # (2 wins - 1 loss) / 4, one tie


def test_aucg_hand_computed():
    # F_A: 0 below 0.5, 1/2 on [0.5, 1); F_B: 1/2 below 0.5, 1 from 0.5: the CDFs differ by 1/2 on [0, 1).
    assert definitions.aucg(np.array([1.0, 0.5]), np.array([0.5, 0.0])) == pytest.approx(0.5)
    assert definitions.aucg(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == pytest.approx(0.0)
    assert definitions.aucg(np.array([1.0]), np.array([0.0])) == pytest.approx(1.0)
    # Crossing CDFs: areas of opposite sign cancel.
    assert definitions.aucg(np.array([0.0, 1.0]), np.array([0.5, 0.5])) == pytest.approx(0.0)


unit_arrays = st.integers(1, 40).flatmap(
    lambda n: st.tuples(*[arrays(np.float64, n, elements=st.floats(0, 1)) for _ in range(2)])
)


@given(unit_arrays)
@settings(max_examples=200, deadline=None)
def test_aucg_equals_mean_recall_difference(pair):
    target, reference = pair
    assert definitions.aucg(target, reference) == pytest.approx(target.mean() - reference.mean(), abs=1e-9)


@given(unit_arrays)
@settings(max_examples=200, deadline=None)
def test_swapping_models_negates_every_population_gap(pair):
    target, reference = pair
    assert definitions.win_gap(reference, target) == pytest.approx(-definitions.win_gap(target, reference))
    assert definitions.aucg(reference, target) == pytest.approx(-definitions.aucg(target, reference), abs=1e-12)


def test_aucg_is_batched_over_leading_axes():
    rng = np.random.default_rng(0)
    target, reference = rng.random((5, 30)), rng.random((5, 30))
    batched = definitions.aucg(target, reference)
    assert batched.shape == (5,)
    assert batched == pytest.approx([definitions.aucg(t, r) for t, r in zip(target, reference)])


def paired_frame(n=200, seed=0, shift=0.1):
    rng = np.random.default_rng(seed)
    base = {}
    for side, offset in (("target", shift), ("reference", 0.0)):
        base[f"precision_{side}"] = np.clip(rng.random(n) + offset, 0, 1)
        base[f"recall_{side}"] = np.clip(rng.random(n) + offset, 0, 1)
        base[f"f1_{side}"] = np.clip(rng.random(n) + offset, 0, 1)
    return pl.DataFrame({"id": [f"r{i}" for i in range(n)], "label_mode": "all", "n_objects": 3, **base})


def swap_sides(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.rename(
        {
            c: c.replace("_target", "_tmp").replace("_reference", "_target").replace("_tmp", "_reference")
            for c in frame.columns
        }
    )


def test_population_bootstrap_is_seeded_and_swap_negates():
    frame = paired_frame()
    first = definitions.population_metrics(frame, n_boot=50, frac=0.1, seed=3).filter(pl.col("label_mode") == "all")
    again = definitions.population_metrics(frame, n_boot=50, frac=0.1, seed=3).filter(pl.col("label_mode") == "all")
    assert first.equals(again)
    swapped = definitions.population_metrics(swap_sides(frame), n_boot=50, frac=0.1, seed=3).filter(
        pl.col("label_mode") == "all"
    )
    assert swapped["value"].to_numpy() == pytest.approx(-first["value"].to_numpy())
    assert swapped["mean"].to_numpy() == pytest.approx(-first["mean"].to_numpy())
    assert swapped["std"].to_numpy() == pytest.approx(first["std"].to_numpy())
    assert (first["n_records"] == 200).all() and (first["n_boot"] == 50).all()
    values = dict(zip(first["metric"], first["value"]))
    assert values["PPG"] > 0 and values["AUCG"] > 0


def test_population_excludes_records_without_objects():
    frame = paired_frame(n=10).with_columns(n_objects=pl.Series([0, 0] + [2] * 8))
    table = definitions.population_metrics(frame, n_boot=10, frac=0.5, seed=0).filter(pl.col("label_mode") == "all")
    assert (table["n_records"] == 8).all() and (table["n_excluded"] == 2).all()


def test_sample_level_hand_computed():
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            "label_mode": "top_n",
            "n_objects": [1, 1, 1],
            "nn_score_target": [0.9, 0.5, 0.7],
            "n_correct_target": [1, 3, 2],
            "n_correct_reference": [1, 0, 2],
            "precision_target": [0.5, 0.9, 0.1],
            "precision_reference": [0.3, 0.1, 0.4],
            "recall_target": [1.0, 1.0, 0.0],
            "recall_reference": [0.0, 0.0, 0.0],
            "f1_target": [0.2, 0.2, 0.2],
            "f1_reference": [0.1, 0.1, 0.1],
        }
    )
    table = definitions.sample_level(frame, top_l=[1, 2, 5])
    distance = table.filter(pl.col("order") == "distance").sort("top_l")  # order a, c, b
    assert distance["top_l"].to_list() == [1, 2, 3]
    assert distance["precision_gap"].to_list() == pytest.approx([0.2, (0.2 - 0.3) / 2, (0.2 - 0.3 + 0.8) / 3])
    correct = table.filter(pl.col("order") == "correct").sort("top_l")  # order b, c, a
    assert correct["recall_gap"].to_list() == pytest.approx([1.0, 0.5, 2 / 3])
    gap = table.filter(pl.col("order") == "gap")  # b (3), then a and c tie at 0: id order
    assert gap["oracle"].all() and not distance["oracle"].any()
    assert gap.sort("top_l")["precision_gap"].to_list()[:2] == pytest.approx([0.8, (0.8 + 0.2) / 2])


INPUTS = ("target_neighbors", "reference_neighbors", "query_annotations", "public_annotations", "queries")


def compute(*paths, out_dir=None, **options):
    """The engine, its inputs given by position or name and MetricParams built from the other keywords."""
    paths = (*paths, *[options.pop(name) for name in INPUTS[len(paths) :]])
    tables.compute(*paths, MetricParams(**options), out_dir=out_dir)


def write(frame: pl.DataFrame, path):
    frame.write_parquet(path)
    return str(path)


def test_compute_end_to_end_and_swap(tmp_path):
    nb_a = write(
        neighbors({"q1": ["p1", "p2"], "q2": ["p2", "p3"], "q3": ["p1", "p4"], "q4": ["p2", "p1"]}),
        tmp_path / "a.parquet",
    )
    nb_b = write(
        neighbors({"q1": ["p3", "p4"], "q2": ["p4", "p3"], "q3": ["p1", "p4"], "q4": ["p3", "p1"]}),
        tmp_path / "b.parquet",
    )
    truth = write(TRUTH, tmp_path / "truth.parquet")
    public = write(PUBLIC, tmp_path / "public.parquet")
    queries = write(pl.DataFrame({"id": ["q1", "q2", "q3", "q4"]}), tmp_path / "queries.parquet")
    common = dict(
        query_annotations=truth,
        public_annotations=public,
        queries=queries,
        k=2,
        top_n=2,
        top_l=[1, 2],
        n_boot=20,
        frac=0.5,
        seed=1,
    )
    compute(nb_a, nb_b, out_dir=tmp_path / "ab", **common)
    compute(nb_b, nb_a, out_dir=tmp_path / "ba", **common)
    ab = pl.read_parquet(tmp_path / "ab" / "population.parquet")
    ba = pl.read_parquet(tmp_path / "ba" / "population.parquet")
    assert ab["value"].to_numpy() == pytest.approx(-ba["value"].to_numpy())
    records = pl.read_parquet(tmp_path / "ab" / "records.parquet")
    assert records.height == 8  # 4 records x 2 label modes; q3 kept but excluded from the gaps
    assert (ab["n_excluded"] == 1).all()
    # q1: A predicts {a,b,c} (2 of 3 right), B predicts {d}; q2: A {b,c,d} vs B {d}; q4: A {a,b,c} vs B {a,b,d}.
    all_mode = ab.filter(pl.col("label_mode") == "all")
    assert dict(zip(all_mode["metric"], all_mode["value"]))["PRG"] == pytest.approx(1.0)


def test_compute_refuses_missing_neighbours(tmp_path):
    nb = write(neighbors({"q1": ["p1"]}), tmp_path / "nb.parquet")
    truth = write(TRUTH, tmp_path / "truth.parquet")
    public = write(PUBLIC, tmp_path / "public.parquet")
    queries = write(pl.DataFrame({"id": ["q1", "q2"]}), tmp_path / "queries.parquet")
    with pytest.raises(DataError, match="q2"):
        compute(
            nb,
            nb,
            truth,
            public,
            queries,
            out_dir=tmp_path / "out",
            k=1,
            top_n=1,
            top_l=[1],
            n_boot=5,
            frac=0.5,
            seed=0,
        )


def test_batched_metrics_equal_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    public_ids = [f"p{i}" for i in range(40)]
    public = pl.DataFrame(
        {"id": public_ids, "labels": [[f"c{j}" for j in rng.choice(8, 3, replace=False)] for _ in public_ids]}
    )
    truth = pl.DataFrame(
        {
            "id": [f"q{i}" for i in range(30)],
            "labels": [[f"c{j}" for j in rng.choice(8, 2, replace=False)] for _ in range(30)],
        }
    )
    paths = {}
    for side in ("a", "b"):
        paths[side] = write(
            neighbors({q: list(rng.choice(public_ids, 4, replace=False)) for q in truth["id"]}),
            tmp_path / f"{side}.parquet",
        )
    common = dict(
        query_annotations=write(truth, tmp_path / "truth.parquet"),
        public_annotations=write(public, tmp_path / "public.parquet"),
        queries=write(truth.select("id"), tmp_path / "queries.parquet"),
        k=4,
        top_n=2,
        top_l=[5, 10],
        n_boot=10,
        frac=0.5,
        seed=0,
    )
    compute(paths["a"], paths["b"], out_dir=tmp_path / "one", **common)
    compute(paths["a"], paths["b"], out_dir=tmp_path / "many", batch_rows=7, **common)  # 18 batches
    for table in ("records", "population", "sample_level"):
        assert pl.read_parquet(tmp_path / "one" / f"{table}.parquet").equals(
            pl.read_parquet(tmp_path / "many" / f"{table}.parquet")
        ), table


def metric_inputs(tmp_path, truth=TRUTH, public=PUBLIC, queries=None, nb=None):
    """Paths of a small valid input set, any part replaced by the caller."""
    nb = (
        nb
        if nb is not None
        else neighbors({"q1": ["p1", "p2"], "q2": ["p2", "p3"], "q3": ["p1", "p4"], "q4": ["p2", "p1"]})
    )
    queries = queries if queries is not None else pl.DataFrame({"id": ["q1", "q2", "q3", "q4"]})
    return dict(
        target_neighbors=write(nb, tmp_path / "nb.parquet"),
        reference_neighbors=str(tmp_path / "nb.parquet"),
        query_annotations=write(truth, tmp_path / "truth.parquet"),
        public_annotations=write(public, tmp_path / "public.parquet"),
        queries=write(queries, tmp_path / "queries.parquet"),
        out_dir=tmp_path / "out",
        k=2,
        top_n=1,
        top_l=[1],
        n_boot=5,
        frac=0.5,
        seed=0,
    )


def test_annotations_in_any_order_and_small_batches_give_the_same_tables(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    public_ids = [f"p{i}" for i in range(40)]
    public = pl.DataFrame(
        {
            "id": public_ids,
            "labels": [[f"c{j}" for j in rng.choice(9, rng.integers(0, 4), replace=False)] for _ in public_ids],
        }
    )
    truth = pl.DataFrame(
        {
            "id": [f"q{i}" for i in range(30)],
            "labels": [[f"c{j}" for j in rng.choice(9, rng.integers(0, 5))] for _ in range(30)],
        }
    )
    nb = write(
        neighbors({q: list(rng.choice(public_ids, 5, replace=False)) for q in truth["id"]}), tmp_path / "nb.parquet"
    )
    # Records of another split and a shuffled order: the queries' rows must still be found, each once.
    others = pl.DataFrame({"id": [f"x{i}" for i in range(7)], "labels": [["c1"]] * 7})
    shuffled = pl.concat([truth, others]).sample(fraction=1.0, shuffle=True, seed=2)
    common = dict(
        public_annotations=write(public, tmp_path / "public.parquet"),
        queries=write(truth.select("id"), tmp_path / "queries.parquet"),
        k=5,
        top_n=2,
        top_l=[5, 10],
        n_boot=10,
        frac=0.5,
        seed=0,
    )
    compute(nb, nb, query_annotations=write(truth, tmp_path / "truth.parquet"), out_dir=tmp_path / "one", **common)
    monkeypatch.setattr(plan, "ANNOTATION_BATCH_ROWS", 4)
    monkeypatch.setattr(tables, "RECORDS_BATCH_ROWS", 7)
    compute(
        nb, nb, query_annotations=write(shuffled, tmp_path / "shuffled.parquet"), out_dir=tmp_path / "many", **common
    )
    for table in ("records", "population", "sample_level"):
        assert pl.read_parquet(tmp_path / "one" / f"{table}.parquet").equals(
            pl.read_parquet(tmp_path / "many" / f"{table}.parquet")
        ), table


@pytest.mark.parametrize(
    "table, expected",
    [
        ("queries", "queries.parquet.*duplicate id.*q2"),
        ("truth", "truth.parquet.*more than once.*q2"),
        ("public", "public.parquet.*duplicate id.*p2"),
    ],
)
def test_compute_refuses_duplicate_ids(tmp_path, table, expected):
    replaced = {
        "queries": {"queries": pl.DataFrame({"id": ["q1", "q2", "q3", "q4", "q2"]})},
        "truth": {"truth": pl.concat([TRUTH, TRUTH.filter(pl.col("id") == "q2")])},
        "public": {"public": pl.concat([PUBLIC, PUBLIC.filter(pl.col("id") == "p2")])},
    }[table]
    with pytest.raises(DataError, match=expected):
        compute(**metric_inputs(tmp_path, **replaced))


def test_compute_refuses_query_records_without_annotations(tmp_path):
    with pytest.raises(
        DataError, match=r"truth.parquet: no annotation row for 1 query record.*queries.parquet.*\['q3'\]"
    ):
        compute(**metric_inputs(tmp_path, truth=TRUTH.filter(pl.col("id") != "q3")))


def test_compute_refuses_an_empty_query_set(tmp_path):
    with pytest.raises(DataError, match=r"queries\.parquet: no query records"):
        compute(**metric_inputs(tmp_path, queries=pl.DataFrame({"id": []}, schema={"id": pl.String})))


@pytest.mark.parametrize("table", ["truth", "public"])
def test_compute_refuses_labels_of_the_wrong_type(tmp_path, table):
    frame = {"truth": TRUTH, "public": PUBLIC}[table]
    as_text = frame.with_columns(pl.col("labels").list.join(","))
    with pytest.raises(
        DataError, match=f"{table}.parquet: annotations column.*'labels' is String, not list<item: string>"
    ):
        compute(**metric_inputs(tmp_path, **{table: as_text}))


def test_compute_refuses_neighbour_lists_shorter_than_k(tmp_path):
    inputs = metric_inputs(tmp_path)
    with pytest.raises(
        DataError, match=r"nb.parquet: 4 query record\(s\) with fewer than k = 5 neighbour ranks, e.g. \['q1: 2'"
    ):
        compute(**{**inputs, "k": 5})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_compute_refuses_non_finite_scores_naming_the_file_and_row(tmp_path, bad):
    nb = neighbors({"q1": ["p1", "p2"], "q2": ["p2", "p3"], "q3": ["p1", "p4"], "q4": ["p2", "p1"]})
    scores = nb["score"].to_list()
    scores[5] = bad  # q3's rank 1
    nb = nb.with_columns(score=pl.Series(scores, dtype=pl.Float32))
    with pytest.raises(DataError, match=r"nb\.parquet: 1 non-finite score\(s\).*first at row 5 \(query 'q3', rank 1\)"):
        compute(**metric_inputs(tmp_path, nb=nb))


def test_compute_refuses_a_query_whose_rows_are_apart(tmp_path):
    nb = neighbors({"q1": ["p1", "p2"], "q2": ["p2", "p3"], "q3": ["p1", "p4"], "q4": ["p2", "p1"]})
    apart = pl.concat([nb.slice(1), nb.slice(0, 1)])  # q1's rank 0 moved to the end
    with pytest.raises(DataError, match=r"nb\.parquet: the rows of query 'q1' are not together"):
        compute(**metric_inputs(tmp_path, nb=apart))


@given(st.integers(1, 60), st.integers(1, 25), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_resampled_metrics_equal_the_formulas_on_the_resampled_and_on_all_records_bit_for_bit(n, size, seed):
    rng = np.random.default_rng(seed)
    fractions = np.array([0.0, 1 / 3, 0.5, 2 / 3, 0.9, 1.0])  # recalls tie, as counts over a few objects do
    frame = pl.DataFrame(
        {
            "n_objects": 3,
            **{
                f"{score}_{side}": rng.choice(fractions, n)
                for score in ("precision", "recall", "f1")
                for side in ("target", "reference")
            },
        }
    )
    inputs = population.ResampleInputs.from_records(frame)
    resample = rng.integers(0, n, size=(4, size))
    formulas = {
        **{
            metric: lambda columns, score=score: definitions.win_gap(
                columns[f"{score}_target"], columns[f"{score}_reference"]
            )
            for metric, score in definitions.WIN_GAPS.items()
        },
        "AUCG": lambda columns: definitions.aucg(columns["recall_target"], columns["recall_reference"]),
    }
    fast = population.resampled_metrics(inputs, resample)
    every = population.resampled_metrics(inputs, np.arange(n)[None])  # the values on all records
    for metric in definitions.POPULATION_METRICS:
        assert np.array_equal(
            fast[metric], formulas[metric]({name: frame[name].to_numpy()[resample] for name in frame.columns})
        ), metric
        assert every[metric][0] == formulas[metric]({name: frame[name].to_numpy() for name in frame.columns}), metric


@given(st.lists(st.text(max_size=6), unique=True, max_size=300), st.lists(st.text(max_size=6), max_size=100))
@settings(max_examples=200, deadline=None)
def test_string_index_finds_each_listed_string_and_no_other(listed, looked_up):
    strings = pl.Series(listed, dtype=pl.String)
    queries = pl.Series(looked_up + listed[::-1], dtype=pl.String)
    expected = np.array([listed.index(s) if s in listed else -1 for s in queries.to_list()], dtype=np.int64)
    for buckets in (True, False):
        index = encoding.StringIndex(strings, "listed", "id", buckets=buckets)
        assert np.array_equal(index.positions(queries), expected)


def recall_frame(rng: np.random.Generator, n: int) -> pl.DataFrame:
    """Score columns as counts over a few objects give them: many ties among a few dozen distinct values."""
    fractions = np.unique(np.array([a / b for b in range(1, 9) for a in range(b + 1)]))
    return pl.DataFrame(
        {
            "n_objects": 3,
            **{
                f"{score}_{side}": rng.choice(fractions, n)
                for score in ("precision", "recall", "f1")
                for side in ("target", "reference")
            },
        }
    )


@given(st.integers(65, 5000), st.integers(65, 3000), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_resampled_aucg_equals_the_sorting_formula_past_numpys_summation_blocks(n, size, seed):
    # 2·size terms > 128: numpy's pairwise summation halves them into blocks, which counted_aucg must follow.
    rng = np.random.default_rng(seed)
    frame = recall_frame(rng, n)
    inputs = population.ResampleInputs.from_records(frame)
    resample = rng.integers(0, n, size=(3, size))
    recalls = {side: frame[f"recall_{side}"].to_numpy() for side in ("target", "reference")}
    assert np.array_equal(
        population.resampled_metrics(inputs, resample)["AUCG"],
        definitions.aucg(recalls["target"][resample], recalls["reference"][resample]),
    )


def test_aucg_on_all_of_300k_records_is_the_sorting_formulas_float():
    frame = recall_frame(np.random.default_rng(5), 300_001)
    every = population.resampled_metrics(population.ResampleInputs.from_records(frame), np.arange(300_001)[None])
    assert every["AUCG"][0] == definitions.aucg(frame["recall_target"].to_numpy(), frame["recall_reference"].to_numpy())


@pytest.mark.parametrize("high", [1, 7, 1000, 10**6, 2**32, 3 * 2**32 + 1])
def test_bootstrap_draws_made_in_pieces_equal_one_draw_of_all(high):
    # population_rows draws BOOTSTRAP_VALUES at a time, not resample by resample: the same numbers only because
    # numpy's integers continue one stream across calls.
    whole = np.random.default_rng(9).integers(0, high, size=(5, 301))
    rng = np.random.default_rng(9)
    pieces = np.concatenate([rng.integers(0, high, size=piece) for piece in (1, 2, 300, 7, 1195)])
    assert np.array_equal(whole.reshape(-1), pieces)


@given(
    st.lists(
        st.one_of(st.none(), st.sampled_from([-0.0, 0.0, 0.25, -1.5, float("inf"), 1e-40])), min_size=1, max_size=60
    ),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=200, deadline=None)
def test_order_key_sorts_as_polars_sorts_the_records(values, seed):
    record = np.random.default_rng(seed).permutation(len(values))
    frame = pl.DataFrame({"key": pl.Series(values, dtype=pl.Float32), "record": record})
    expected = frame.select(pl.arg_sort_by("key", "record", descending=[True, False])).to_series().to_numpy()
    key = sample_engine.order_key(frame["key"].to_numpy(), record.astype(np.int64))
    assert np.array_equal(np.argsort(key, kind="stable"), expected)
    integers = pl.Series(np.random.default_rng(seed).integers(-3, 4, len(values)), dtype=pl.Int32)
    expected = (
        frame.with_columns(key=integers)
        .select(pl.arg_sort_by("key", "record", descending=[True, False]))
        .to_series()
        .to_numpy()
    )
    assert np.array_equal(np.argsort(sample_engine.order_key(integers.to_numpy(), record.astype(np.int64))), expected)


@given(st.integers(1, 400), st.integers(1, 9), st.integers(1, 50), st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_merged_runs_give_the_running_sums_of_one_sorted_table(n, n_runs, block, seed):
    rng = np.random.default_rng(seed)
    table = pl.DataFrame(
        {
            "key": rng.permutation(n * 3)[:n].astype(np.int64),
            **{column: rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n) for column in sample_engine.GAP_COLUMNS},
        }
    )
    run_of = rng.integers(0, n_runs, n)
    runs = [table.filter(pl.Series(run_of == run)).sort("key") for run in range(n_runs)]
    cutoffs = np.unique(np.concatenate([rng.integers(1, n + 1, 5), [n]]))
    merged = sample_engine.merged_sums(
        [iter([run.slice(first, block) for first in range(0, len(run), block)]) for run in runs], cutoffs
    )
    in_order = table.sort("key").select(sample_engine.GAP_COLUMNS).to_numpy()
    assert np.array_equal(merged, np.cumsum(in_order, axis=0)[cutoffs - 1])


def test_refusals_count_over_every_part(tmp_path):
    # Parts of 2 records: the missing annotations and the duplicate ids lie in different parts.
    queries = pl.DataFrame({"id": ["q1", "q2", "q3", "q4"]})
    with pytest.raises(DataError, match=r"no annotation row for 2 query record\(s\).*\['q1', 'q4'\]"):
        compute(**metric_inputs(tmp_path, truth=TRUTH.filter(pl.col("id").is_in(["q2", "q3"]))), part_records=2)
    with pytest.raises(DataError, match=r"queries.parquet: 2 duplicate id\(s\), e.g. \['q1', 'q4'\]"):
        compute(
            **metric_inputs(tmp_path, queries=pl.concat([queries, queries.filter(pl.col("id").is_in(["q4", "q1"]))])),
            part_records=2,
        )


def test_the_spill_folder_is_removed_after_a_run_and_after_a_refusal(tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    compute(**metric_inputs(tmp_path), part_records=1, spill_dir=str(spill_dir))
    assert (tmp_path / "out" / "records.parquet").exists() and not list(spill_dir.iterdir())
    with pytest.raises(DataError):
        compute(
            **metric_inputs(tmp_path, truth=TRUTH.filter(pl.col("id") != "q3")),
            part_records=1,
            spill_dir=str(spill_dir),
        )
    assert not list(spill_dir.iterdir())


def test_compute_refuses_null_labels_naming_the_record(tmp_path):
    truth = TRUTH.with_columns(labels=pl.when(pl.col("id") == "q2").then(None).otherwise(pl.col("labels")))
    with pytest.raises(DataError, match=r"truth.parquet: null labels.*\['q2'\]"):
        compute(**metric_inputs(tmp_path, truth=truth))


def test_compute_refuses_one_query_with_fewer_than_k_ranks_among_full_lists(tmp_path):
    # q1 and q3 reach rank 1 (the file's highest rank is k − 1) but q2 has one neighbour: every list is checked.
    nb = neighbors({"q1": ["p1", "p2"], "q2": ["p2"], "q3": ["p1", "p4"], "q4": ["p2", "p1"]})
    with pytest.raises(
        DataError,
        match=r"nb.parquet: 1 query record\(s\) with fewer than k = 2 neighbour ranks, "
        r"e.g. \['q2: 1'\]",
    ):
        compute(**metric_inputs(tmp_path, nb=nb))


def test_compute_refuses_duplicate_public_ids_naming_the_file_and_an_id(tmp_path):
    public = pl.concat([PUBLIC, PUBLIC.filter(pl.col("id") == "p3").with_columns(labels=pl.lit(["a"]))])
    with pytest.raises(DataError, match=r"public.parquet: 1 duplicate id\(s\), e.g. \['p3'\]"):
        compute(**metric_inputs(tmp_path, public=public))


@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 4))
@settings(max_examples=15, deadline=None)
def test_the_engine_writes_the_definitions_tables(seed, k, top_n):
    # Random inputs with repeated neighbours, labels outside the vocabulary and records without objects: the
    # engine's three tables equal the plain definitions' ones, float for float.
    import tempfile

    rng = np.random.default_rng(seed)
    public = pl.DataFrame(
        {
            "id": [f"p{i}" for i in range(30)],
            "labels": [[f"c{j}" for j in rng.integers(0, 8, rng.integers(0, 4))] for _ in range(30)],
        }
    )
    truth = pl.DataFrame(
        {
            "id": [f"q{i:02d}" for i in range(25)],
            "labels": [[f"c{j}" for j in rng.integers(0, 10, rng.integers(0, 4))] for _ in range(25)],
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sides = {}
        for side in ("target", "reference"):
            sides[side] = neighbors({q: list(rng.choice(public["id"].to_list(), 6)) for q in truth["id"]})
            write(sides[side], folder / f"{side}.parquet")
        params = dict(k=k, top_n=top_n, top_l=[1, 3, 10], n_boot=7, frac=0.3, seed=seed % 100)
        compute(
            str(folder / "target.parquet"),
            str(folder / "reference.parquet"),
            write(truth, folder / "t.parquet"),
            write(public, folder / "p.parquet"),
            write(truth.select("id"), folder / "q.parquet"),
            out_dir=folder / "out",
            part_records=7,
            **params,
        )
        found = {
            table: pl.read_parquet(folder / "out" / f"{table}.parquet")
            for table in ("records", "population", "sample_level")
        }
    scored = {
        side: definitions.record_scores(frame.lazy(), public.lazy(), truth.lazy(), k, top_n).collect()
        for side, frame in sides.items()
    }
    records = scored["target"].join(scored["reference"].drop("n_objects"), on=["id", "label_mode"], suffix="_reference")
    records = records.rename(
        {
            name: f"{name}_target"
            for name in records.columns
            if name not in ("id", "label_mode", "n_objects") and not name.endswith("_reference")
        }
    )
    records = records.select(found["records"].columns).sort(pl.col("label_mode") != "all", "id")
    assert found["records"].equals(records)
    population = definitions.population_metrics(records, params["n_boot"], params["frac"], params["seed"])
    assert found["population"].drop("k", "top_n").equals(population)
    assert found["sample_level"].equals(definitions.sample_level(records, params["top_l"]))
