# Helpers of rules/figures.smk (Snakemake's linter wants functions and rules in separate files).


def _figure(path, caption, category):
    return report(path, caption=f"../report/{caption}.rst", category=category, subcategory="{split}")


def summary_inputs(wildcards):
    return {
        "population": expand(
            path("metrics", split=wildcards.split, table="population"),
            point=POINTS,
            queries=QUERY_SETS,
        ),
        "utility": expand(path("utility", split=wildcards.split), point=POINTS, side=SIDES),
    }


def figure_targets():
    """Every figure, all of them regenerated from cached tables."""
    targets = []
    for split in config["splits"] if TRAINED_POINTS else []:
        targets += expand(
            path("figure", split=split),
            point=POINTS,
            figure=("recall_cdf", "gap_vs_top_l", "qualitative"),
            ext=("png", "svg"),
        )
        targets += expand(path("sweep_figure", split=split), parameter=SWEPT, ext=("png", "svg"))
    return targets
