"""Parameter points: the grid of training parameters, one path segment per point.

A point is spelled `name~value` joined by '/', in a fixed name order, as
`snakemake.utils.Paramspace` writes them (e.g. `epochs~40/temperature~learned/
weight_decay~0.1/mask_ratio~0.0/seed~0`). Each point therefore owns its model,
embedding, neighbour and metric files: a new value adds targets instead of
invalidating the others. `None` (a learned temperature) is spelled `learned`.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Mapping

POINT_KEYS = ("epochs", "temperature", "weight_decay", "mask_ratio", "seed")


def format_value(value: Any) -> str:
    if value is None:
        return "learned"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def point_segment(point: Mapping[str, Any]) -> str:
    return "/".join(f"{key}~{format_value(point[key])}" for key in POINT_KEYS)


def expand_points(base: Mapping[str, Any], sweep: Mapping[str, list]) -> dict[str, dict[str, Any]]:
    """Every combination of the swept values, other keys from `base`; keyed by path segment."""
    unknown = set(sweep) - set(POINT_KEYS)
    if unknown:
        raise ValueError(f"sweep names unknown parameter(s) {sorted(unknown)}; sweepable: {POINT_KEYS}")
    axes = [sweep.get(key) or [base[key]] for key in POINT_KEYS]
    points = {}
    for values in itertools.product(*axes):
        point = dict(zip(POINT_KEYS, values))
        points[point_segment(point)] = point
    return points


def segment_regex() -> str:
    """Wildcard constraint matching exactly one point segment."""
    return "/".join(f"{re.escape(key)}~[^/~]+" for key in POINT_KEYS)
