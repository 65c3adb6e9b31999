"""The one-model SSL test's naive Bayes reference: a crop's top tags -> a distribution over the foreground classes.

Kokhlikyan et al. ("Measuring Déjà vu Memorization Efficiently", NeurIPS 2024) replace the reference model f_B by
a cheap classifier that predicts the foreground label from the periphery crop: here a multinomial naive Bayes over
the first `tags_k` tags of each crop's CROP_TAGS row (highest score first; the paper: RAM's top 3 tags), each
kept crop one document, its label (the crops table's) its class.

- Fit on the kept crops of one split file (`--train-ids`, e.g. A): classes = their labels (C, in name order),
  vocabulary = the tags of their top-k lists (V). With n_c crops of class c among N, and n_tc the times tag t is in
  a top-k list of class c: P(c) = (n_c + α) / (N + α·C), P(t | c) = (n_tc + α) / (Σ_t' n_t'c + α·V).
- Predict: log P(c | tags) = log P(c) + Σ_t log P(t | c) + const over the crop's top-k tags, a tag unseen in
  training ignored (so a crop without known tags gets the prior), normalised by log-sum-exp. The distribution is
  written by `workflow_scripts.ssl.predictions.predictions_table` (k = `--votes-k` votes, the kNN's support).

Vectorised: the counts are one `np.bincount` over class x tag codes; prediction gathers the [V+1, C]
log-likelihood rows of each crop's [n, k] tag codes (the extra row, zeros, stands for an unseen tag or an empty
slot) and sums them one tag slot at a time, in row blocks of at most 2^22 gathered values. Deterministic: no seed is drawn.

Against the paper's code (DejaVu OSS's ``memorization_nb.py``): it scores a class by Π_t n_tc / n_t over the top-k
tags, a product of P(c | t) estimates without the prior P(c) and left unnormalised (its confidence is that
product); its Laplace option smooths n_tc / n_t as (n_tc + α) / (n_t + k·α), the denominator counting the k tags
where a distribution over the classes needs C·α; without it an unseen (t, c) gets 1e-10 / n_t; a crop without tags
scores 0 for every class (the max then picks by class key); its counts come from a fraction of the training crops
(``nb_counts_generator.py --frac``) drawn without a seed. Here: the textbook multinomial model above, with the
prior, one α for the prior and the likelihoods, a normalised posterior, and all training crops of the split.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from workflow_scripts.cli import LOG_FORMAT, keyed_files
from workflow_scripts.contracts import CROP_TAGS, CROPS, SPLIT_IDS, SSL_PREDICTIONS
from workflow_scripts.io import DataError, check_unique_ids, write_parquet
from workflow_scripts.ssl.predictions import predictions_table

log = logging.getLogger(__name__)

BLOCK = 1 << 22  # gathered log-likelihood values (rows x tags_k x classes) at a time
DEFAULT_TAGS_K, DEFAULT_ALPHA = 3, 1.0


@dataclass(frozen=True)
class NaiveBayes:
    """A fitted multinomial naive Bayes: classes and vocabulary in name order, log P(c) [C] and log P(t | c) as
    [V + 1, C] (row V, zeros: a tag unseen in training)."""

    classes: list[str]
    vocabulary: list[str]
    log_prior: np.ndarray
    log_likelihood: np.ndarray


def _flat_tags(tags: pl.Series, k: int) -> tuple[np.ndarray, np.ndarray, pl.Series]:
    """(row of each tag, its position in the row, the tags) of each row's first k tags (a null list: none)."""
    top = tags.list.head(k).fill_null(pl.lit([], pl.List(pl.String)))
    lengths = top.list.len().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(top)), lengths)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(rows)) - np.repeat(starts, lengths)
    array = top.to_arrow()
    array = pa.concat_arrays(array.chunks) if isinstance(array, pa.ChunkedArray) else array
    values = pl.Series("tag", array.flatten(), dtype=pl.String)  # list offsets: an empty list adds no value
    return rows, positions, values


def _codes(values: pl.Series, vocabulary: list[str]) -> np.ndarray:
    """Each tag's index in `vocabulary`; len(vocabulary) for a tag not in it (or a null)."""
    lookup = pl.DataFrame({"tag": vocabulary, "code": np.arange(len(vocabulary), dtype=np.int64)})
    coded = values.to_frame("tag").join(lookup, on="tag", how="left", maintain_order="left")
    return coded["code"].fill_null(len(vocabulary)).to_numpy()


