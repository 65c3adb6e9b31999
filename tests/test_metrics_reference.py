"""The metric stage at scale against a slow, obviously correct reference written here with Python sets,
and the batching law: any chunk, batch or part size, in memory or spilled to disk, gives byte-identical tables."""

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from workflow_scripts.metrics import LABEL_MODES, SIDES, MetricParams, plan, tables

K, TOP_N, FILE_RANKS = 10, 3, 12


def write(frame: pl.DataFrame, path: Path) -> str:
    frame.write_parquet(path)
    return str(path)


def label_lists(rng: np.random.Generator, n: int, max_labels: int, vocabulary: int) -> list[list[str]]:
    """0..max_labels labels per record, drawn with replacement (so some repeat within a record)."""
    names = np.array([f"c{j:02d}" for j in range(vocabulary)])
    lengths = rng.integers(0, max_labels + 1, n)
    return np.split(names[rng.integers(0, vocabulary, lengths.sum())], np.cumsum(lengths)[:-1])


def make_inputs(folder: Path, n_queries: int, seed: int, id_digits: int = 0) -> dict[str, str]:
    """Public set, query split, annotations and two neighbour files (FILE_RANKS ranks per query, with the rows
    of other-split queries mixed in, queries in shuffled order, neighbours near each other so labels repeat).
    Query ids have at least `id_digits` digits."""
    rng = np.random.default_rng(seed)
    n_public = max(200, n_queries // 5)
    public = pl.DataFrame(
        {"id": [f"p{i}" for i in range(n_public)], "labels": label_lists(rng, n_public, 6, 60)},
        schema={"id": pl.String, "labels": pl.List(pl.String)},
    )
    query_ids = [f"q{i:0{id_digits}d}" for i in range(n_queries)]
    others = [f"h{i}" for i in range(n_queries // 20)]
    # Truth labels reach past the public vocabulary (c60..c69): objects no neighbour can predict.
    truth = pl.DataFrame(
        {"id": query_ids + others, "labels": label_lists(rng, n_queries + len(others), 5, 70)},
        schema={"id": pl.String, "labels": pl.List(pl.String)},
    )
    paths = {
        "public_annotations": write(public, folder / "public.parquet"),
        "query_annotations": write(truth.sample(fraction=1.0, shuffle=True, seed=seed), folder / "truth.parquet"),
        "queries": write(pl.DataFrame({"id": query_ids}), folder / "queries.parquet"),
    }
    listed = np.array(query_ids + others)[rng.permutation(n_queries + len(others))]
    for side in ("target", "reference"):
        centre = rng.integers(0, n_public, len(listed))
        public_rows = (centre[:, None] + rng.integers(0, 40, (len(listed), FILE_RANKS))) % n_public  # repeats too
        path = folder / f"{side}.parquet"
        paths[f"{side}_neighbors"] = write(
            pl.DataFrame(
                {
                    "query_id": np.repeat(listed, FILE_RANKS),
                    "rank": np.tile(np.arange(FILE_RANKS, dtype=np.int16), len(listed)),
                    "public_id": public["id"].gather(public_rows.reshape(-1)),
                    "score": np.repeat(rng.random(len(listed), dtype=np.float32), FILE_RANKS),
                }
            ),
            path,
        )
    return paths


def reference_scores(paths: dict[str, str], side: str) -> dict[tuple[str, str], tuple]:
    """(id, label mode) -> (n_predicted, n_correct, precision, recall, f1), one record at a time with sets."""
    public = {
        row["id"]: set(row["labels"]) for row in pl.read_parquet(paths["public_annotations"]).iter_rows(named=True)
    }
    truth = {row["id"]: set(row["labels"]) for row in pl.read_parquet(paths["query_annotations"]).iter_rows(named=True)}
    lists = (
        pl.read_parquet(paths[f"{side}_neighbors"])
        .filter(pl.col("rank") < K)
        .sort("rank")
        .group_by("query_id")
        .agg("rank", "public_id")
    )
    scores = {}
    for query, ranks, public_ids in lists.iter_rows():
        if not query.startswith("q"):
            continue
        count, best, counted = Counter(), {}, set()
        for rank, public_id in zip(ranks, public_ids):
            if public_id in counted:
                continue
            counted.add(public_id)
            for label in public[public_id]:
                count[label] += 1
                best.setdefault(label, rank)
        top = sorted(count, key=lambda label: (-count[label], best[label], label))[:TOP_N]
        objects = truth[query]
        for mode, predicted in (("all", set(count)), ("top_n", set(top))):
            correct = len(predicted & objects)
            precision = correct / len(predicted) if predicted else 0.0
            recall = correct / len(objects) if objects else None
            f1 = (
                None
                if recall is None
                else (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
            )
            scores[query, mode] = (len(predicted), correct, precision, recall, f1)
    return scores


def run(paths: dict[str, str], out_dir: Path, **options) -> Path:
    tables.compute(
        **paths,
        params=MetricParams(k=K, top_n=TOP_N, top_l=(10, 100, 1000), n_boot=20, frac=0.1, seed=3, **options),
        out_dir=out_dir,
    )
    return out_dir


def test_scores_at_100k_records_equal_a_set_based_reference(tmp_path):
    paths = make_inputs(tmp_path, 100_000, seed=0)
    records = pl.read_parquet(run(paths, tmp_path / "out", batch_rows=250_000) / "records.parquet")
    assert records.height == 2 * 100_000
    columns = ["n_predicted", "n_correct", "precision", "recall", "f1"]
    for side in SIDES:
        expected = reference_scores(paths, side)
        found = {
            (row[0], row[1]): tuple(row[2:])
            for row in records.select("id", "label_mode", *[f"{c}_{side}" for c in columns]).iter_rows()
        }
        assert found == expected, side
    population = pl.read_parquet(tmp_path / "out" / "population.parquet")
    for mode in LABEL_MODES:
        scored = records.filter((pl.col("label_mode") == mode) & (pl.col("n_objects") > 0))
        values = dict(population.filter(pl.col("label_mode") == mode).select("metric", "value").iter_rows())
        for metric, column in (("PPG", "precision"), ("PRG", "recall"), ("PFG", "f1")):
            wins = sum(a > b for a, b in zip(scored[f"{column}_target"], scored[f"{column}_reference"]))
            losses = sum(a < b for a, b in zip(scored[f"{column}_target"], scored[f"{column}_reference"]))
            assert values[metric] == pytest.approx((wins - losses) / scored.height, abs=1e-12), (mode, metric)
        assert values["AUCG"] == pytest.approx(
            scored["recall_target"].mean() - scored["recall_reference"].mean(), abs=1e-12
        )


def test_many_small_batches_write_the_same_bytes_as_one(tmp_path):
    paths = make_inputs(tmp_path, 3_000, seed=1)
    one = run(paths, tmp_path / "one", batch_rows=10_000_000)
    # Chunks of 29 rows cut most queries' 12 rows apart.
    many = run(paths, tmp_path / "many", batch_rows=29)
    for table in ("records", "population", "sample_level"):
        assert (one / f"{table}.parquet").read_bytes() == (many / f"{table}.parquet").read_bytes(), table


class CountingSpill(tables.Spill):
    """A spill that counts the files it writes."""

    files = 0

    def _write_all(self):
        CountingSpill.files += len(self._memory)
        super()._write_all()


def test_many_id_parts_spilled_to_disk_write_the_same_bytes_as_one_part_in_memory(tmp_path, monkeypatch):
    # Ids of 70 bytes: a row group's ids outgrow the Parquet writer's 1 MiB dictionary page, and where the writer
    # gives up the dictionary must not depend on the parts a row group is made of.
    paths = make_inputs(tmp_path, 20_000, seed=5, id_digits=69)
    # Row groups of 17,000 records, which the parts of 997 records below must be cut and joined into.
    monkeypatch.setattr(tables, "RECORDS_BATCH_ROWS", 17_000)
    one = run(paths, tmp_path / "one")
    # Parts of 997 records (21 id parts), of 89 runs, anything past 64 KiB in files: every shuffle, merge and
    # bootstrap draw crosses parts and files.
    monkeypatch.setattr(plan, "RUN_PART_RUNS", 89)
    monkeypatch.setattr(plan, "SPILL_BYTES", 1 << 16)
    monkeypatch.setattr(tables, "Spill", CountingSpill)
    many = run(paths, tmp_path / "many", part_records=997, batch_rows=1_000, spill_dir=str(tmp_path))
    assert CountingSpill.files > 100, "the spill went to files"
    for table in ("records", "population", "sample_level"):
        assert (one / f"{table}.parquet").read_bytes() == (many / f"{table}.parquet").read_bytes(), table


def test_row_order_within_a_query_changes_no_table(tmp_path):
    # The kNN stage writes ranks ascending, but nothing may depend on it: repeated public ids count once, at
    # their nearest rank, whichever of their rows comes first.
    paths = make_inputs(tmp_path, 3_000, seed=2)
    one = run(paths, tmp_path / "one")
    for side in SIDES:
        shuffled = pl.read_parquet(paths[f"{side}_neighbors"]).with_columns(
            _query=pl.col("query_id").rle_id(), _shuffle=pl.int_range(pl.len()).shuffle(seed=4)
        )
        paths[f"{side}_neighbors"] = write(
            shuffled.sort("_query", "_shuffle").drop("_query", "_shuffle"), tmp_path / f"{side}_shuffled.parquet"
        )
    shuffled_run = run(paths, tmp_path / "shuffled")
    for table in ("records", "population", "sample_level"):  # the files' metadata names the inputs: compare tables
        assert pl.read_parquet(one / f"{table}.parquet").equals(pl.read_parquet(shuffled_run / f"{table}.parquet")), (
            table
        )
