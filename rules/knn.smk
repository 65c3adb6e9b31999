# Stage knn: exact inner-product search of each model's caption embeddings among its public-image embeddings.
# One job per shard of P (PUBLIC_SHARDS, rules/embed.smk) writes every query's top-k within its shard; `knn`
# merges them into the global top-k (score descending, then public id: workflow_scripts/knn.py), queries in batches.


rule knn_shard:
    input:
        queries=f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/captions.parquet",
        public=f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/public.parquet",
    output:
        temp(f"{RESULTS}/neighbors/{{split}}/{{point}}/{{side}}/shards/{{shard}}.parquet"),
    log:
        f"{RESULTS}/logs/knn/{{split}}/{{point}}/{{side}}/shards/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/knn/{{split}}/{{point}}/{{side}}/shards/{{shard}}.tsv"
    wildcard_constraints:
        shard=r"\d+-of-\d+",
    conda:
        KNN_ENV
    threads: config["knn"]["threads"]
    resources:
        gpu=KNN_GPUS,
    params:
        k=config["knn"]["k"],
        execution=execution_flags(batch_size=config["knn"]["batch_size"], use_gpu=config["knn"]["use_gpu"]),
    shell:
        "python -m workflow_scripts.knn search --queries {input.queries} --public {input.public}"
        " --shard {wildcards.shard} --k {params.k} {params.execution} --out {output} > {log} 2>&1"


rule knn:
    input:
        shards=expand(
            f"{RESULTS}/neighbors/{{{{split}}}}/{{{{point}}}}/{{{{side}}}}/shards/{{shard}}.parquet",
            shard=PUBLIC_SHARDS,
        ),
    output:
        f"{RESULTS}/neighbors/{{split}}/{{point}}/{{side}}.parquet",
    log:
        f"{RESULTS}/logs/knn/{{split}}/{{point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/knn/{{split}}/{{point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    params:
        k=config["knn"]["k"],
        execution=execution_flags(batch_size=config["knn"]["batch_size"]),
    shell:
        "python -m workflow_scripts.knn merge --shards {input.shards} --k {params.k} {params.execution}"
        " --out {output} > {log} 2>&1"
