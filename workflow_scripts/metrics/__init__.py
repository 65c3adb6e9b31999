"""Déjà vu metrics (paper section 3.2): per-record scores, population gaps, sample-level gaps.

For a query record z with ground-truth objects O(z) and a model f, the k public neighbours of f's embedding of
z's caption predict objects, in label mode `all` (every label of the k neighbours) or `top_n` (the `top_n`
labels carried by most neighbours, ties by the nearest carrier's rank, then name). precision, recall and F1
compare the prediction with O(z) (0/0 is 0; records without objects have no recall and are excluded from the
gaps). Population gaps of f_A ("target") against f_B ("reference"): PPG, PRG, PFG (wins minus losses over n)
and AUCG (the signed area between the recall CDFs), on all records and over bootstrap resamples; the
sample-level table gives the mean gaps over the top-L records of three orders.

`definitions` states all of this plainly (polars and numpy, in memory); the engine (`tables.compute`, run as
`python -m workflow_scripts.metrics`) computes the same tables in bounded memory at any scale. See
docs/metrics-engine.md.
"""

from __future__ import annotations

from workflow_scripts.metrics.params import LABEL_MODES, SIDES, TABLES, MetricParams

__all__ = ["LABEL_MODES", "SIDES", "TABLES", "MetricParams", "compute"]


def __getattr__(name: str):
    # The engine loads numba and polars: only when asked for, so the CLI can set its environment first.
    if name == "compute":
        from workflow_scripts.metrics.tables import compute

        return compute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
