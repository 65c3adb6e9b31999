# Stage annotate: records -> annotations.parquet (id, labels, scores), one row per record.
# One rule per annotator (datasets.<name>.annotator); each rule only matches the data sets using it.


rule annotate_ground_truth:
    input:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        ground_truth=f"{RESULTS}/data/{{dataset}}/ground_truth.parquet",
    output:
        ANNOTATIONS,
    wildcard_constraints:
        dataset=datasets_where("annotator", ["ground_truth"]),
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.annotate --annotator ground_truth --records {input.records}"
        " --ground-truth {input.ground_truth} --out {output} > {log} 2>&1"


rule annotate_precomputed:
    input:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        annotations=lambda wc: dataset_spec(wc)["annotations"],
    output:
        ANNOTATIONS,
    wildcard_constraints:
        dataset=datasets_where("annotator", ["precomputed"]),
    params:
        flags=precomputed_flags,
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.annotate --annotator precomputed --records {input.records}"
        " --annotations {input.annotations:q} {params.flags} --out {output} > {log} 2>&1"


# A mix keeps the annotation each record got from its own data set's annotator (a mix draws a subset of them).
rule annotate_parts:
    input:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        parts=lambda wc: [f"{dataset_dir(part['dataset'])}/annotations.parquet" for part in dataset_spec(wc)["parts"]],
    output:
        ANNOTATIONS,
    wildcard_constraints:
        dataset=datasets_where("annotator", ["parts"]),
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.annotate --annotator precomputed --records {input.records}"
        " --annotations {input.parts} --drop-unknown --out {output} > {log} 2>&1"


# Detic: the vocabulary's CLIP text embeddings once per (vocabulary, prompt, CLIP weights), shared by every data
# set using them; then one GPU job per chunk of a data set's records; then a merge.
from workflow_scripts.detic import vocabulary_key, vocabulary_source

DETIC_VOCABULARIES = {vocabulary_key(spec["detic"]): spec["detic"]
                      for spec in config["datasets"].values() if spec["annotator"] == "detic"}


def detic_class_embeddings(wildcards):
    return f"{RESULTS}/detic/vocabularies/{vocabulary_key(detic_spec(wildcards))}.parquet"


rule detic_vocabulary:
    input:
        names=lambda wc: str(vocabulary_source(DETIC_VOCABULARIES[wc.vocabulary]["vocabulary"],
                                               DETIC_VOCABULARIES[wc.vocabulary]["repo"])),
        clip_weights=lambda wc: DETIC_VOCABULARIES[wc.vocabulary]["clip_weights"],
    output:
        f"{RESULTS}/detic/vocabularies/{{vocabulary}}.parquet",
    wildcard_constraints:
        vocabulary="|".join(map(re.escape, DETIC_VOCABULARIES)) or "(?!)",
    params:
        vocabulary=lambda wc: shlex.quote(DETIC_VOCABULARIES[wc.vocabulary]["vocabulary"]),
        repo=lambda wc: shlex.quote(DETIC_VOCABULARIES[wc.vocabulary]["repo"]),
        prompt=lambda wc: shlex.quote(DETIC_VOCABULARIES[wc.vocabulary]["prompt"]),
    log:
        f"{RESULTS}/logs/annotate/detic-vocabulary-{{vocabulary}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.detic vocabulary --vocabulary {params.vocabulary} --detic-repo {params.repo}"
        " --clip-weights {input.clip_weights:q} --prompt {params.prompt} --out {output} > {log} 2>&1"


rule detic_chunk:
    input:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        class_embeddings=detic_class_embeddings,
        weights=lambda wc: detic_spec(wc)["weights"],
    output:
        f"{RESULTS}/data/{{dataset}}/detic/chunk-{{chunk}}.parquet",
    wildcard_constraints:
        dataset=datasets_where("annotator", ["detic"]),
        chunk=r"\d+",
    params:
        spec=detic_spec,
        repo=lambda wc: shlex.quote(detic_spec(wc)["repo"]),
        config_file=lambda wc: shlex.quote(detic_spec(wc)["config_file"]),
    threads: lambda wc: detic_spec(wc)["workers"] + 1  # image decoding processes and the job itself
    resources:
        gpu=detic_gpus,
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}/detic-{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/annotate/{{dataset}}/detic-{{chunk}}.tsv"
    conda:
        "../envs/detic.yaml"
    shell:
        "python -m workflow_scripts.detic detect --records {input.records} --chunk {wildcards.chunk}"
        " --n-chunks {params.spec[n_chunks]} --detic-repo {params.repo} --config-file {params.config_file}"
        " --weights {input.weights:q} --class-embeddings {input.class_embeddings}"
        " --score-threshold {params.spec[score_threshold]} --device {params.spec[device]}"
        " --batch-size {params.spec[batch_size]} --workers {params.spec[workers]} --out {output} > {log} 2>&1"


rule annotate_detic:
    input:
        records=f"{RESULTS}/data/{{dataset}}/records.parquet",
        chunks=lambda wc: expand(f"{RESULTS}/data/{wc.dataset}/detic/chunk-{{chunk}}.parquet",
                                 chunk=range(detic_spec(wc)["n_chunks"])),
    output:
        ANNOTATIONS,
    wildcard_constraints:
        dataset=datasets_where("annotator", ["detic"]),
    log:
        f"{RESULTS}/logs/annotate/{{dataset}}.log",
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.detic merge --records {input.records} --chunks {input.chunks} --out {output} > {log} 2>&1"
