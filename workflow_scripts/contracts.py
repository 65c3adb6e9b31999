"""Every Parquet table of the workflow, declared once in Arrow types.

A `Contract` names a table's required columns and their types. Writers conform a table to it before it
reaches disk (missing columns and uncastable types are refused, naming the file); readers scan through it,
so a file from elsewhere (an adapter's input, a benchmark's output, a hand-written annotation table) is
refused with the file, the column and the type found rather than failing deep inside a stage. Readers accept
the physical variants other writers produce: any integer width for an integer column, any float width for
a float column, large or view strings, large lists.

docs/DESIGN.md §4 lists these tables for users; tests/test_contracts.py keeps the two in step.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from workflow_scripts.io import DataError, narrow, verify_checksums

# The Arrow types the contracts declare, by short name.
STRING, BOOL = pa.string(), pa.bool_()
INT16, INT32, INT64 = pa.int16(), pa.int32(), pa.int64()
FLOAT32, FLOAT64 = pa.float32(), pa.float64()
EMBEDDING = pa.list_(FLOAT32, 1)  # fixed-size list of float32; the width is the model's, any is accepted
STRINGS = pa.list_(STRING)
FLOATS = pa.list_(FLOAT32)


@dataclass(frozen=True)
class Contract:
    """A Parquet table's required columns (in order) and optional columns, with their Arrow types."""

    name: str
    path: str | None  # where the workflow writes it, in the grammar of docs/DESIGN.md §3; None: a user's input
    columns: tuple[pa.Field, ...]
    optional: tuple[pa.Field, ...] = field(default=())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(self.columns)

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def declared(self, name: str) -> pa.Field | None:
        return next((column for column in (*self.columns, *self.optional) if column.name == name), None)

    def polars(self, columns: list[str] | None = None) -> dict[str, pl.DataType]:
        """{name: polars type} of `columns` (default: the required ones), for building frames in memory."""
        return {name: _polars_type(self.declared(name).type) for name in (self.names if columns is None else columns)}

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=self.polars())

    def conform(self, table: pa.Table | pl.DataFrame, path: str | os.PathLike) -> pa.Table:
        """`table` with every declared column cast to its declared type; DataError naming `path` otherwise."""
        table = table.to_arrow() if isinstance(table, pl.DataFrame) else table
        missing = [name for name in self.names if name not in table.column_names]
        if missing:
            raise DataError(f"{path}: the {self.name} table lacks column(s) {missing}; has {table.column_names}")
        wrong = [
            f"'{found.name}' is {found.type}, not {self.declared(found.name).type}"
            for found in table.schema
            if self.declared(found.name) is not None
            and not _compatible(self.declared(found.name).type, _polars_type(found.type))
        ]
        if wrong:
            raise DataError(f"{path}: {self.name} column(s) of the wrong type: {'; '.join(wrong)}")
        fields = [found.with_type(self._write_type(found)) for found in table.schema]
        try:
            return table.cast(pa.schema(fields, metadata=table.schema.metadata))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:  # a value out of the declared type's range
            raise DataError(f"{path}: a {self.name} value does not fit its declared type: {error}") from error

    def _write_type(self, found: pa.Field) -> pa.DataType:
        """The type a column is written with: the declared one (a fixed-size list keeps its width), else narrowed."""
        column = self.declared(found.name)
        if column is None:
            return narrow(found.type)
        if pa.types.is_fixed_size_list(column.type) and pa.types.is_fixed_size_list(found.type):
            return pa.list_(column.type.value_type, found.type.list_size)
        return column.type

    def check(self, path: str | os.PathLike, columns: list[str] | None = None, *, extra: bool = False) -> list[str]:
        """The columns a reader gets: `columns` (default: the required ones), then with `extra` the file's others.

        DataError naming `path` for a missing file or column, or a declared column of an incompatible type
        (with `extra`, the declared optional columns present in the file are checked too).
        """
        wanted = self.names if columns is None else list(columns)
        schema = _file_schema(path)
        missing = [name for name in wanted if name not in schema]
        if missing:
            raise DataError(f"{path}: not a {self.name} table: missing column(s) {missing}; found {schema.names()}")
        if extra:
            wanted += [name for name in schema.names() if name not in wanted]
        wrong = [
            f"'{name}' is {schema[name]}, not {self.declared(name).type}"
            for name in wanted
            if self.declared(name) is not None and not _compatible(self.declared(name).type, schema[name])
        ]
        if wrong:
            raise DataError(f"{path}: {self.name} column(s) of the wrong type: {'; '.join(wrong)}")
        verify_checksums(path, wanted)
        return wanted

    def scan(self, path: str | os.PathLike, columns: list[str] | None = None, *, extra: bool = False) -> pl.LazyFrame:
        """A lazy view of `columns` (default: the required ones; with `extra` all the file's, those first) of the
        file at `path`, their types checked (`check`) and cast to the declared ones (a fixed-size list keeps its
        width): a reader sees one type per column whichever library wrote the file."""
        wanted = self.check(path, columns, extra=extra)
        casts = {
            name: _polars_type(self.declared(name).type)
            for name in wanted
            if self.declared(name) is not None and not pa.types.is_fixed_size_list(self.declared(name).type)
        }
        return pl.scan_parquet(path).select(wanted).cast(casts)

    def read(self, path: str | os.PathLike, columns: list[str] | None = None, *, extra: bool = False) -> pl.DataFrame:
        """`scan(...)` collected; a value that does not fit its declared type is a DataError naming `path`."""
        frame = self.scan(path, columns, extra=extra)
        try:
            return frame.collect()
        except pl.exceptions.PolarsError as error:  # e.g. an int64 value out of an int16 column's range
            raise DataError(f"{path}: a {self.name} value does not fit its declared type ({error})") from error


