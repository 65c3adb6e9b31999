# Helpers of rules/annotate.smk (Snakemake's linter wants functions and rules in separate files).


def detic_spec(wildcards):
    return dataset_spec(wildcards)["detic"]


def precomputed_flags(wildcards):
    """A data set that skips invalid records may have annotation rows for records it dropped, and lack none it keeps."""
    return "--allow-missing --drop-unknown" if dataset_spec(wildcards)["on_invalid"] == "skip" else ""
