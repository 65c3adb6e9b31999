"""SSL déjà vu metrics (Meehan et al., NeurIPS 2023): kNN label votes, top-p % accuracies, quadrants, sample level.

Each kept periphery crop of A, B and the holdout is a query; under each model f_A, f_B its k nearest public images
vote for its label. This module computes on integer label codes (the vocabulary in name order, so a code order is a
name order), vectorised over records: `vote` (one model's votes on one crop set), `population` (target, reference,
gap per top p %, the holdout control, the quadrants, all over seeded bootstrap resamples), `records_table` and
`sample_level`. Reading and checking the files is `ssl_main`'s (run as `python -m workflow_scripts.metrics.ssl`).
Definitions: docs/DESIGN.md §9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import polars as pl

CROP_SETS = ("A", "B", "holdout")
MODELS = ("A", "B")  # f_A (trained on A ∪ shared), f_B (on B ∪ shared)
HALVES = ("H1", "H2")
TOP = 5  # labels of the top-5 prediction
PREDICTIONS = ("top1", "top5")  # which prediction counts as right: row 0 and 1 of `Votes.correct`
PRED = tuple(enumerate(PREDICTIONS))
ACCURACY_STATISTICS = ("target", "reference", "gap")
QUADRANTS = ("memorized", "correlated", "forgotten", "misrepresented")  # (target, reference) right: 10, 11, 01, 00
TABLES = ("records", "population", "sample_level")
VOTE_QUERIES = 1 << 16  # queries voted at a time: bounds the sort's memory
DRAW_VALUES = 1 << 22  # bootstrap draws held at a time


@dataclass(frozen=True)
class SSLMetricParams:
    """What the SSL metric stage computes; its CLI's flags and defaults are built from these fields."""

    k: int = field(default=20, metadata={"help": "public neighbours that vote per crop"})
    top_p: tuple[float, ...] = field(
        default=(5.0, 20.0, 100.0), metadata={"help": "percentages of the most confident crops scored"}
    )
    n_boot: int = field(default=100, metadata={"help": "bootstrap resamples"})
    frac: float = field(default=1.0, metadata={"help": "fraction of each set's crops in a resample"})
    seed: int = field(default=0, metadata={"help": "seed of the holdout halves and the resamples"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_p", tuple(sorted({float(p) for p in self.top_p})))
        if self.k < 1 or self.n_boot < 0 or not self.frac > 0 or not self.top_p:
            raise ValueError(f"need k >= 1, n_boot >= 0, frac > 0 and some top_p: {self}")
        if not all(0 < p <= 100 for p in self.top_p):
            raise ValueError(f"top_p values are percentages in (0, 100]: {self.top_p}")


@dataclass(frozen=True)
class Votes:
    """One model's votes on one crop set's records (in id order)."""

    predicted: np.ndarray  # label code
    vote_share: np.ndarray  # the prediction's share of the k votes
    entropy: np.ndarray  # of the vote shares, natural log; confidence = −entropy
    correct: np.ndarray  # bool [2, n]: top-1, top-5 right

    def take(self, index: np.ndarray) -> Votes:
        return Votes(self.predicted[index], self.vote_share[index], self.entropy[index], self.correct[:, index])


def vote(labels: np.ndarray, truth: np.ndarray) -> Votes:
    """The votes of `labels` [n, k] (each query's neighbours' label codes, nearest first) for the labels `truth` [n]."""
    blocks = [
        _vote_block(labels[first : first + VOTE_QUERIES], truth[first : first + VOTE_QUERIES])
        for first in range(0, len(labels), VOTE_QUERIES)
    ]
    if not blocks:
        return Votes(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((2, 0), bool))
    return Votes(*(np.concatenate(parts, axis=-1) for parts in zip(*blocks)))


def _vote_block(labels: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, ...]:
    """`vote` of a block of queries: each query's labels become runs (label, votes, nearest rank), ranked by votes
    descending, then nearest rank (a rank holds one label: no two runs tie on both, so no name is ever needed); the
    first is the prediction, the first TOP the top-5."""
    n, k = labels.shape
    keyed = np.sort(labels.astype(np.int64) * k + np.arange(k), axis=1).reshape(-1)  # by label, then rank
    label = keyed // k
    start = np.ones(n * k, bool)
    start[1:] = label[1:] != label[:-1]
    start[::k] = True  # each query starts a run
    first = np.flatnonzero(start)
    count = np.diff(first, append=n * k)
    # One sortable key per run: query, votes descending, nearest rank.
    key = np.sort(first // k * (k * (k + 1)) + (k - count) * k + keyed[first] % k)
    query, rest = np.divmod(key, k * (k + 1))
    rank, share = rest % k, (k - rest // k) / k
    run_label = labels[query, rank]
    place = np.arange(len(key)) - np.flatnonzero(np.diff(query, prepend=-1))[query]  # run's place in its query
    # Summed per query in the order above (votes descending): equal vote profiles give the same float.
    entropy = np.bincount(query, weights=-share * np.log(share), minlength=n)
    head = place == 0
    top5 = np.bincount(query[(place < TOP) & (run_label == truth[query])], minlength=n) > 0
    return run_label[head].astype(np.int64), share[head], entropy, np.stack([run_label[head] == truth, top5])


def cutoffs(top_p: tuple[float, ...], n: int) -> np.ndarray:
    """The number of most confident records of each top p % of n: ceil(p/100 · n), in exact arithmetic."""
    return np.array([math.ceil(Fraction(repr(p)) * n / 100) for p in top_p], np.int64)


@dataclass(frozen=True)
class Ranked:
    """One model's records in its confidence order: entropy ascending, ties by id (the records are in id order)."""

    position: np.ndarray  # a record's place in the order
    in_order: np.ndarray  # bool [2, n]: `Votes.correct` in the order

    @classmethod
    def of(cls, votes: Votes) -> Ranked:
        order = np.argsort(votes.entropy, kind="stable")
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        return cls(position, votes.correct[:, order])

    def accuracy(self, draws: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """[2, rows, len(cuts)]: top-1 and top-5 accuracy on each row of `draws`' `cuts` most confident records."""
        hits = self.in_order[:, np.sort(self.position[draws], axis=1)]
        return hits.cumsum(axis=2, dtype=np.int64)[:, :, cuts - 1] / cuts


TARGET_KEYS = ("A:A", "B:B", "A:holdout", "B:holdout")  # MODEL:CROPSET of the target's votes
REFERENCE_KEYS = ("B:A", "A:B", "B:holdout", "A:holdout")  # of the reference trained on MODEL's side
# Each measured set: its crop set, its target model, and which reference is the other side's.
MEASURED = {"A": ("A", "A"), "B": ("B", "B"), "H1": ("holdout", "A"), "H2": ("holdout", "B")}


@dataclass(frozen=True)
class Pair:
    """A measured set's target and reference votes on the same records: rows `rows` of crop set `crop_set`."""

    crop_set: str
    target_model: str
    rows: np.ndarray
    target: Votes
    reference: Votes


def other(model: str) -> str:
    return MODELS[1 - MODELS.index(model)]


def measured_pairs(target: dict[str, Votes], reference: dict[str, Votes], rng: np.random.Generator) -> dict:
    """{A, B, H1, H2: Pair} from the votes by MODEL:CROPSET (TARGET_KEYS, REFERENCE_KEYS). The holdout's records
    split by a permutation drawn with `rng`: H1 the first ceil(n/2) (target f_A), H2 the rest (f_B), each in id
    order. A two-model test's reference on a set is the other model; a one-model test's, the reference
    classifier trained on the other side's crops."""
    n = len(target["A:holdout"].entropy)
    shuffled = rng.permutation(n)
    rows = {"H1": np.sort(shuffled[: (n + 1) // 2]), "H2": np.sort(shuffled[(n + 1) // 2 :])}
    pairs = {}
    for name, (crop_set, model) in MEASURED.items():
        index = rows.get(name, np.arange(len(target[f"{model}:{crop_set}"].entropy)))
        votes = (target[f"{model}:{crop_set}"], reference[f"{other(model)}:{crop_set}"])
        pairs[name] = Pair(crop_set, model, index, *(side.take(index) for side in votes))
    return pairs


def measures(pair: Pair, ranked: tuple[Ranked, Ranked], draws, cuts) -> dict:
    """Of each row of `draws` (record indices of the pair's set): the target's and the reference's top-p
    accuracies [2, rows, len(cuts)] and the quadrants' shares [2, rows, 4]."""
    right, other_right = pair.target.correct[:, draws], pair.reference.correct[:, draws]
    quadrants = [right & ~other_right, right & other_right, ~right & other_right, ~right & ~other_right]
    return {
        "target": ranked[0].accuracy(draws, cuts),
        "reference": ranked[1].accuracy(draws, cuts),
        "quadrants": np.stack([share.mean(axis=-1) for share in quadrants], axis=-1),
    }


def set_measures(pair: Pair, params: SSLMetricParams, rng: np.random.Generator) -> dict:
    """`measures` of a set on all its records (row 0), then on `n_boot` resamples of round(frac · n) records drawn
    with replacement by `rng` (rows 1..); NaN for an empty set, which draws nothing."""
    n = len(pair.rows)
    if n == 0:
        nan = np.full((2, 1 + params.n_boot, len(params.top_p)), np.nan)
        return {"target": nan, "reference": nan, "quadrants": np.full((2, 1 + params.n_boot, 4), np.nan), "n": 0}
    ranked = (Ranked.of(pair.target), Ranked.of(pair.reference))
    rows = [measures(pair, ranked, np.arange(n)[None], cutoffs(params.top_p, n))]
    size = max(1, round(params.frac * n))
    block = max(1, DRAW_VALUES // size)
    for first in range(0, params.n_boot, block):
        draws = rng.integers(0, n, size=(min(block, params.n_boot - first), size))
        rows.append(measures(pair, ranked, draws, cutoffs(params.top_p, size)))
    return {name: np.concatenate([row[name] for row in rows], axis=1) for name in rows[0]} | {"n": n}


def evaluate(target: dict[str, Votes], reference: dict[str, Votes], params: SSLMetricParams):
    """(the measured pairs, the population table): one generator seeded with `params.seed` draws the holdout
    halves, then the resamples of A, B, H1 and H2 in turn."""
    rng = np.random.default_rng(params.seed)
    pairs = measured_pairs(target, reference, rng)
    return pairs, population(pairs, params, rng)


def population(pairs: dict[str, Pair], params: SSLMetricParams, rng: np.random.Generator) -> pl.DataFrame:
    """The population table (contract SSL_POPULATION) of the measured pairs, resampled with `rng`."""
    measured = {name: set_measures(pair, params, rng) for name, pair in pairs.items()}
    rows = []
    for prefix, (first, second) in (("", ("A", "B")), ("holdout_", HALVES)):
        one, two = measured[first], measured[second]
        target, reference = ((one[side] + two[side]) / 2 for side in ACCURACY_STATISTICS[:2])
        n = one["n"] + two["n"]
        for statistic, values in zip(ACCURACY_STATISTICS, (target, reference, target - reference)):
            for p, top_p in enumerate(params.top_p):
                rows += [_row(kind, prefix + statistic, top_p, values[row, :, p], n, params) for row, kind in PRED]
    quadrants = (measured["A"]["quadrants"] + measured["B"]["quadrants"]) / 2
    n = measured["A"]["n"] + measured["B"]["n"]
    for q, statistic in enumerate(QUADRANTS):
        rows += [_row(kind, statistic, 100.0, quadrants[row, :, q], n, params) for row, kind in PRED]
    order = {name: i for i, name in enumerate(population_statistics())}
    return pl.DataFrame(rows).sort(pl.col("prediction"), pl.col("statistic").replace_strict(order), pl.col("top_p"))


def population_statistics() -> list[str]:
    """The population table's statistics, in its row order."""
    return [*ACCURACY_STATISTICS, *(f"holdout_{name}" for name in ACCURACY_STATISTICS), *QUADRANTS]


def _row(prediction: str, statistic: str, top_p: float, values: np.ndarray, n: int, params: SSLMetricParams) -> dict:
    """A population row: `values[0]` on all records, mean ± std (ddof 1) of `values[1:]`, the resamples'."""
    boot = values[1:]
    return {
        "prediction": prediction,
        "statistic": statistic,
        "top_p": top_p,
        "value": float(values[0]),
        "mean": float(boot.mean()) if len(boot) else float("nan"),
        "std": float(boot.std(ddof=1)) if len(boot) > 1 else float("nan"),
        "n_boot": params.n_boot,
        "frac": params.frac,
        "n_records": n,
        "k": params.k,
    }


VOTE_COLUMNS = ("predicted", "vote_share", "entropy", "correct_top1", "correct_top5")
ROLES = ("target", "reference")


def records_table(sets: dict[str, pl.DataFrame], pairs: dict[str, Pair], vocabulary: pl.Series) -> pl.DataFrame:
    """The records table (contract SSL_RECORDS) in id order: each crop set's kept crops (`sets`: id, label, in id
    order) with the target's and the reference's votes on them, and which model was the target."""
    frames = []
    for pair in pairs.values():
        columns = {}
        for role, votes in zip(ROLES, (pair.target, pair.reference)):
            values = (vocabulary.gather(votes.predicted), votes.vote_share, votes.entropy, *votes.correct)
            columns |= {f"{name}_{role}": pl.Series(value) for name, value in zip(VOTE_COLUMNS, values)}
        frame = sets[pair.crop_set][pair.rows]
        frames.append(
            frame.select(
                "id", crop_set=pl.lit(pair.crop_set), target_model=pl.lit(pair.target_model), label="label"
            ).with_columns(**columns)
        )
    return pl.concat(frames).sort("id")


def sample_level(records: pl.DataFrame) -> pl.DataFrame:
    """The memorized records of A and B (target right, reference wrong, top-1) ranked by their memorization
    confidence H_reference − H_target descending, ties by id; `rank` 1 is the most confident (SSL_SAMPLE_LEVEL)."""
    chosen = (
        records.filter(
            pl.col("crop_set").is_in(MODELS) & pl.col("correct_top1_target") & ~pl.col("correct_top1_reference")
        )
        .select("id", "crop_set", "label", *(f"{name}_{role}" for name in VOTE_COLUMNS[:3] for role in ROLES))
        .with_columns(entropy_gap=pl.col("entropy_reference") - pl.col("entropy_target"))
        .sort(["entropy_gap", "id"], descending=[True, False])
    )
    return chosen.select(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"), pl.all())


if __name__ == "__main__":
    from workflow_scripts.metrics.ssl_main import main

    main()