def tag_matrix(tags: pl.Series, vocabulary: list[str], k: int) -> np.ndarray:
    """[n, k] codes of each row's first k tags in `vocabulary`; len(vocabulary) for an unseen tag or no tag."""
    rows, positions, values = _flat_tags(tags, k)
    matrix = np.full((len(tags), k), len(vocabulary), dtype=np.int64)
    matrix[rows, positions] = _codes(values, vocabulary)
    return matrix


def fit(labels: list[str], tags: pl.Series, k: int, alpha: float) -> NaiveBayes:
    """The naive Bayes of crops with these labels and tag lists (highest score first), over their first k tags."""
    if not len(labels):
        raise ValueError("no training crop")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive (Laplace smoothing), not {alpha}")
    classes, class_codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    rows, _, values = _flat_tags(tags, k)
    vocabulary = values.drop_nulls().unique().sort().to_list()
    n_classes, n_tags = len(classes), len(vocabulary)
    codes = _codes(values, vocabulary)
    seen = codes < n_tags
    pairs = np.bincount(class_codes[rows[seen]] * n_tags + codes[seen], minlength=n_classes * n_tags)
    n_tc = pairs.reshape(n_classes, n_tags).astype(np.float64)
    n_c = np.bincount(class_codes, minlength=n_classes).astype(np.float64)
    log_prior = np.log(n_c + alpha) - np.log(len(labels) + alpha * n_classes)
    log_likelihood = np.log(n_tc + alpha) - np.log(n_tc.sum(axis=1, keepdims=True) + alpha * n_tags)
    log_likelihood = np.vstack([log_likelihood.T, np.zeros((1, n_classes))])
    return NaiveBayes(classes.tolist(), vocabulary, log_prior, log_likelihood)


