# Stage embed: each model embeds the public images and the query captions (A's and the holdout's).


rule embed_public:
    input:
        model=f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/model.pt",
        records=public_records,
    output:
        f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/public.parquet",
    params:
        emb=config["embedding"],
    threads: config["embedding"]["threads"]
    log:
        f"{RESULTS}/logs/embed/{{split}}/{{point}}/{{side}}/public.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{{point}}/{{side}}/public.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.embed --model {input.model} --records {input.records} --modality image"
        " --batch-size {params.emb[batch_size]} --threads {threads} --out {output} > {log} 2>&1"


rule embed_captions:
    input:
        model=f"{RESULTS}/models/{{split}}/{{point}}/{{side}}/model.pt",
        records=pool_records,
        queries=expand(f"{RESULTS}/splits/{{{{split}}}}/{{name}}.parquet", name=QUERY_SETS.values()),
    output:
        f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/captions.parquet",
    params:
        emb=config["embedding"],
        ids=lambda wc, input: " ".join(f"--ids {path}" for path in input.queries),
    threads: config["embedding"]["threads"]
    log:
        f"{RESULTS}/logs/embed/{{split}}/{{point}}/{{side}}/captions.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{split}}/{{point}}/{{side}}/captions.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.embed --model {input.model} --records {input.records} {params.ids}"
        " --modality text --caption-index {params.emb[caption_index]} --batch-size {params.emb[batch_size]}"
        " --threads {threads} --out {output} > {log} 2>&1"
