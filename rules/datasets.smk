# Stage datasets: raw data -> records.parquet + ground_truth.parquet (+ validation.parquet for real data).
# One rule per source (datasets.<name>.source); each rule only matches the data sets of its source.

# A split's pool is trained on: its records need captions, and no image may appear twice.
TRAINING_POOLS = {split["pool"] for split in config["splits"].values()}


def _check_dataset_config():
    for name, spec in config["datasets"].items():
        where = f"config datasets.{name}"
        if spec["annotator"] == "parts" and spec["source"] != "mix":
            raise ValueError(
                f"{where}: annotator 'parts' takes the annotations of a mix's parts; source is {spec['source']!r}"
            )
        if spec["annotator"] == "ground_truth" and spec["source"] == "shards":
            raise ValueError(f"{where}: image-caption shards carry no object lists; use annotator detic or precomputed")
        parts = [part["dataset"] for part in spec.get("parts", [])]
        for part in parts:
            if part not in config["datasets"] or part == name:
                raise ValueError(f"{where}.parts: {part!r} is not another configured data set")
        if len(set(parts)) != len(parts):
            raise ValueError(f"{where}.parts: a data set is listed twice")


_check_dataset_config()


def validation_flags(wildcards):
    """What the adapters keep: the result-shaping validation flags (threads go through `execution_flags`)."""
    return to_cli_flags(
        {"on_invalid": dataset_spec(wildcards)["on_invalid"], "training_pool": wildcards.dataset in TRAINING_POOLS}
    )


@functools.cache
def _image_set_digest(folder):
    """sha256 of every file under `folder`: relative path, size and mtime (ns), in path order."""
    root = os.path.expanduser(folder)
    if not os.path.isdir(root):
        raise ValueError(f"config datasets: image folder {folder!r} does not exist")
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def image_set(wildcards):
    """A params value that changes when an image of the data set's folder is added, deleted or replaced.

    Images are not rule inputs (a folder of 10^5 files), so this digest of their listing is what reruns the
    data set, and everything downstream, when the folder changes.
    """
    return _image_set_digest(dataset_spec(wildcards)["images"])


def shard_files(wildcards):
    """The tar shards the `shards` glob patterns name (raw data: they must exist)."""
    spec = dataset_spec(wildcards)
    files = []
    for pattern in spec.get("shards", []):
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise ValueError(f"config datasets.{wildcards.dataset}.shards: {pattern!r} matches no file")
        files += matched
    return files


def optional_input(key):
    return lambda wildcards: [dataset_spec(wildcards)[key]] if key in dataset_spec(wildcards) else []


def optional_flag(flag, files):
    return f"--{flag} {shlex.quote(files[0])}" if files else ""


# What every adapter writes (the synthetic generator: records, ground truth and its images).
ADAPTER_OUTPUTS = {table: PATHS[table] for table in ("records", "ground_truth", "validation")}


def mix_part_records(wildcards):
    return [path("records", dataset=part["dataset"]) for part in dataset_spec(wildcards)["parts"]]


def mix_part_flags(wildcards):
    parts = dataset_spec(wildcards)["parts"]
    return " ".join(
        shlex.quote(f"{part['dataset']}={path('records', dataset=part['dataset'])}={part.get('n_records', 'all')}")
        for part in parts
    )


rule synthetic_dataset:
    output:
        records=PATHS["records"],
        ground_truth=PATHS["ground_truth"],
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
        generator=to_cli_flags(config.get("synthetic", {})),
        out_dir=lambda wc, output: os.path.dirname(output.records),
    shell:
        "python -m workflow_scripts.synthetic --dataset {wildcards.dataset}"
        " --n-records {params.n_records} --seed {params.seed} {params.generator}"
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
