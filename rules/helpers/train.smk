# Helpers of rules/train.smk (Snakemake's linter wants functions and rules in separate files).

# Training settings that choose where and how fast a model trains, not what it learns: the launcher's
# (workflow_scripts.launch) and Snakemake's threads, and those passed to the stage as execution flags.
TRAINING_LAUNCH = ("threads", *LAUNCH_SETTINGS)
# Gradient accumulation and checkpointing give the same gradients (tested), log_every_steps only the step log.
TRAINING_EXECUTION = (
    "device",
    "allow_cpu_fallback",
    "preload_images",
    "num_workers",
    "accumulation_steps",
    "grad_checkpointing",
    "log_every_steps",
)


def training_flags(wildcards):
    """CLI flags of the training stage: the run's values over the `training` block (n_train picks the split file)."""
    settings = {**config["training"], **POINTS[wildcards.point]}
    for setting in ("enabled", "n_train", *TRAINING_LAUNCH, *TRAINING_EXECUTION):
        settings.pop(setting)
    settings["save_epochs"] = ",".join(map(str, save_epochs(PLAN, wildcards.point)))
    return to_cli_flags(settings)


def run_checkpoint(wildcards):
    """The file of the run's checkpoint a shorter-epoch point takes its model from."""
    entry = PLAN[wildcards.point]
    return path("checkpoint", split=wildcards.split, point=entry["run"], side=wildcards.side, epoch=entry["epoch"])
