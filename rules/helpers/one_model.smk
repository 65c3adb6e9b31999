# Helpers of rules/one_model.smk (Snakemake's linter wants functions and rules in separate files).


def agreement_tables(queries, table):
    """Each compared test's metrics `table` on the `queries` records, in AGREEMENT_TESTS order ({split}, {point}
    left open)."""
    return [path(entry, queries=queries, table=table, **fixed) for entry, fixed in AGREEMENT_TESTS.values()]
