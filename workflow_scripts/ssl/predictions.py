"""A one-model reference's per-crop outputs (contract SSL_PREDICTIONS), whatever classifier made them.

The SSL metric stage scores a kNN by the votes of its k neighbours. A classifier's distribution over the classes
is put on the same support by turning it into k votes: each class gets floor(k·p) votes and the votes left go to
the largest remainders k·p − floor(k·p) (ties: the more probable class, then the class order), so the
reference's prediction, top-5, vote share and entropy are computed by the very code that scores the kNN, over
the same C labels and with the same 1/k granularity (docs/DESIGN.md §10). The table also keeps the distribution's
own argmax, its probability and its entropy over the classes (natural log).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from workflow_scripts.contracts import SSL_PREDICTIONS

ROWS = 1 << 14  # distributions apportioned at a time: bounds the [rows, classes] work arrays


def apportion(probabilities: np.ndarray, k: int) -> np.ndarray:
    """[n, k] class indices: each row's distribution as k votes by largest remainders, most votes first (ties:
    the more probable class, then the lower index), each class repeated as many times as it has votes."""
    n, n_classes = probabilities.shape
    quota = probabilities * k
    votes = np.floor(quota).astype(np.int64)
    left = k - votes.sum(axis=1)
    # Most remainder first; equal remainders: more probable, then lower index (lexsort's last key is primary).
    order = np.lexsort((np.arange(n_classes)[None].repeat(n, 0), -probabilities, -(quota - votes)), axis=1)
    extra = np.arange(n_classes)[None] < left[:, None]
    rows = np.arange(n)[:, None].repeat(n_classes, 1)
    votes[rows[extra], order[extra]] += 1  # each (row, class) once: order is a permutation per row
    ranked = np.lexsort((np.arange(n_classes)[None].repeat(n, 0), -probabilities, -votes), axis=1)
    counts = np.take_along_axis(votes, ranked, axis=1)
    return np.repeat(ranked.reshape(-1), counts.reshape(-1)).reshape(n, k)  # every row's counts sum to k


def predictions_table(ids: list[str], probabilities: np.ndarray, classes: list[str], k: int) -> pl.DataFrame:
    """The SSL_PREDICTIONS table of rows of `probabilities` [n, C] (each sums to 1) over `classes`, with k votes."""
    if probabilities.shape != (len(ids), len(classes)):
        raise ValueError(f"probabilities {probabilities.shape} do not match {len(ids)} ids x {len(classes)} classes")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    names = np.asarray(classes, dtype=object)
    votes = [apportion(probabilities[first : first + ROWS], k) for first in range(0, len(ids), ROWS)]
    votes = np.concatenate(votes) if votes else np.zeros((0, k), np.int64)
    best = probabilities.argmax(axis=1) if len(ids) else np.zeros(0, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = 0.0 - np.where(probabilities > 0, probabilities * np.log(probabilities), 0.0).sum(axis=1)
    frame = {
        "id": ids,
        "predicted": names[best].tolist(),
        "probability": probabilities[np.arange(len(ids)), best] if len(ids) else np.zeros(0),
        "entropy": entropy,
        "votes": pl.Series(names[votes.reshape(-1)].tolist(), dtype=pl.String).reshape((len(ids), k)),
    }
    return pl.DataFrame(frame).with_columns(pl.col("votes").cast(pl.List(pl.String))).cast(SSL_PREDICTIONS.polars())
