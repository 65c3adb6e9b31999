# Helpers of rules/annotate.smk (Snakemake's linter wants functions and rules in separate files).

from workflow_scripts.detic import vocabulary_key, vocabulary_source


def detic_spec(wildcards):
    return dataset_spec(wildcards)["detic"]


def precomputed_flags(wildcards):
    """A data set that skips invalid records may have annotation rows for records it dropped, and lack none it keeps."""
    return "--allow-missing --drop-unknown" if dataset_spec(wildcards)["on_invalid"] == "skip" else ""


def detic_gpus(wildcards):
    return gpus_for(detic_spec(wildcards)["device"])


def runs_detic(name, spec):
    """Whether Detic annotates the data set's images, or (SSL naive Bayes tags) its periphery crops."""
    ssl = config.get("ssl", {})
    tags = ssl.get("one_model", {}).get("naive_bayes", {}).get("tags")
    return spec["annotator"] == "detic" or (ssl.get("enabled") and ssl.get("dataset") == name and tags == "detic")


# Detic's vocabularies by key (name and a hash of what shapes their embeddings): one detic_vocabulary job each.
DETIC_VOCABULARIES = {
    vocabulary_key(spec["detic"]): spec["detic"] for name, spec in config["datasets"].items() if runs_detic(name, spec)
}


def detic_vocabulary_names(wildcards):
    spec = DETIC_VOCABULARIES[wildcards.vocabulary]
    return str(vocabulary_source(spec["vocabulary"], spec["repo"]))


def detic_class_embeddings(wildcards):
    return path("detic_vocabulary", vocabulary=vocabulary_key(detic_spec(wildcards)))
