# Helpers of rules/annotate.smk (Snakemake's linter wants functions and rules in separate files).

from workflow_scripts.detic import vocabulary_key, vocabulary_source


def detic_spec(wildcards):
    return dataset_spec(wildcards)["detic"]


def precomputed_flags(wildcards):
    """A data set that skips invalid records may have annotation rows for records it dropped, and lack none it keeps."""
    return "--allow-missing --drop-unknown" if dataset_spec(wildcards)["on_invalid"] == "skip" else ""


def detic_gpus(wildcards):
    return gpus_for(detic_spec(wildcards)["device"])


# Detic's vocabularies by key (name and a hash of what shapes their embeddings): one detic_vocabulary job each.
DETIC_VOCABULARIES = {
    vocabulary_key(spec["detic"]): spec["detic"] for spec in config["datasets"].values() if spec["annotator"] == "detic"
}


def detic_vocabulary_names(wildcards):
    spec = DETIC_VOCABULARIES[wildcards.vocabulary]
    return str(vocabulary_source(spec["vocabulary"], spec["repo"]))


def detic_class_embeddings(wildcards):
    return path("detic_vocabulary", vocabulary=vocabulary_key(detic_spec(wildcards)))
