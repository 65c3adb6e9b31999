"""Parameter points: the grid of training parameters, one path segment per point.

A point is spelled `name~value` joined by '/', in a fixed name order, as
`snakemake.utils.Paramspace` writes them (e.g. `n_train~all/epochs~40/
temperature~learned/weight_decay~0.1/mask_ratio~0.0/seed~0`). Each point
therefore owns its model, embedding, neighbour and metric files: a new value
adds targets instead of invalidating the others. `None` is spelled `learned`
for the temperature and `all` for the training-set size.

Early stopping without retraining: points that differ only in `epochs` share
one training *run*, the point with the largest of their epoch values. The run
saves a checkpoint at every shorter epoch value, and the shorter points take
their model from it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

POINT_KEYS = ("n_train", "epochs", "temperature", "weight_decay", "mask_ratio", "seed")  # the VLM test's
SSL_POINT_KEYS = ("method", "epochs", "seed")  # the SSL test's (workflow_scripts/ssl)
NONE_SPELLING = {"n_train": "all", "temperature": "learned"}


def format_value(key: str, value: Any) -> str:
    if value is None:
        return NONE_SPELLING.get(key, "none")
    if isinstance(value, float):
        return repr(value)
    return str(value)


def point_segment(point: Mapping[str, Any], keys: tuple[str, ...] = POINT_KEYS) -> str:
    return "/".join(f"{key}~{format_value(key, point[key])}" for key in keys)


def expand_points(
    base: Mapping[str, Any], sweep: Mapping[str, list] | list[Mapping[str, list]], keys: tuple[str, ...] = POINT_KEYS
) -> dict[str, dict[str, Any]]:
    """Every combination of the swept values, other keys from `base`; keyed by path segment. A list of sweeps is
    the union of their grids, each around `base` (one parameter at a time, say, instead of their product)."""
    points = {}
    for grid in sweep if isinstance(sweep, list) else [sweep]:
        unknown = set(grid) - set(keys)
        if unknown:
            raise ValueError(f"sweep names unknown parameter(s) {sorted(unknown)}; sweepable: {keys}")
        axes = [grid.get(key) or [base.get(key)] for key in keys]
        for values in itertools.product(*axes):
            point = dict(zip(keys, values))
            points[point_segment(point, keys)] = point
    return points


def swept_keys(points: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...] = POINT_KEYS) -> list[str]:
    """The keys that take more than one value among the points, in key order."""
    return [key for key in keys if len({point[key] for point in points.values()}) > 1]


def training_runs(
    points: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...] = POINT_KEYS
) -> dict[str, dict[str, Any]]:
    """Map each point to its run: {point segment: {"run": run segment, "epoch": epoch to take}}.

    A run is the longest point among those equal in everything but `epochs`.
    """
    longest: dict[tuple, int] = {}
    for point in points.values():
        key = tuple(point[k] for k in keys if k != "epochs")
        longest[key] = max(longest.get(key, 0), point["epochs"])
    plan = {}
    for segment, point in points.items():
        key = tuple(point[k] for k in keys if k != "epochs")
        run = point_segment({**point, "epochs": longest[key]}, keys)
        plan[segment] = {"run": run, "epoch": point["epochs"]}
    return plan


def save_epochs(plan: Mapping[str, Mapping[str, Any]], run: str) -> list[int]:
    """The shorter epoch values a run must keep checkpoints for."""
    epochs = {entry["epoch"] for entry in plan.values() if entry["run"] == run}
    return sorted(epochs - {max(epochs)})


def segment_regex(keys: tuple[str, ...] = POINT_KEYS) -> str:
    """Wildcard constraint matching exactly one point segment."""
    return "/".join(f"{re.escape(key)}~[^/~]+" for key in keys)


def parse_segment(segment: str, keys: tuple[str, ...] = POINT_KEYS) -> dict[str, Any]:
    """Inverse of `point_segment`: typed values (int, float, else the text), `learned`/`all` back to None."""
    point = {}
    for part in segment.split("/"):
        key, _, text = part.partition("~")
        if key not in keys:
            raise ValueError(f"{segment!r}: unknown parameter {key!r}")
        point[key] = None if text == NONE_SPELLING.get(key) else _typed(text)
    return point


def _typed(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