def all_contracts() -> list[Contract]:
    """Every contract declared in this module, in declaration order."""
    return [value for value in globals().values() if isinstance(value, Contract)]


def _file_schema(path: str | os.PathLike) -> pl.Schema:
    if not Path(path).exists():
        raise DataError(f"{path}: file does not exist")
    try:
        return pl.scan_parquet(path).collect_schema()
    except Exception as error:  # polars raises many types for files that are not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _compatible(declared: pa.DataType, found: pl.DataType) -> bool:
    """Whether a column polars reads as `found` holds values of the declared Arrow type (all-null columns do)."""
    if found == pl.Null:
        return True
    if pa.types.is_integer(declared):
        return found.is_integer()
    if pa.types.is_floating(declared):
        return found.is_float()
    if pa.types.is_string(declared):
        return found == pl.String
    if pa.types.is_fixed_size_list(declared):
        return isinstance(found, pl.Array) and _compatible(declared.value_type, found.inner)
    if pa.types.is_list(declared):
        return isinstance(found, pl.List) and _compatible(declared.value_type, found.inner)
    return _polars_type(declared) == found


@functools.cache
def _polars_type(data_type: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.table({"c": pa.array([], data_type)}))["c"].dtype


def _fields(**columns: pa.DataType) -> tuple[pa.Field, ...]:
    """`name=type` columns, in the order given."""
    return tuple(pa.field(name, data_type) for name, data_type in columns.items())


def _names(template: str, *parts: tuple[str, ...]) -> list[str]:
    """`template` filled with every combination of `parts`, the last varying fastest."""
    return [template.format(*combination) for combination in itertools.product(*parts)]


