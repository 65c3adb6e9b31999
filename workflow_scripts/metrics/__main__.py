"""`python -m workflow_scripts.metrics`: the metric stage's command line (rules/metrics.smk runs it)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

from workflow_scripts.cli import dataclass_from_args
from workflow_scripts.metrics.params import TABLES, MetricParams

INPUTS = {
    "target_neighbors": "neighbours Parquet of f_A (the target model)",
    "reference_neighbors": "neighbours Parquet of f_B (the reference)",
    "query_annotations": "annotations Parquet covering the query records",
    "public_annotations": "annotations Parquet of the public set",
    "queries": "split Parquet listing the query record ids",
}


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(value) for value in text.split(",") if value)


def parser() -> argparse.ArgumentParser:
    """Input and output files, then one flag per MetricParams field with its default."""
    parser = argparse.ArgumentParser(
        description="Déjà vu metrics: per-record scores, population and sample-level gaps."
    )
    for name, help_ in INPUTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", required=True, help=help_)
    parser.add_argument(
        "--out-dir", help="folder for records, population and sample_level Parquet (or the three below)"
    )
    for table in TABLES:
        parser.add_argument(f"--{table.replace('_', '-')}", help=f"the {table} table's file (instead of --out-dir)")
    for field in dataclasses.fields(MetricParams):
        kind = {"top_l": int_list, "spill_dir": str}.get(field.name, type(field.default))
        default = ",".join(map(str, field.default)) if field.name == "top_l" else field.default
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=field.default,
            help=f"{field.metadata['help']} (default: {default})",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    arguments = parser()
    args = arguments.parse_args(argv)
    outputs = {table: getattr(args, table) for table in TABLES}
    if (args.out_dir is None) != all(outputs.values()) or (args.out_dir is not None and any(outputs.values())):
        arguments.error("give either --out-dir or all of --records, --population, --sample-level")
    from workflow_scripts.metrics.tables import compute  # the engine (numba, polars) only once the flags are good

    compute(
        *(getattr(args, name) for name in INPUTS),
        dataclass_from_args(MetricParams, args),
        out_dir=args.out_dir,
        outputs=outputs if args.out_dir is None else None,
    )


if __name__ == "__main__":
    # numba's first compiled call probes for a BLAS by importing scipy.linalg (~0.35 s of CPU at start-up).
    # No kernel here multiplies matrices: in this process the probe finds none.
    sys.modules.setdefault("scipy.linalg.cython_blas", None)
    # Each neighbours file is consumed in order by one thread whose compiled scoring is slower than polars'
    # decoding, so row groups decoded ahead only wait in memory: one ahead suffices (read when the first file is
    # scanned; the environment can still override it).
    os.environ.setdefault("POLARS_ROW_GROUP_PREFETCH_SIZE", "1")
    main()
    # Python's last garbage collection at exit walks numba's compiler objects; nothing needs it.
    gc.freeze()
