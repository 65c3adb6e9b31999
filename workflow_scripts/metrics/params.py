"""The metric stage's parameters, in one place: the CLI's flags and defaults are built from `MetricParams`.

Light on purpose (no numba, no polars): the CLI and the tests read it without loading the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

LABEL_MODES = ("all", "top_n")
SIDES = ("target", "reference")
TABLES = ("records", "population", "sample_level")


@dataclass(frozen=True)
class MetricParams:
    """What the metric stage computes (k .. seed) and how it runs (batch_rows .. spill_dir, which change no table).

    The defaults are config.yaml's `metrics:` section (tests/test_metrics_params.py keeps the two in step).
    """

    k: int = field(default=10, metadata={"help": "neighbours used per query"})
    top_n: int = field(default=10, metadata={"help": "labels kept in the top_n label mode"})
    top_l: tuple[int, ...] = field(
        default=(10, 20, 50, 100, 200, 500, 1000),
        metadata={"help": "comma-separated L values for the sample-level table (all records are always added)"},
    )
    n_boot: int = field(default=100, metadata={"help": "bootstrap resamples"})
    frac: float = field(default=0.1, metadata={"help": "fraction of the records in each resample"})
    seed: int = field(default=0, metadata={"help": "seed of the resamples' draws"})
    batch_rows: int = field(
        default=1_000_000,
        metadata={"help": "neighbour rows read at a time from each neighbours file: bounds memory, changes no table"},
    )
    part_records: int = field(
        default=1 << 20, metadata={"help": "query records handled at a time: bounds memory, changes no table"}
    )
    spill_dir: str | None = field(
        default=None, metadata={"help": "folder for what does not fit in memory (default: $TMPDIR or /tmp)"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_l", tuple(int(value) for value in self.top_l))  # a list given is kept too


# Here, not in the engine, so that the plain reference (`definitions`) shares the fact without importing the engine.
def sample_cutoffs(top_l: Iterable[int], n: int) -> list[int]:
    """The L values of the sample-level table for n records, ascending: those of `top_l` below n, and n (all)."""
    return sorted({size for size in top_l if 0 < size < n} | ({n} if n else set()))
