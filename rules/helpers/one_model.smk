# Helpers of rules/one_model.smk (Snakemake's linter wants functions and rules in separate files).


def agreement_tables(queries, table):
    """Each compared test's metrics `table` on the `queries` records, in AGREEMENT_TESTS order ({split}, {point}
    left open)."""
    return [path(entry, queries=queries, table=table, **fixed) for entry, fixed in AGREEMENT_TESTS.values()]


def external_target_files(wildcards):
    """The local files an external target is read from: its checkpoint, or its local-dir: folder's files."""
    spec = ONE_MODEL["external_targets"][wildcards.target]
    return local_model_files(spec["model"], spec.get("checkpoint"))
