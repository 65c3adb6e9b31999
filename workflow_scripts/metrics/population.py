"""Population gaps (PPG, PRG, PFG, AUCG) on all records and over bootstrap resamples, without gathering columns.

A record's population inputs are packed in one int64 (`ResampleInputs`): the signs of its three score
differences as a base-3 code (5 bits), then each model's recall key, its rank among the distinct recalls
(`kernels.KEY_BITS` bits each). A resample is then only counts: per sign code and, per model, per recall key
(`ResampleCounts`, filled by `kernels.count_draws`). The win gaps are sums of signs over the counts; AUCG walks
the recall keys in order (`kernels.counted_aucg`) and gives the very float that `definitions.aucg`'s sort-based
formula gives, numpy's pairwise summation included.

The resamples' record indices are drawn `BOOTSTRAP_VALUES` at a time (numpy's integers give the same stream
whatever the grouping) and each goes to the id part it falls in (`route_draws`); each part then counts its draws
into every resample's counts. Memory follows the part and the counts, not the records or the resamples' size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from workflow_scripts.metrics.definitions import POPULATION_METRICS, WIN_GAPS
from workflow_scripts.metrics.encoding import narrowest
from workflow_scripts.metrics.kernels import KEY_BITS, count_draws, counted_aucg
from workflow_scripts.metrics.params import SIDES
from workflow_scripts.spill import Spill, route

# Bootstrap draws made at once.
BOOTSTRAP_VALUES = 1 << 21

SIGNS_OF_CODE = np.array([[code // 3**m % 3 - 1 for m in range(len(WIN_GAPS))] for code in range(3 ** len(WIN_GAPS))])


@dataclass
class ResampleCounts:
    """Per resample: how many records have each sign code and, per model, each recall key."""

    sign_counts: np.ndarray  # [resamples, sign codes]
    n_target: np.ndarray  # [resamples, distinct recalls]
    n_reference: np.ndarray

    @classmethod
    def zeros(cls, n_resamples: int, n_distinct: int) -> ResampleCounts:
        return cls(
            np.zeros((n_resamples, len(SIGNS_OF_CODE)), np.int64), *np.zeros((2, n_resamples, n_distinct), np.int64)
        )

    def metrics(self, distinct: np.ndarray, size: int) -> dict[str, np.ndarray]:
        """The population metrics of resamples of `size` records; the win gaps' sums of signs are exact integers,
        so dividing them equals numpy's mean of the signs."""
        win_sums = self.sign_counts @ SIGNS_OF_CODE
        aucgs = np.empty(len(win_sums))
        counted_aucg(self.n_target, self.n_reference, distinct, size, aucgs)
        return {**{metric: win_sums[:, column] / size for column, metric in enumerate(WIN_GAPS)}, "AUCG": aucgs}


