"""Caption draws and text masking, pure functions of (seed, epoch, row).

A record's caption draw and mask come from a counter-based hash of (seed, epoch, row), so they do not
depend on the batch, the worker or the number of processes.

Text masking: with mask ratio r, round(r * n) of a caption's n content tokens (everything between the
start and end-of-text tokens) are replaced by the tokenizer's padding id each time the caption is drawn;
the start and end-of-text tokens are kept, so the text tower still pools at the end of text.
"""

from __future__ import annotations

import numpy as np
import torch


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        values = values + np.uint64(0x9E3779B97F4A7C15)
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def record_uniforms(seed: int, epoch: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Uniform [0, 1) numbers [len(rows), width], a pure function of (seed, epoch, row, column)."""
    stream = _splitmix64(_splitmix64(np.array([seed], np.uint64)) + np.uint64(epoch))
    counters = np.asarray(rows, np.uint64)[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)
    return (_splitmix64(counters ^ stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_captions(counts: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Index of one caption per record, uniform among its `counts` captions."""
    return np.minimum((uniforms * counts).astype(np.int64), counts - 1)


def special_token_ids(tokenizer) -> tuple[int, int]:
    """(end-of-text id, padding id) of an open_clip tokenizer, which masking needs."""
    if hasattr(tokenizer, "eot_token_id"):  # open_clip's SimpleTokenizer pads with 0
        return int(tokenizer.eot_token_id), 0
    inner = getattr(tokenizer, "tokenizer", None)
    eot = getattr(inner, "eos_token_id", None)
    eot = getattr(inner, "sep_token_id", None) if eot is None else eot
    pad = getattr(inner, "pad_token_id", None)
    if eot is None or pad is None:
        raise ValueError(
            f"text masking needs the tokenizer's end-of-text and padding ids; "
            f"{type(tokenizer).__name__} does not give them (set mask_ratio: 0)"
        )
    return int(eot), int(pad)


def mask_tokens(
    tokens: torch.Tensor, ratio: float, eot_token_id: int, scores: torch.Tensor, pad_token_id: int = 0
) -> torch.Tensor:
    """Replace round(ratio * n) content tokens of each row by the pad id: those with the lowest `scores`."""
    if ratio <= 0:
        return tokens
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    eot_position = (tokens == eot_token_id).int().argmax(dim=1, keepdim=True)
    content = (positions > 0) & (positions < eot_position)
    n_masked = torch.round(content.sum(dim=1, keepdim=True) * ratio).long()
    order = scores.masked_fill(~content, float("inf")).argsort(dim=1).argsort(dim=1)  # rank of each score
    return tokens.masked_fill(content & (order < n_masked), pad_token_id)
