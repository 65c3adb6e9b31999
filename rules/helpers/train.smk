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


def model_producer(wildcards):
    """The file whose job makes a point's model: the import, or its training run's final model."""
    if wildcards.point.startswith("external~"):
        return path("imported_model", **wildcards)
    return path("run_model", split=wildcards.split, point=PLAN[wildcards.point]["run"], side=wildcards.side)


def model_source(wildcards):
    """The file a point's model.pt is: the producer's, or for a shorter point its run's checkpoint at that epoch."""
    entry = PLAN.get(wildcards.point)
    if entry is None or entry["run"] == wildcards.point:
        return model_producer(wildcards)
    return path("checkpoint", split=wildcards.split, point=entry["run"], side=wildcards.side, epoch=entry["epoch"])