def population_columns(mode_records: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """What the population metrics read of one label mode's records with objects (records table columns): the
    signs of the three scores' differences (int8) and both recalls."""
    return (
        mode_records.lazy()
        .filter(pl.col("n_objects") > 0)
        .select(
            *[
                (pl.col(f"{score}_target") - pl.col(f"{score}_reference")).sign().cast(pl.Int8).alias(score)
                for score in WIN_GAPS.values()
            ],
            *[f"recall_{side}" for side in SIDES],
        )
        .collect()
    )


def distinct_recalls(columns: pl.DataFrame) -> np.ndarray:
    return np.unique(np.concatenate([np.unique(columns[f"recall_{side}"].to_numpy()) for side in SIDES]))


@dataclass(frozen=True)
class ResampleInputs:
    """What the population metrics read of each record with objects, packed in one int64 (`count_draws`): the
    signs of the three win gaps' differences and the recalls' keys, their ranks among the distinct recalls
    (`distinct`, ascending). Eight bytes per record instead of six float columns."""

    packed: np.ndarray
    distinct: np.ndarray

    @classmethod
    def keyed(cls, columns: pl.DataFrame, distinct: np.ndarray) -> ResampleInputs:
        """Of `population_columns`, the recalls keyed among `distinct` (which holds them all)."""
        if len(distinct) > 1 << KEY_BITS:
            raise ValueError(f"{len(distinct)} distinct recalls: the population metrics key at most 2^{KEY_BITS}")
        packed = sum(
            (columns[score].to_numpy().astype(np.int64) + 1) * 3**m for m, score in enumerate(WIN_GAPS.values())
        )
        for shift, side in zip((5, 5 + KEY_BITS), SIDES):
            packed |= np.searchsorted(distinct, columns[f"recall_{side}"].to_numpy()).astype(np.int64) << shift
        return cls(np.asarray(packed, np.int64), distinct)

    @classmethod
    def from_records(cls, mode_records: pl.DataFrame | pl.LazyFrame) -> ResampleInputs:
        """Of one label mode's records (the records table's columns), those with objects."""
        columns = population_columns(mode_records)
        return cls.keyed(columns, distinct_recalls(columns))

    def __len__(self) -> int:
        return len(self.packed)

    def count(self, counts: ResampleCounts, resample: np.ndarray, record: np.ndarray) -> None:
        count_draws(resample, record, self.packed, counts.sign_counts, counts.n_target, counts.n_reference)


def n_excluded(mode_records: pl.DataFrame | pl.LazyFrame) -> int:
    """Records without objects: they have no recall."""
    return mode_records.lazy().select((pl.col("n_objects") == 0).sum()).collect().item()


def resampled_metrics(inputs: ResampleInputs, resample: np.ndarray) -> dict[str, np.ndarray]:
    """The population metrics of each resample (a row of record indices), equal to the last bit to `win_gap` and
    `aucg` of the resampled score columns, without gathering any column (`count_draws`, `counted_aucg`)."""
    counts = ResampleCounts.zeros(len(resample), len(inputs.distinct))
    inputs.count(counts, np.repeat(np.arange(len(resample)), resample.shape[1]), resample.reshape(-1))
    return counts.metrics(inputs.distinct, resample.shape[1])


def population_rows(
    spill: Spill,
    label_mode: str,
    part_sizes: np.ndarray,
    distinct: np.ndarray,
    excluded: int,
    n_boot: int,
    frac: float,
    rng: np.random.Generator,
) -> list[dict]:
    """The population table's rows of one label mode whose `population_columns` lie in the spill part by part
    ("population_MODE", part_sizes[p] records in part p, their recalls among `distinct`): each metric on all records
    (NaN without records) and over `n_boot` resamples drawn with `rng` (the draws of all modes are one stream)."""
    n = int(part_sizes.sum())
    size = max(1, round(frac * n))
    route_draws(spill, label_mode, part_sizes, n_boot, size, rng)
    every, resampled = ResampleCounts.zeros(1, len(distinct)), ResampleCounts.zeros(n_boot, len(distinct))
    columns_schema = {
        **dict.fromkeys(WIN_GAPS.values(), pl.Int8),
        **{f"recall_{side}": pl.Float64 for side in SIDES},
    }
    for part in range(len(part_sizes)):
        inputs = ResampleInputs.keyed(spill.read(f"population_{label_mode}", part, columns_schema), distinct)
        inputs.count(every, np.zeros(len(inputs), np.int8), np.arange(len(inputs)))
        for draws in spill.frames(f"draws_{label_mode}", part):
            inputs.count(resampled, draws["resample"].to_numpy(), draws["record"].to_numpy())
    values = every.metrics(distinct, n) if n else {}
    boot = resampled.metrics(distinct, size) if n and n_boot else {}
    return [
        {
            "label_mode": label_mode,
            "metric": metric,
            "value": float(values[metric][0]) if n else float("nan"),
            "mean": float(boot[metric].mean()) if boot else float("nan"),
            "std": float(boot[metric].std(ddof=1)) if boot and n_boot > 1 else float("nan"),
            "n_boot": n_boot,
            "frac": frac,
            "n_records": n,
            "n_excluded": excluded,
        }
        for metric in POPULATION_METRICS
    ]


def route_draws(
    spill: Spill, label_mode: str, part_sizes: np.ndarray, n_boot: int, size: int, rng: np.random.Generator
) -> None:
    """Draw `n_boot` resamples of `size` records (indices over all parts) and spill each draw as (resample,
    record within its part) to its part ("draws_MODE")."""
    n = int(part_sizes.sum())
    starts = np.concatenate([[0], np.cumsum(part_sizes)])
    n_draws = n_boot * size if n else 0
    resample_type, record_type = narrowest(max(n_boot, 1)), narrowest(int(part_sizes.max(initial=0)))
    for first in range(0, n_draws, BOOTSTRAP_VALUES):
        record = rng.integers(0, n, size=min(BOOTSTRAP_VALUES, n_draws - first))
        part = np.zeros(0, np.int64)  # one part: no lookup (route reads no parts), no offset
        if len(part_sizes) > 1:
            part = np.searchsorted(starts, record, side="right") - 1
            record -= starts[part]
        route(
            spill,
            f"draws_{label_mode}",
            pl.DataFrame(
                {
                    "resample": ((first + np.arange(len(record))) // size).astype(resample_type),
                    "record": record.astype(record_type),
                }
            ),
            part,
            len(part_sizes),
        )
