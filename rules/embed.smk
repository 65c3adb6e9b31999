# Stage embed: each model embeds the public images, shard by shard, and the query captions (A's and the holdout's).
# P is split into embedding.public_shards contiguous row ranges named `I-of-N`; each shard is embedded by its own
# job into its own (temporary) Parquet, then `knn gather` streams them, in order, into the contract file
# public.parquet, which the kNN shard jobs read back by the same row ranges.


include: "helpers/embed.smk"


rule embed_public_shard:
    input:
        model=PATHS["model"],
        records=public_records,
        excluded=PATHS["public_excluded"],
    output:
        temp(PATHS["public_shard_embeddings"]),
    log:
        f"{RESULTS}/logs/embed/{{split}}/{{point}}/{{side}}/public_shards/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{{point}}/{{side}}/public_shards/{{shard}}.tsv"
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        execution=embed_execution_flags(),
    shell:
        "python -m workflow_scripts.embed --model {input.model} --records {input.records} --modality image"
        " --shard {wildcards.shard} --exclude {input.excluded} {params.execution} --out {output} > {log} 2>&1"


rule embed_public:
    input:
        shards=expand(PATHS["public_shard_embeddings"], shard=PUBLIC_SHARDS, allow_missing=True),
    output:
        path("embeddings", searcher="{point}/{side}", collection="public"),
    log:
        f"{RESULTS}/logs/embed/{{split}}/{{point}}/{{side}}/public.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{{point}}/{{side}}/public.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.knn gather --shards {input.shards} --out {output} > {log} 2>&1"


rule embed_captions:
    input:
        model=PATHS["model"],
        records=pool_records,
        queries=caption_query_splits,
    output:
        path("embeddings", searcher="{point}/{side}", collection="captions"),
    log:
        f"{RESULTS}/logs/embed/{{split}}/{{point}}/{{side}}/captions.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{{point}}/{{side}}/captions.tsv"
    conda:
        "../envs/dejavu.yaml"
    threads: config["embedding"]["threads"]
    resources:
        gpu=EMBED_GPUS,
    params:
        caption_index=config["embedding"]["caption_index"],
        execution=embed_execution_flags(),
        ids=lambda wc, input: " ".join(f"--ids {path}" for path in input.queries),
    shell:
        "python -m workflow_scripts.embed --model {input.model} --records {input.records} {params.ids}"
        " --modality text --caption-index {params.caption_index} {params.execution} --out {output} > {log} 2>&1"
