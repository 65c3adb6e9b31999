# One-model test (Kokhlikyan et al. 2024): the trained target f_A against a pretrained text model g that never
# saw A. g embeds the query captions and the public set's captions; each query retrieves public *captions* (t2t).
# The target retrieves public images (t2i) or, with its text tower, public captions (t2t). The metric tables
# are those of the two-model test, under metrics/{split}/{point}/one_model~{mode}/{queries}/.

ONE_MODEL = config["one_model"]
REFERENCE = f"reference~{re.sub(r'[^A-Za-z0-9_.-]+', '_', ONE_MODEL['reference_model'])}"
ONE_MODEL_MODES = ONE_MODEL["modes"] if ONE_MODEL["enabled"] else []
# The tests the agreement rule compares, by their names in its tables, with their metrics tables' registry entries.
AGREEMENT_TESTS = {"two_model": ("metrics", {})} | {
    f"one_model~{mode}": ("metrics_one_model", {"mode": mode}) for mode in ONE_MODEL_MODES
}


include: "helpers/one_model.smk"


wildcard_constraints:
    mode="t2i|t2t",


rule import_target:
    """An external target (one_model.external_targets): an hf-hub:/local-dir: model, or an open_clip architecture
    with a pretrained tag and/or a weights file (models.import_target)."""
    input:
        external_target_files,
    output:
        path("imported_model", point="external~{target}", side="A"),
    log:
        f"{RESULTS}/logs/import/{{split}}/{{target}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        source=lambda wc: to_cli_flags(ONE_MODEL["external_targets"][wc.target]),
    shell:
        "python -m workflow_scripts.models import {params.source} --out {output} > {log} 2>&1"


rule embed_reference:
    """g's caption embeddings: the queries (A's and the holdout's records) or the public set's captions."""
    input:
        records=lambda wc: pool_records(wc) if wc.collection == "captions" else public_records(wc),
        queries=lambda wc: (
            expand(path("split", split=wc.split), name=QUERY_SETS.values()) if wc.collection == "captions" else []
        ),
        excluded=lambda wc: [path("public_excluded", split=wc.split)] if wc.collection == "public_captions" else [],
    output:
        path("embeddings", searcher=REFERENCE),
    log:
        f"{RESULTS}/logs/embed/{{split}}/{REFERENCE}/{{collection}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{REFERENCE}/{{collection}}.tsv"
    wildcard_constraints:
        collection="captions|public_captions",
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        ids=lambda wc, input: " ".join(
            [*(f"--ids {path}" for path in input.queries), *(f"--exclude {path}" for path in input.excluded)]
        ),
        # Only what shapes g's embeddings, so editing other one-model settings reruns nothing here.
        reference=ONE_MODEL["reference_model"],
        reference_options=to_cli_flags(
            {key: value for key, value in ONE_MODEL["reference_options"].items() if value is not None}
        ),
        caption_index=config["embedding"]["caption_index"],
        execution=execution_flags(batch_size=ONE_MODEL["batch_size"], device=config["embedding"]["device"]),
    shell:
        "python -m workflow_scripts.text_reference --model {params.reference} {params.reference_options}"
        " --records {input.records} {params.ids} --caption-index {params.caption_index}"
        " {params.execution} --out {output} > {log} 2>&1"


rule embed_public_captions:
    """The target's text tower on the public set's captions (t2t mode); uncaptioned public records are left out."""
    input:
        model=path("model", side="A"),
        records=public_records,
        excluded=PATHS["public_excluded"],
    output:
        path("embeddings", searcher="{point}/A", collection="public_captions"),
    log:
        f"{RESULTS}/logs/embed/{{split}}/{{point}}/A/public_captions.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{{point}}/A/public_captions.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        caption_index=config["embedding"]["caption_index"],
        execution=embed_execution_flags(),
    shell:
        "python -m workflow_scripts.embed --model {input.model} --records {input.records} --modality text"
        " --skip-uncaptioned --exclude {input.excluded} --caption-index {params.caption_index} {params.execution}"
        " --out {output} > {log} 2>&1"


rule knn_captions:
    """Caption-to-caption search (t2t), unsharded: caption embeddings are small next to image sets."""
    input:
        queries=lambda wc: path("embeddings", split=wc.split, searcher=wc.searcher, collection="captions"),
        public=lambda wc: path("embeddings", split=wc.split, searcher=wc.searcher, collection="public_captions"),
    output:
        PATHS["t2t_neighbors"],
    log:
        f"{RESULTS}/logs/knn/{{split}}/{{searcher}}/t2t.log",
    benchmark:
        f"{RESULTS}/benchmarks/knn/{{split}}/{{searcher}}/t2t.tsv"
    wildcard_constraints:
        searcher=f"{re.escape(REFERENCE)}|(?:{POINT_PATTERN})/A",
    conda:
        "../envs/dejavu.yaml"
    threads: config["knn"]["threads"]
    params:
        k=config["knn"]["k"],
        execution=execution_flags(batch_size=config["knn"]["batch_size"], use_gpu=config["knn"]["use_gpu"]),
    shell:
        "python -m workflow_scripts.knn search --queries {input.queries} --public {input.public}"
        " --k {params.k} {params.execution} --out {output} > {log} 2>&1"


use rule metrics as metrics_one_model with:
    input:
        target=lambda wc: (
            path("neighbors", split=wc.split, point=wc.point, side="A")
            if wc.mode == "t2i"
            else path("t2t_neighbors", split=wc.split, searcher=f"{wc.point}/A")
        ),
        reference=path("t2t_neighbors", searcher=REFERENCE),
        query_annotations=pool_annotations,
        public_annotations=public_annotations,
        queries=query_split,
    output:
        records=path("metrics_one_model", table="records"),
        population=path("metrics_one_model", table="population"),
        sample_level=path("metrics_one_model", table="sample_level"),
    log:
        f"{RESULTS}/logs/metrics/{{split}}/{{point}}/one_model~{{mode}}/{{queries}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/metrics/{{split}}/{{point}}/one_model~{{mode}}/{{queries}}.tsv"


rule agreement:
    """The two-model and one-model tests side by side on the target records: flags agreement and gaps."""
    input:
        records=agreement_tables("target", "records"),
        target_population=agreement_tables("target", "population"),
        holdout_population=agreement_tables("holdout", "population"),
    output:
        agreement=path("agreement", name="agreement.parquet"),
        population=path("agreement", name="population.parquet"),
        heatmap=report(
            path("agreement", name="agreement.png"),
            caption="../report/agreement.rst",
            category="One-model test",
            subcategory="{split}",
        ),
        heatmap_svg=path("agreement", name="agreement.svg"),
    log:
        f"{RESULTS}/logs/agreement/{{split}}/{{point}}.log",
    conda:
        "../envs/dejavu.yaml"
    params:
        # --records, --target-population, --holdout-population: each test's file, keyed by the test's name.
        tables=lambda wc, input: " ".join(
            keyed_flags(name.replace("_", "-"), AGREEMENT_TESTS, getattr(input, name))
            for name in ("records", "target_population", "holdout_population")
        ),
    shell:
        "python -m workflow_scripts.agreement {params.tables} --out-agreement {output.agreement}"
        " --out-population {output.population} --out-heatmap {output.heatmap} {output.heatmap_svg} > {log} 2>&1"