RECORDS = Contract(
    "records",
    "data/{dataset}/records.parquet",
    _fields(id=STRING, image_path=STRING, captions=STRINGS),
    _fields(image_sha256=STRING, scene=STRING, coco_id=INT64, label=STRING, source_dataset=STRING)
    + _fields(dominant_object=STRING, image_offset=INT64, image_size=INT64),
)
GROUND_TRUTH = Contract(
    "ground_truth", "data/{dataset}/ground_truth.parquet", _fields(id=STRING, labels=STRINGS, scores=FLOATS)
)
VALIDATION = Contract(
    "validation", "data/{dataset}/validation.parquet", _fields(id=STRING, image_path=STRING, problem=STRING)
)
ANNOTATIONS = Contract(
    "annotations", "data/{dataset}/annotations.parquet", _fields(id=STRING, labels=STRINGS, scores=FLOATS)
)
DETIC_VOCABULARY = Contract(
    "detic vocabulary", "detic/vocabularies/{name}-{hash}.parquet", _fields(class_name=STRING, embedding=EMBEDDING)
)
SPLIT_IDS = Contract("split ids", "splits/{split}/{A,B,holdout}.parquet", _fields(id=STRING))
# The SSL test (docs/ssl-plan.md). Boxes: one row per box, pixels, x_max/y_max exclusive.
BOXES = Contract(
    "boxes",
    "data/{dataset}/boxes.parquet",
    _fields(id=STRING, image_width=INT32, image_height=INT32)
    + _fields(x_min=FLOAT32, y_min=FLOAT32, x_max=FLOAT32, y_max=FLOAT32),
)
# Every object a synthetic image holds (workflow_scripts/synthetic.py): one row per drawn object, its class and the
# box of its drawn pixels (pixels, x_max/y_max exclusive; also those a later object paints over).
OBJECTS = Contract(
    "objects",
    "data/{dataset}/objects.parquet",
    _fields(id=STRING, label=STRING, x_min=INT32, y_min=INT32, x_max=INT32, y_max=INT32),
)
# One row per measured id; the crop's columns are null and drop_reason names why when the id has no crop.
CROPS = Contract(
    "crops",
    "ssl/{dataset}/crops.parquet",
    _fields(id=STRING, label=STRING, x_min=INT32, y_min=INT32, x_max=INT32, y_max=INT32, drop_reason=STRING),
)
EMBEDDINGS = Contract(
    "embeddings",
    "embeddings/{split}/{point}/{side}/{public,captions,public_captions}.parquet",
    _fields(id=STRING, embedding=EMBEDDING),
)
NEIGHBORS = Contract(
    "neighbors",
    "neighbors/{split}/{point}/{side}.parquet",
    _fields(query_id=STRING, rank=INT16, public_id=STRING, score=FLOAT32),
)
UTILITY = Contract(
    "utility",
    "utility/{split}/{point}/{side}.parquet",
    _fields(task=STRING, metric=STRING, accuracy=FLOAT64, chance=FLOAT64, n_classes=INT64, n_eval=INT64),
)
AGREEMENT = Contract(
    "agreement",
    "agreement/{split}/{point}/agreement.parquet",
    _fields(test_a=STRING, test_b=STRING, n_records=INT64, agreement=FLOAT64, jaccard=FLOAT64)
    + _fields(n_both_flagged=INT64, n_flagged_a=INT64, n_flagged_b=INT64),
)
_AGREEMENT_STATISTICS = _names("{}_{}", ("target", "holdout", "net"), ("value", "std"))
AGREEMENT_POPULATION = Contract(
    "agreement population",
    "agreement/{split}/{point}/population.parquet",
    _fields(test=STRING, metric=STRING, label_mode=STRING, **dict.fromkeys(_AGREEMENT_STATISTICS, FLOAT64)),
)
SUMMARY_METRICS = ("PPG", "PRG", "AUCG")  # the population metrics a sweep summary carries
_SUMMARY_STATISTICS = _names("{}{}_{}", ("", "holdout_"), SUMMARY_METRICS, ("value", "mean", "std"))
# One row per parameter point; the utility columns `{A,B}_{task}_{metric}` follow these, as the tasks configured.
SUMMARY = Contract(
    "summary",
    "summary/{split}.parquet",
    _fields(split=STRING, point=STRING, n_train=INT64, epochs=INT64, temperature=FLOAT64, weight_decay=FLOAT64)
    + _fields(mask_ratio=FLOAT64, seed=INT64, **dict.fromkeys(_SUMMARY_STATISTICS, FLOAT64))
    + _fields(**dict.fromkeys(_names("{}_net", SUMMARY_METRICS), FLOAT64)),
    # metrics.symmetric: B's records with f_B as target (reverse_), and the mean of the two directions
    _fields(**dict.fromkeys(_names("reverse_{}_{}", SUMMARY_METRICS, ("value", "mean", "std")), FLOAT64))
    + _fields(**dict.fromkeys(_names("{}_symmetric{}", SUMMARY_METRICS, ("", "_std")), FLOAT64)),
)
# Over the training seeds (workflow_scripts/seeds.py): one row per point less its seed. Each per-seed statistic
# `{col}` (values, net and symmetric gaps, utility) is its mean over the seeds, with `{col}_seed_{std,min,max}`
# (std ddof 1, null with one seed); a bootstrap `..._std` is its mean over the seeds; `..._mean` is dropped.
_SEED_SPREADS = ("", "_seed_std", "_seed_min", "_seed_max")
_SEED_STATISTICS = _names("{}{}_value{}", ("", "holdout_", "reverse_"), SUMMARY_METRICS, _SEED_SPREADS)
_SEED_STATISTICS += _names("{}_{}{}", SUMMARY_METRICS, ("net", "symmetric"), _SEED_SPREADS)
_SEED_STATISTICS += _names("{}{}_std", ("", "holdout_", "reverse_"), SUMMARY_METRICS)
_SEED_STATISTICS += _names("{}_symmetric_std", SUMMARY_METRICS)
SEED_SUMMARY = Contract(
    "seed summary",
    "seeds/{split}/seeds.parquet",
    _fields(split=STRING, n_train=INT64, epochs=INT64, temperature=FLOAT64, weight_decay=FLOAT64)
    + _fields(mask_ratio=FLOAT64, n_seeds=INT64, seeds=pa.list_(INT64)),
    _fields(**dict.fromkeys(_SEED_STATISTICS, FLOAT64)),
)
# Adjacent values of a swept parameter, the other keys fixed (`fixed`: `name~value/...`), compared on the same
# records over the seeds both points have: difference = gap_X − gap_Y of a win gap, its percentile interval of the
# seed-and-record bootstrap at `level`; `separated`: the interval excludes 0.
COMPARISONS = Contract(
    "seed comparisons",
    "seeds/{split}/comparisons.parquet",
    _fields(parameter=STRING, value_x=STRING, value_y=STRING, fixed=STRING, queries=STRING, metric=STRING)
    + _fields(label_mode=STRING, difference=FLOAT64, ci_low=FLOAT64, ci_high=FLOAT64, separated=BOOL)
    + _fields(level=FLOAT64, n_seeds=INT64, n_records=INT64, n_boot=INT64),
)

