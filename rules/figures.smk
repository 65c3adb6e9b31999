# Stage figures and summary: regenerated from the cached tables alone (no model is loaded).


include: "helpers/figures.smk"


rule figures_point:
    input:
        records=expand(path("metrics", table="records"), queries=QUERY_SETS, allow_missing=True),
        sample_level=expand(path("metrics", table="sample_level"), queries=QUERY_SETS, allow_missing=True),
    output:
        recall_cdf_png=_figure(path("figure", figure="recall_cdf", ext="png"), "recall_cdf", "Recall CDFs"),
        recall_cdf_svg=path("figure", figure="recall_cdf", ext="svg"),
        gap_png=_figure(path("figure", figure="gap_vs_top_l", ext="png"), "gap_vs_top_l", "Sample level"),
        gap_svg=path("figure", figure="gap_vs_top_l", ext="svg"),
    log:
        f"{RESULTS}/logs/figures/{{split}}/{{point}}/point.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        tables=lambda wc, input: keyed_flags("records", QUERY_SETS, input.records)
        + " "
        + keyed_flags("sample-level", QUERY_SETS, input.sample_level),
    shell:
        "python -m workflow_scripts.figures point {params.tables}"
        " --recall-cdf {output.recall_cdf_png} {output.recall_cdf_svg} --gap-vs-top-l {output.gap_png} {output.gap_svg}"
        " > {log} 2>&1"


rule figures_qualitative:
    input:
        metrics_records=path("metrics", queries="target", table="records"),
        query_records=pool_records,
        query_annotations=pool_annotations,
        public_records=public_records,
        public_annotations=public_annotations,
        target_neighbors=path("neighbors", side="A"),
        reference_neighbors=path("neighbors", side="B"),
    output:
        png=_figure(path("figure", figure="qualitative", ext="png"), "qualitative", "Qualitative"),
        svg=path("figure", figure="qualitative", ext="svg"),
    log:
        f"{RESULTS}/logs/figures/{{split}}/{{point}}/qualitative.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.figures qualitative --metrics-records {input.metrics_records}"
        " --query-records {input.query_records} --query-annotations {input.query_annotations}"
        " --public-records {input.public_records} --public-annotations {input.public_annotations}"
        " --target-neighbors {input.target_neighbors} --reference-neighbors {input.reference_neighbors}"
        " --out {output.png} {output.svg} > {log} 2>&1"


rule summary:
    input:
        unpack(summary_inputs),
    output:
        table=path("summary", ext="parquet"),
        csv=report(path("summary", ext="csv"), caption="../report/summary.rst", category="Summary"),
    log:
        f"{RESULTS}/logs/summary/{{split}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        # --target-population, --holdout-population, --utility-A, --utility-B: each point's file, keyed by the point.
        tables=lambda wc, input: " ".join(
            keyed_flags(name.replace("_", "-"), POINTS, getattr(input, name)) for name in SUMMARY_INPUTS
        ),
    shell:
        "python -m workflow_scripts.summary --split {wildcards.split} {params.tables}"
        " --out {output.table} --out-csv {output.csv} > {log} 2>&1"


rule seeds:
    """The summary over the training seeds (mean, seed spread, mean bootstrap std) and the paired comparisons of
    adjacent parameter values on the same records, with seed-and-record bootstrap intervals."""
    input:
        summary=path("summary", ext="parquet"),
        target_records=expand(path("metrics", queries="target", table="records"), point=POINTS, allow_missing=True),
        holdout_records=expand(path("metrics", queries="holdout", table="records"), point=POINTS, allow_missing=True),
    output:
        seeds=path("seed_table", name="seeds", ext="parquet"),
        seeds_csv=report(path("seed_table", name="seeds", ext="csv"), caption="../report/seeds.rst", category="Summary"),
        comparisons=path("seed_table", name="comparisons", ext="parquet"),
        comparisons_csv=report(
            path("seed_table", name="comparisons", ext="csv"), caption="../report/comparisons.rst", category="Summary"
        ),
    log:
        f"{RESULTS}/logs/seeds/{{split}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        records=lambda wc, input: keyed_flags("target-records", POINTS, input.target_records)
        + " "
        + keyed_flags("holdout-records", POINTS, input.holdout_records),
        n_boot=config["seeds"]["n_boot"],
        level=config["seeds"]["level"],
        seed=config["seeds"]["seed"],
    shell:
        "python -m workflow_scripts.seeds --summary {input.summary} {params.records} --n-boot {params.n_boot}"
        " --seed {params.seed} --level {params.level} --out-seeds {output.seeds} --out-seeds-csv {output.seeds_csv}"
        " --out-comparisons {output.comparisons} --out-comparisons-csv {output.comparisons_csv} > {log} 2>&1"


if SWEPT:  # a sweep figure per parameter that takes several values

    rule figures_sweep:
        input:
            path("summary", ext="parquet"),
        output:
            png=report(
                expand(path("sweep_figure", ext="png"), parameter=SWEPT, allow_missing=True),
                caption="../report/sweep.rst",
                category="Mitigations",
                subcategory="{split}",
            ),
            svg=expand(path("sweep_figure", ext="svg"), parameter=SWEPT, allow_missing=True),
        log:
            f"{RESULTS}/logs/figures/sweep/{{split}}.log",
        conda:
            "../envs/dejavu.yaml"
        params:
            figures=lambda wc, output: keyed_flags("figure", SWEPT, output.png)
            + " "
            + keyed_flags("figure", SWEPT, output.svg),
        shell:
            "python -m workflow_scripts.figures sweep --summary {input} {params.figures} > {log} 2>&1"


rule figures:
    """Every figure and the summary tables; `make figures` rebuilds them from the cached tables alone."""
    input:
        figure_targets(),
        expand(path("summary", ext="parquet"), split=config["splits"]),
        expand(path("seed_table", ext="parquet"), split=config["splits"], name=("seeds", "comparisons")),
        ssl_figure_targets(),
