# Stage annotate: records -> annotations.parquet (id, labels, scores), one row per record.
# One rule per annotator (datasets.<name>.annotator); each rule only matches the data sets using it.


include: "helpers/annotate.smk"


rule annotate_ground_truth:
    input:
        records=PATHS["records"],
        ground_truth=PATHS["ground_truth"],
    output:
        PATHS["annotations"],
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    wildcard_constraints:
        dataset=datasets_where("annotator", ["ground_truth"]),
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.annotate --annotator ground_truth --records {input.records}"
        " --ground-truth {input.ground_truth} --out {output} > {log} 2>&1"


rule annotate_precomputed:
    input:
        records=PATHS["records"],
        annotations=lambda wc: dataset_spec(wc)["annotations"],
    output:
        PATHS["annotations"],
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    wildcard_constraints:
        dataset=datasets_where("annotator", ["precomputed"]),
    conda:
        "../envs/dejavu.yaml"
    params:
        flags=precomputed_flags,
    shell:
        "python -m workflow_scripts.annotate --annotator precomputed --records {input.records}"
        " --annotations {input.annotations:q} {params.flags} --out {output} > {log} 2>&1"


# A mix keeps the annotation each record got from its own data set's annotator (a mix draws a subset of them).
rule annotate_parts:
    input:
        records=PATHS["records"],
        parts=lambda wc: [path("annotations", dataset=part["dataset"]) for part in dataset_spec(wc)["parts"]],
    output:
        PATHS["annotations"],
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    wildcard_constraints:
        dataset=datasets_where("annotator", ["parts"]),
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.annotate --annotator precomputed --records {input.records}"
        " --annotations {input.parts} --drop-unknown --out {output} > {log} 2>&1"


rule detic_vocabulary:
    """The vocabulary's CLIP text embeddings, once per (vocabulary, prompt, CLIP weights), shared by every data set."""
    input:
        names=detic_vocabulary_names,
        clip_weights=lambda wc: DETIC_VOCABULARIES[wc.vocabulary]["clip_weights"],
    output:
        PATHS["detic_vocabulary"],
    log:
        f"{RESULTS}/logs/annotate/detic-vocabulary-{{vocabulary}}.log",
    wildcard_constraints:
        vocabulary="|".join(map(re.escape, DETIC_VOCABULARIES)) or match_nothing(),
    conda:
        "../envs/dejavu.yaml"
    params:
        vocabulary=lambda wc: shlex.quote(DETIC_VOCABULARIES[wc.vocabulary]["vocabulary"]),
        repo=lambda wc: shlex.quote(DETIC_VOCABULARIES[wc.vocabulary]["repo"]),
        prompt=lambda wc: shlex.quote(DETIC_VOCABULARIES[wc.vocabulary]["prompt"]),
    shell:
        "python -m workflow_scripts.detic vocabulary --vocabulary {params.vocabulary} --detic-repo {params.repo}"
        " --clip-weights {input.clip_weights:q} --prompt {params.prompt} --out {output} > {log} 2>&1"


rule detic_chunk:
    input:
        records=PATHS["records"],
        class_embeddings=detic_class_embeddings,
        weights=lambda wc: detic_spec(wc)["weights"],
    output:
        PATHS["detic_chunk"],
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}/detic-{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/annotate/{{dataset}}/detic-{{chunk}}.tsv"
    wildcard_constraints:
        dataset=datasets_where("annotator", ["detic"]),
        chunk=r"\d+",
    conda:
        "../envs/detic.yaml"
    threads: lambda wc: detic_spec(wc)["workers"] + 1  # image decoding processes and the job itself
    resources:
        gpu=detic_gpus,
    params:
        n_chunks=lambda wc: detic_spec(wc)["n_chunks"],
        score_threshold=lambda wc: detic_spec(wc)["score_threshold"],
        # Batching pads images to a common size, which can move scores near the edges: a result setting.
        batch_size=lambda wc: detic_spec(wc)["batch_size"],
        execution=lambda wc, threads: to_cli_flags(
            {"device": detic_spec(wc)["device"], "workers": detic_spec(wc)["workers"]}
        ),
        repo=lambda wc: shlex.quote(detic_spec(wc)["repo"]),
        config_file=lambda wc: shlex.quote(detic_spec(wc)["config_file"]),
    shell:
        "python -m workflow_scripts.detic detect --records {input.records} --chunk {wildcards.chunk}"
        " --n-chunks {params.n_chunks} --detic-repo {params.repo} --config-file {params.config_file}"
        " --weights {input.weights:q} --class-embeddings {input.class_embeddings}"
        " --score-threshold {params.score_threshold} --batch-size {params.batch_size}"
        " {params.execution} --out {output} > {log} 2>&1"


rule annotate_detic:
    input:
        records=PATHS["records"],
        chunks=lambda wc: expand(path("detic_chunk", dataset=wc.dataset), chunk=range(detic_spec(wc)["n_chunks"])),
    output:
        PATHS["annotations"],
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    wildcard_constraints:
        dataset=datasets_where("annotator", ["detic"]),
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.detic merge --records {input.records} --chunks {input.chunks} --out {output} > {log} 2>&1"