# Tables a user hands the workflow (path None: they live wherever the config names them). An annotation table
# without scores: every label is certain.
CAPTION_TABLE = Contract("caption table", None, _fields(path=STRING, caption=STRING))
ANNOTATION_TABLE = Contract("annotation table", None, _fields(id=STRING, labels=STRINGS), _fields(scores=FLOATS))

# The training stage's logs: one row per epoch, and one every log_every_steps optimizer steps.
_LOGGED = _fields(loss=FLOAT64, lr=FLOAT64, logit_scale=FLOAT64, seconds=FLOAT64)
TRAIN_LOG = Contract("train log", "models/{split}/{point}/{side}/run/train_log.parquet", _fields(epoch=INT64) + _LOGGED)
TRAIN_STEPS = Contract(
    "train steps", "models/{split}/{point}/{side}/run/train_steps.parquet", _fields(step=INT64, epoch=INT64) + _LOGGED
)
# The SSL training stage's log (workflow_scripts/ssl/train.py), one row per epoch. embedding_std: the mean
# per-dimension standard deviation of the L2-normalised projector outputs, 0 when the model collapses.
SSL_TRAIN_LOG = Contract(
    "ssl train log",
    "ssl/{dataset}/models/{point}/{side}/run/train_log.parquet",
    _fields(epoch=INT64, loss=FLOAT64, lr=FLOAT64, embedding_std=FLOAT64, seconds=FLOAT64),
)
# The crop classifier's training log (workflow_scripts/ssl/crop_classifier.py), one row per epoch: the mean
# cross-entropy and accuracy on the augmented training crops, the accuracy on the validation crops (null without).
CROP_CLASSIFIER_LOG = Contract(
    "crop classifier log",
    "ssl/{dataset}/references/crop_classifier/{side}/run/train_log.parquet",
    _fields(epoch=INT64, loss=FLOAT64, train_accuracy=FLOAT64, val_accuracy=FLOAT64, lr=FLOAT64, seconds=FLOAT64),
)
METRICS_PATH = "metrics/{split}/{point}[/one_model~{mode}]/{queries}"
_SCORES = dict(n_predicted=INT32, n_correct=INT32, precision=FLOAT64, recall=FLOAT64, f1=FLOAT64, nn_score=FLOAT32)
METRIC_RECORDS = Contract(
    "metric records",
    f"{METRICS_PATH}/records.parquet",
    _fields(id=STRING, label_mode=STRING, n_objects=INT32)
    + _fields(**{f"{name}_{side}": type_ for side in ("target", "reference") for name, type_ in _SCORES.items()}),
)
POPULATION = Contract(
    "population",
    f"{METRICS_PATH}/population.parquet",
    _fields(label_mode=STRING, metric=STRING, value=FLOAT64, mean=FLOAT64, std=FLOAT64, n_boot=INT64, frac=FLOAT64)
    + _fields(n_records=INT64, n_excluded=INT64, k=INT32, top_n=INT32),
)
SAMPLE_LEVEL = Contract(
    "sample level",
    f"{METRICS_PATH}/sample_level.parquet",
    _fields(order=STRING, oracle=BOOL, top_l=INT64, precision_gap=FLOAT64, recall_gap=FLOAT64, f1_gap=FLOAT64),
)

