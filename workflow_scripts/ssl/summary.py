"""SSL summary: the population tables of every parameter point and layer in one long table (contract SSL_SUMMARY).

Keeps the top-1 rows (the paper's headline prediction), with the point's parameters, the layer and the test
(two_model, crop_classifier, naive_bayes) as columns; `--population POINT/LAYER/TEST=FILE` names each table. An
audited published model's point is `external~NAME`: its training parameters are unknown (null). Run as `python -m workflow_scripts.ssl.summary`.
"""

from __future__ import annotations

import argparse

import polars as pl

from workflow_scripts.cli import add_keyed_file_arguments, keyed_files, run_stage
from workflow_scripts.contracts import SSL_POPULATION, SSL_SUMMARY
from workflow_scripts.io import atomic_path, write_parquet
from workflow_scripts.paramspace import SSL_POINT_KEYS, parse_segment

EXTERNAL = "external~"  # the point segment of an audited published model (as the VLM test's)
POPULATION_COLUMNS = ["prediction", "statistic", "top_p", "value", "mean", "std", "n_records"]


def summarise(populations: dict[str, str]) -> pl.DataFrame:
    """`populations`: {"POINT/LAYER/TEST": population file}; rows in the order given, then the tables' own order."""
    frames = []
    for key, file in populations.items():
        parts = key.rsplit("/", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"--population {key}: the key must be POINT/LAYER/TEST")
        point, layer, test = parts
        parameters = dict.fromkeys(SSL_POINT_KEYS)
        if not point.startswith(EXTERNAL):
            parameters |= parse_segment(point, SSL_POINT_KEYS)
        frames.append(
            SSL_POPULATION.read(file, POPULATION_COLUMNS)
            .filter(pl.col("prediction") == "top1")
            .with_columns(point=pl.lit(point), layer=pl.lit(layer), test=pl.lit(test))
            .with_columns(**{k: pl.lit(v) for k, v in parameters.items()})
        )
    return pl.concat(frames, how="diagonal_relaxed").select(SSL_SUMMARY.names)


def summary_stage(population: list[str], out: str, out_csv: str) -> None:
    populations = keyed_files(population, "population")
    table = summarise(populations)
    write_parquet(table, out, stage="ssl summary", contract=SSL_SUMMARY, params={"populations": list(populations)})
    with atomic_path(out_csv) as tmp:
        table.write_csv(tmp, float_precision=4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_keyed_file_arguments(
        parser, {"population": "a point, layer and test's population table"}, metavar="POINT/LAYER/TEST=FILE"
    )
    parser.add_argument("--out", required=True, help="summary Parquet")
    parser.add_argument("--out-csv", required=True, help="its CSV copy")
    run_stage(parser, argv, summary_stage)


if __name__ == "__main__":
    main()
