# Helpers of rules/figures.smk (Snakemake's linter wants functions and rules in separate files).


def _figure(path, caption, category):
    return report(path, caption=f"../report/{caption}.rst", category=category, subcategory="{split}")


# The summary's inputs by name, each a file per point in POINTS order: populations per query set, utility per side.
SUMMARY_INPUTS = {
    **{
        f"{queries}_population": ("metrics", {"queries": queries, "table": "population"})
        for queries in TWO_MODEL_QUERIES
    },
    **{f"utility_{side}": ("utility", {"side": side}) for side in SIDES},
}


def summary_inputs(wildcards):
    return {
        name: expand(path(entry, split=wildcards.split, **fixed), point=POINTS)
        for name, (entry, fixed) in SUMMARY_INPUTS.items()
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