# A one-model reference's outputs on one crop set (workflow_scripts/ssl/predictions.py): per kept crop, the
# classifier's most probable label, its probability, the entropy of its distribution over the classes, and
# `votes`: its distribution as k votes (largest remainders), most probable label first, the kNN's support.
SSL_PREDICTIONS = Contract(
    "ssl predictions",
    "ssl/{dataset}/references/{reference}/{side}/{crop_set}.parquet",
    _fields(id=STRING, predicted=STRING, probability=FLOAT64, entropy=FLOAT64, votes=STRINGS),
)
# The tags an annotator finds in each crop (workflow_scripts/ssl/crop_tags.py), highest score first.
CROP_TAGS = Contract("crop tags", "ssl/{dataset}/crop_tags.parquet", _fields(id=STRING, labels=STRINGS, scores=FLOATS))

# The SSL test's metric tables (workflow_scripts/metrics/ssl.py; docs/DESIGN.md §9), one set per test (two_model,
# crop_classifier, naive_bayes). Records: each crop's target (target_model: f_A or f_B) and reference votes.
SSL_METRICS_PATH = "ssl/{dataset}/metrics/{point}/{layer}/{test}"
_SSL_VOTES = dict(predicted=STRING, vote_share=FLOAT64, entropy=FLOAT64, correct_top1=BOOL, correct_top5=BOOL)
SSL_RECORDS = Contract(
    "ssl records",
    f"{SSL_METRICS_PATH}/records.parquet",
    _fields(id=STRING, crop_set=STRING, target_model=STRING, label=STRING)
    + _fields(**{f"{name}_{role}": type_ for role in ("target", "reference") for name, type_ in _SSL_VOTES.items()}),
)
# Long: one row per prediction (top1, top5), statistic and top_p (quadrants: top_p 100, all records).
SSL_POPULATION = Contract(
    "ssl population",
    f"{SSL_METRICS_PATH}/population.parquet",
    _fields(prediction=STRING, statistic=STRING, top_p=FLOAT64, value=FLOAT64, mean=FLOAT64, std=FLOAT64)
    + _fields(n_boot=INT64, frac=FLOAT64, n_records=INT64, k=INT32),
)
# One row per point, layer and population row of the top-1 prediction: the SSL test's results side by side.
SSL_SUMMARY = Contract(
    "ssl summary",
    "ssl/{dataset}/summary.parquet",
    _fields(point=STRING, method=STRING, epochs=INT64, seed=INT64, layer=STRING, test=STRING, statistic=STRING)
    + _fields(top_p=FLOAT64)
    + _fields(value=FLOAT64, mean=FLOAT64, std=FLOAT64, n_records=INT64),
)
# The SSL tests side by side (workflow_scripts/ssl/agreement.py): each test's top-1 population rows.
SSL_AGREEMENT_POPULATION = Contract(
    "ssl agreement population",
    "ssl/{dataset}/agreement/{point}/{layer}/population.parquet",
    _fields(test=STRING, statistic=STRING, top_p=FLOAT64, value=FLOAT64, mean=FLOAT64, std=FLOAT64)
    + _fields(n_records=INT64),
)
_SSL_SIDES = _names("{}_{}", ("predicted", "vote_share", "entropy"), ("target", "reference"))
SSL_SAMPLE_LEVEL = Contract(
    "ssl sample level",
    f"{SSL_METRICS_PATH}/sample_level.parquet",
    _fields(rank=INT64, id=STRING, crop_set=STRING, label=STRING)
    + _fields(**{name: STRING if name.startswith("predicted") else FLOAT64 for name in _SSL_SIDES})
    + _fields(entropy_gap=FLOAT64),
)
# Near-duplicates between a split's training images and its public set (workflow_scripts/near_duplicates.py): one
# row per pair at or above the similarity threshold, the cosine similarity of their colour thumbnails.
NEAR_DUPLICATES = Contract(
    "near duplicates",
    "splits/{split}/near_duplicates.parquet",
    _fields(pool_id=STRING, public_id=STRING, similarity=FLOAT32),
)
