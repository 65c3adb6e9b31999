# Stage knn: exact inner-product search of each model's caption embeddings among its public-image embeddings.


rule knn:
    input:
        queries=f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/captions.parquet",
        public=f"{RESULTS}/embeddings/{{split}}/{{point}}/{{side}}/public.parquet",
    output:
        f"{RESULTS}/neighbors/{{split}}/{{point}}/{{side}}.parquet",
    params:
        knn=config["knn"],
    log:
        f"{RESULTS}/logs/knn/{{split}}/{{point}}/{{side}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/knn/{{split}}/{{point}}/{{side}}.tsv"
    conda:
        "../envs/dejavu.yaml"
    shell:
        "python -m workflow_scripts.knn --queries {input.queries} --public {input.public}"
        " --k {params.knn[k]} --batch-size {params.knn[batch_size]} --use-gpu {params.knn[use_gpu]}"
        " --out {output} > {log} 2>&1"
