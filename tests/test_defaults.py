"""Every stage's defaults equal config.yaml's (or config/schema.yaml's `default:` for a key config.yaml leaves out).

A stage run by hand (`python -m workflow_scripts.<stage>`) then behaves as the workflow does with the
embedded config. Parameter dataclasses are compared field by field; a CLI's argparse defaults are read from
the parser its `main` builds (captured at `parse_args`, so nothing runs).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from workflow_scripts import adapters, detic, embed, knn, synthetic, text_reference, utility
from workflow_scripts.metrics.ssl import SSLMetricParams
from workflow_scripts.ssl.embed import SSLEmbedParams
from workflow_scripts.ssl.params import SSLTrainingParams
from workflow_scripts.training.params import TrainingParams

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
DATASET_SCHEMA = SCHEMA["properties"]["datasets"]["additionalProperties"]


def schema_defaults(block: dict) -> dict:
    """{key: default} of a schema object's properties that declare one."""
    return {key: spec["default"] for key, spec in block["properties"].items() if "default" in spec}


def settings(name: str) -> dict:
    """A top-level config block as the workflow sees it: config.yaml's keys over the schema's defaults."""
    return {**schema_defaults(SCHEMA["properties"][name]), **CONFIG.get(name, {})}


ONE_MODEL = settings("one_model")
REFERENCE_OPTIONS = {
    **schema_defaults(SCHEMA["properties"]["one_model"]["properties"]["reference_options"]),
    **ONE_MODEL.get("reference_options", {}),
}
DETIC = schema_defaults(DATASET_SCHEMA["properties"]["detic"])
SSL_SCHEMA = SCHEMA["properties"]["ssl"]["properties"]
SSL_CONFIG = CONFIG.get("ssl", {})


def ssl_settings(name: str) -> dict:
    """A block of `ssl` as the workflow sees it: config.yaml's keys over the schema's defaults."""
    return {**schema_defaults(SSL_SCHEMA[name]), **SSL_CONFIG.get(name, {})}


SSL_METRICS = ssl_settings("metrics")
SSL_BOOTSTRAP = {**schema_defaults(SSL_SCHEMA["metrics"]["properties"]["bootstrap"]), **SSL_METRICS["bootstrap"]}

# stage -> (parameter dataclass, the settings it must default to, fields the config does not set)
DATACLASSES = {
    "training": (TrainingParams, settings("training"), {"save_epochs"}),  # save_epochs: from the sweep plan
    "synthetic": (synthetic.SyntheticConfig, settings("synthetic"), set()),
    "datasets": (adapters.Validation, schema_defaults(DATASET_SCHEMA), {"training_pool"}),  # set by the rules
    "ssl.training": (SSLTrainingParams, ssl_settings("training"), {"save_epochs"}),
    "ssl.metrics": (
        SSLMetricParams,
        {"k": SSL_METRICS["k"], "top_p": tuple(SSL_METRICS["top_p"]), **SSL_BOOTSTRAP},
        set(),
    ),
    # the SSL embedding rules run on the embedding block's execution settings
    "ssl.embedding": (SSLEmbedParams, settings("embedding"), set()),
}


@pytest.mark.parametrize("stage", sorted(DATACLASSES))
def test_dataclass_defaults_equal_the_config(stage):
    cls, config, unset = DATACLASSES[stage]
    fields = {field.name: field.default for field in dataclasses.fields(cls)}
    assert set(fields) - set(config) == unset, f"{cls.__name__} fields without a `{stage}` setting"
    wrong = {
        name: (default, config[name]) for name, default in fields.items() if name in config and default != config[name]
    }
    assert not wrong, f"{cls.__name__} defaults differ from config `{stage}` (default, config): {wrong}"


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


def cli_parser(module, command: str | None = None) -> argparse.ArgumentParser:
    """The parser (or sub-command parser) that `module.main` builds, captured before it parses anything."""

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parsed) as parsed:
            module.main([])
    parser = parsed.value.parser
    if command is None:
        return parser
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


# stage -> [(module, sub-command, argparse dest, the setting the rule passes)]
CLI_DEFAULTS = {
    "embedding": [
        (embed, None, key, settings("embedding")[key])
        for key in ("batch_size", "caption_index", "device", "allow_cpu_fallback", "threads")
    ],
    "knn": [(knn, "search", key, settings("knn")[key]) for key in ("batch_size", "threads", "use_gpu")]
    + [(knn, "merge", key, settings("knn")[key]) for key in ("batch_size", "threads")],
    # the utility and text_reference rules run on the embedding block's device and threads
    "utility": [(utility, None, key, settings("utility")[key]) for key in ("probe_fraction", "seed", "probe_max_iter")]
    + [(utility, None, key, settings("embedding")[key]) for key in ("device", "threads")],
    "one_model": [(text_reference, None, "batch_size", ONE_MODEL["batch_size"])]
    + [(text_reference, None, key, settings("embedding")[key]) for key in ("caption_index", "device", "threads")]
    + [(text_reference, None, key, REFERENCE_OPTIONS[key]) for key in REFERENCE_OPTIONS],
    "detic": [(detic, "vocabulary", "prompt", DETIC["prompt"])]
    + [
        (detic, "detect", key, DETIC[key])
        for key in ("config_file", "score_threshold", "device", "batch_size", "workers")
    ],
}


@pytest.mark.parametrize("stage", sorted(CLI_DEFAULTS))
def test_cli_defaults_equal_the_config(stage):
    wrong = {}
    for module, command, dest, expected in CLI_DEFAULTS[stage]:
        default = cli_parser(module, command).get_default(dest)
        if default != expected:
            wrong[f"{module.__name__.rsplit('.', 1)[-1]} {command or ''} --{dest.replace('_', '-')}"] = (
                default,
                expected,
            )
    assert not wrong, f"CLI defaults differ from config `{stage}` (default, config): {wrong}"


def test_the_train_cli_takes_its_defaults_from_training_params():
    from workflow_scripts import train

    parser = cli_parser(train)
    assert {field.name: parser.get_default(field.name) for field in dataclasses.fields(TrainingParams)} == {
        field.name: field.default for field in dataclasses.fields(TrainingParams)
    }


def declared_defaults(schema: dict, config: dict, prefix: str = "") -> dict:
    """{dotted key: (schema default, config.yaml value)} of every key config.yaml sets and the schema defaults."""
    pairs = {}
    for key, spec in schema.get("properties", {}).items():
        if key not in config:
            continue
        if isinstance(config[key], dict):  # a block: its leaves are compared
            pairs.update(declared_defaults(spec, config[key], f"{prefix}{key}."))
        elif "default" in spec:
            pairs[prefix + key] = (spec["default"], config[key])
    return pairs


def test_schema_defaults_equal_config_yaml():
    """The schema's defaults (what a config leaving a key out gets) are config.yaml's values."""
    pairs = declared_defaults(SCHEMA, CONFIG)
    assert pairs, "no key both defaulted by the schema and set by config.yaml: the walk found nothing"
    wrong = {key: pair for key, pair in pairs.items() if pair[0] != pair[1]}
    assert not wrong, f"config/schema.yaml defaults differ from config.yaml (schema, config.yaml): {wrong}"
