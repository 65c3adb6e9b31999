"""One place for the metric stage's defaults: MetricParams equals config.yaml's metrics section, and the CLI's
flags come from it."""

import dataclasses
from pathlib import Path

import yaml

from workflow_scripts.metrics import MetricParams
from workflow_scripts.metrics.__main__ import parser

CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


def test_metric_params_defaults_equal_the_config():
    section = yaml.safe_load(CONFIG.read_text())["metrics"]
    bootstrap = section.pop("bootstrap")
    # which query sets exist is the DAG's choice (rules/common.smk), not a parameter of one metric job
    assert isinstance(section.pop("symmetric"), bool)
    assert 'config["metrics"]["symmetric"]' in (CONFIG.parent / "rules" / "common.smk").read_text()
    expected = {**section, **bootstrap, "top_l": tuple(section["top_l"])}
    defaults = {field.name: field.default for field in dataclasses.fields(MetricParams)}
    assert {name: defaults[name] for name in expected} == expected
    assert set(defaults) - set(expected) == {"spill_dir"}  # where the spill goes: an execution setting, not config


def test_cli_defaults_are_the_dataclass_defaults():
    required = [
        "--target-neighbors",
        "a",
        "--reference-neighbors",
        "b",
        "--query-annotations",
        "c",
        "--public-annotations",
        "d",
        "--queries",
        "e",
        "--out-dir",
        "f",
    ]
    args = vars(parser().parse_args(required))
    assert {
        name: args[name] for name in (field.name for field in dataclasses.fields(MetricParams))
    } == dataclasses.asdict(MetricParams())
    assert parser().parse_args([*required, "--top-l", "5,50", "--k", "3"]).top_l == (5, 50)
