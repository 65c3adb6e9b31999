# dejavu-workflow: déjà vu memorization in vision-language and SSL image models, as a DAG of cached artifacts.
# Design (stages, data contracts, path grammar, what reruns what): docs/DESIGN.md; usage: README.md.

import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/datasets.smk"
include: "rules/annotate.smk"
include: "rules/splits.smk"
include: "rules/train.smk"
include: "rules/embed.smk"
include: "rules/knn.smk"
include: "rules/metrics.smk"
include: "rules/utility.smk"
include: "rules/one_model.smk"
include: "rules/ssl.smk"
include: "rules/figures.smk"


rule all:
    default_target: True
    input:
        all_targets(),
