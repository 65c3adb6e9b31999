# Stage datasets: raw data -> records.parquet + ground_truth.parquet (+ validation.parquet for real data).
# One rule per source (datasets.<name>.source); each rule only matches the data sets of its source.


include: "helpers/datasets.smk"


rule synthetic_dataset:
    output:
        records=PATHS["records"],
        ground_truth=PATHS["ground_truth"],
        boxes=PATHS["boxes"],
        objects=PATHS["objects"],
        images=directory(PATHS["synthetic_images"]),
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=datasets_where("source", ["synthetic"]),
    conda:
        "../envs/dejavu.yaml"
    params:
        n_records=lambda wc: dataset_spec(wc)["n_records"],
        seed=lambda wc: dataset_spec(wc)["seed"],
        style=lambda wc: to_cli_flags({key: dataset_spec(wc)[key] for key in SCENE_STYLE}),
        generator=to_cli_flags(config.get("synthetic", {})),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    shell:
        "python -m workflow_scripts.synthetic --dataset {wildcards.dataset}"
        " --n-records {params.n_records} --seed {params.seed} {params.style} {params.generator}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule coco_dataset:
    input:
        captions=lambda wc: dataset_spec(wc)["captions"],
        instances=optional_input("instances"),
    output:
        **ADAPTER_OUTPUTS,
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=datasets_where("source", ["coco"]),
    conda:
        "../envs/dejavu.yaml"
    threads: lambda wc: dataset_spec(wc)["threads"]
    params:
        images=lambda wc: shlex.quote(dataset_spec(wc)["images"]),
        image_set=image_set,
        instances=lambda wc, input: optional_flag("instances", input.instances),
        validation=validation_flags,
        execution=execution_flags(),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    shell:
        "python -m workflow_scripts.adapters coco --dataset {wildcards.dataset} --captions {input.captions:q}"
        " {params.instances} --images {params.images} {params.validation} {params.execution} --out-dir {params.out_dir} > {log} 2>&1"


rule image_folder_dataset:
    input:
        captions=optional_input("captions"),
    output:
        **ADAPTER_OUTPUTS,
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=datasets_where("source", ["image_folder"]),
    conda:
        "../envs/dejavu.yaml"
    threads: lambda wc: dataset_spec(wc)["threads"]
    params:
        images=lambda wc: shlex.quote(dataset_spec(wc)["images"]),
        image_set=image_set,
        captions=lambda wc, input: optional_flag("captions", input.captions),
        validation=validation_flags,
        execution=execution_flags(),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    shell:
        "python -m workflow_scripts.adapters image_folder --dataset {wildcards.dataset} --images {params.images}"
        " {params.captions} {params.validation} {params.execution} --out-dir {params.out_dir} > {log} 2>&1"


rule shards_dataset:
    input:
        shards=shard_files,
        table=optional_input("table"),
    output:
        **ADAPTER_OUTPUTS,
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=datasets_where("source", ["shards"]),
    conda:
        "../envs/dejavu.yaml"
    threads: lambda wc: dataset_spec(wc)["threads"]
    params:
        table=lambda wc, input: optional_flag("table", input.table),
        validation=validation_flags,
        execution=execution_flags(),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    shell:
        "python -m workflow_scripts.adapters shards --dataset {wildcards.dataset} --shards {input.shards:q}"
        " {params.table} {params.validation} {params.execution} --out-dir {params.out_dir} > {log} 2>&1"


rule mix_dataset:
    input:
        records=mix_part_records,
        ground_truth=lambda wc: [path("ground_truth", dataset=part["dataset"]) for part in dataset_spec(wc)["parts"]],
    output:
        **ADAPTER_OUTPUTS,
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=datasets_where("source", ["mix"]),
    conda:
        "../envs/dejavu.yaml"
    threads: lambda wc: dataset_spec(wc)["threads"]
    params:
        parts=mix_part_flags,
        seed=lambda wc: dataset_spec(wc)["seed"],
        validation=validation_flags,
        execution=execution_flags(),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    shell:
        "python -m workflow_scripts.adapters mix --dataset {wildcards.dataset} --parts {params.parts}"
        " --seed {params.seed} {params.validation} {params.execution} --out-dir {params.out_dir} > {log} 2>&1"


rule imagenet_boxes:
    """A real data set's foreground boxes (the SSL test's): ILSVRC's LOC_train_solution.csv and/or XML folder."""
    input:
        records=PATHS["records"],
        loc_csv=box_source("loc_csv"),
    output:
        PATHS["boxes"],
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.boxes.log",
    wildcard_constraints:
        dataset=datasets_with_boxes(),
    conda:
        "../envs/dejavu.yaml"
    threads: lambda wc: dataset_spec(wc)["threads"]
    params:
        loc_csv=lambda wc, input: optional_flag("loc-csv", input.loc_csv),
        xml_dir=lambda wc: optional_flag("xml-dir", box_source("xml_dir")(wc)),
        label_column=lambda wc: dataset_spec(wc)["boxes"]["label_column"],
    shell:
        "python -m workflow_scripts.boxes imagenet --records {input.records} {params.loc_csv} {params.xml_dir}"
        " --label-column {params.label_column} --threads {threads} --out {output} > {log} 2>&1"