def posterior_blocks(model: NaiveBayes, tags: pl.Series, k: int):
    """(first row, [b, C] posteriors) of the crops with these tag lists, block by block, in row order."""
    codes = tag_matrix(tags, model.vocabulary, k)
    block = max(1, BLOCK // max(1, k * len(model.classes)))
    for first in range(0, len(codes), block):
        rows = codes[first : first + block]
        scores = np.broadcast_to(model.log_prior, (len(rows), len(model.classes))).copy()
        for slot in range(k):  # k gathers of [b, C] rows: no [b, k, C] intermediate
            scores += model.log_likelihood[rows[:, slot]]
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        yield first, probabilities / probabilities.sum(axis=1, keepdims=True)


def posteriors(model: NaiveBayes, tags: pl.Series, k: int) -> np.ndarray:
    """[n, C] posteriors of the crops with these tag lists (all at once: for small inputs and tests)."""
    blocks = [probabilities for _, probabilities in posterior_blocks(model, tags, k)]
    return np.concatenate(blocks) if blocks else np.zeros((0, len(model.classes)))


def predictions(model: NaiveBayes, ids: list[str], tags: pl.Series, k: int, votes_k: int) -> pl.DataFrame:
    """The SSL_PREDICTIONS table of these crops over the model's classes, built block by block."""
    frames = [
        predictions_table(ids[first : first + len(block)], block, model.classes, votes_k)
        for first, block in posterior_blocks(model, tags, k)
    ]
    return pl.concat(frames) if frames else SSL_PREDICTIONS.empty()


# --- reading and checking ---------------------------------------------------------------------------------------


def read_crop_tags(tags_path: str) -> pl.DataFrame:
    """The CROP_TAGS table, checked: unique ids, labels and scores of equal lengths, highest score first."""
    tags = CROP_TAGS.read(tags_path)
    check_unique_ids(tags["id"], tags_path)
    lengths = pl.col("labels").list.len().fill_null(0) != pl.col("scores").list.len().fill_null(0)
    unsorted = pl.col("scores").list.eval(pl.element().diff() > 0).list.any().fill_null(False)
    bad = tags.filter(lengths | unsorted)["id"]
    if len(bad):
        raise DataError(
            f"{tags_path}: {len(bad)} row(s) whose labels and scores differ in length or are not highest score "
            f"first, e.g. {bad.head(5).to_list()}"
        )
    return tags


def crop_set(ids_path: str, crops: pl.DataFrame, tags: pl.DataFrame, crops_path: str, tags_path: str):
    """The kept crops of the ids of `ids_path` (id, label, labels), in its order; DataError for an id without a crop
    row, a kept crop without a label or without a tags row."""
    ids = SPLIT_IDS.read(ids_path)
    check_unique_ids(ids["id"], ids_path)
    rows = ids.join(crops.with_columns(in_crops=pl.lit(True)), on="id", how="left", maintain_order="left")
    absent = rows.filter(pl.col("in_crops").is_null())["id"]
    if len(absent):
        raise DataError(
            f"{ids_path}: {len(absent)} id(s) without a row in {crops_path}, e.g. {absent.head(5).to_list()}"
        )
    kept = rows.filter(pl.col("drop_reason").is_null())
    if len(kept) < len(rows):
        log.info("%s: %d of %d id(s) have no kept crop; skipped", ids_path, len(rows) - len(kept), len(rows))
    unlabelled = kept.filter(pl.col("label").is_null())["id"]
    if len(unlabelled):
        raise DataError(f"{crops_path}: kept crop(s) without a label, e.g. {unlabelled.head(5).to_list()}")
    kept = kept.join(tags.with_columns(in_tags=pl.lit(True)), on="id", how="left", maintain_order="left")
    untagged = kept.filter(pl.col("in_tags").is_null())["id"]
    if len(untagged):
        raise DataError(
            f"{tags_path}: no row for {len(untagged)} kept crop(s) of {ids_path}, e.g. {untagged.head(5).to_list()}"
        )
    return kept.select("id", "label", "labels")


def naive_bayes_reference(
    crops: str,
    tags: str,
    train_ids: str,
    predict: dict[str, str],
    votes_k: int,
    tags_k: int = DEFAULT_TAGS_K,
    alpha: float = DEFAULT_ALPHA,
) -> None:
    """Fit on the kept crops of `train_ids`; write the SSL_PREDICTIONS table of each {ids file: out} of `predict`."""
    if tags_k < 1:
        raise ValueError(f"tags_k must be at least 1, not {tags_k}")
    crop_rows = CROPS.read(crops, ["id", "label", "drop_reason"])
    check_unique_ids(crop_rows["id"], crops)
    tag_rows = read_crop_tags(tags)
    train = crop_set(train_ids, crop_rows, tag_rows, crops, tags)
    if not len(train):
        raise DataError(f"{train_ids}: no kept crop to fit the naive Bayes on")
    model = fit(train["label"].to_list(), train["labels"], tags_k, alpha)
    log.info(
        "fitted on %d crop(s) of %s: %d classes, %d tags",
        len(train),
        train_ids,
        len(model.classes),
        len(model.vocabulary),
    )
    settings = {"reference": "naive_bayes", "crops": crops, "tags": tags, "train_ids": train_ids}
    settings |= {"tags_k": tags_k, "alpha": alpha, "votes_k": votes_k}
    for ids_path, out in predict.items():
        queries = crop_set(ids_path, crop_rows, tag_rows, crops, tags)
        table = predictions(model, queries["id"].to_list(), queries["labels"], tags_k, votes_k)
        write_parquet(table, out, contract=SSL_PREDICTIONS, stage="ssl_reference", params={**settings, "ids": ids_path})
        log.info("%s: %d crop(s) of %s", out, len(table), ids_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", required=True, help="crops.parquet (CROPS): the crops and their labels")
    parser.add_argument("--tags", required=True, help="crop_tags.parquet (CROP_TAGS) of workflow_scripts.ssl.crop_tags")
    parser.add_argument("--train-ids", required=True, help="the split file whose kept crops it is fitted on (e.g. A)")
    parser.add_argument(
        "--predict", action="append", required=True, metavar="IDS=OUT", help="predict these ids' kept crops; repeatable"
    )
    parser.add_argument("--votes-k", type=int, required=True, help="votes a distribution becomes (the kNN's k)")
    parser.add_argument(
        "--tags-k", type=int, default=DEFAULT_TAGS_K, help=f"tags a crop is (default: {DEFAULT_TAGS_K})"
    )
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help=f"Laplace smoothing (default: {DEFAULT_ALPHA})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    naive_bayes_reference(
        args.crops,
        args.tags,
        args.train_ids,
        keyed_files(args.predict, "predict"),
        args.votes_k,
        args.tags_k,
        args.alpha,
    )


if __name__ == "__main__":
    main()
