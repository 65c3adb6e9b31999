# Stage figures: regenerated from the cached metric tables alone (no model is loaded).


rule figures:
    input:
        **{
            f"{queries}_{table}": f"{RESULTS}/metrics/{{split}}/{{point}}/{queries}/{table}.parquet"
            for queries in QUERY_SETS
            for table in ("records", "sample_level")
        },
    output:
        recall_cdf_png=report(
            f"{RESULTS}/figures/{{split}}/{{point}}/recall_cdf.png",
            caption="../report/recall_cdf.rst",
            category="Population level",
            subcategory="{split} {point}",
        ),
        recall_cdf_svg=f"{RESULTS}/figures/{{split}}/{{point}}/recall_cdf.svg",
        gap_png=report(
            f"{RESULTS}/figures/{{split}}/{{point}}/gap_vs_top_l.png",
            caption="../report/gap_vs_top_l.rst",
            category="Sample level",
            subcategory="{split} {point}",
        ),
        gap_svg=f"{RESULTS}/figures/{{split}}/{{point}}/gap_vs_top_l.svg",
    params:
        metrics=lambda wc: " ".join(
            f"--metrics {q}={RESULTS}/metrics/{wc.split}/{wc.point}/{q}" for q in QUERY_SETS
        ),
        out_dir=lambda wc, output: os.path.dirname(output.recall_cdf_png),
    log:
        f"{RESULTS}/logs/figures/{{split}}/{{point}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.figures {params.metrics} --out-dir {params.out_dir} > {log} 2>&1"
