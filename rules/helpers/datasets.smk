# Helpers of rules/datasets.smk (Snakemake's linter wants functions and rules in separate files).

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


def box_source(key):
    """As `optional_input`, for a key of the data set's `boxes` block (loc_csv, xml_dir)."""
    return lambda wildcards: [dataset_spec(wildcards)["boxes"][key]] if key in dataset_spec(wildcards)["boxes"] else []


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


def datasets_with_boxes():
    """Wildcard regex of the real data sets whose config names box annotations (`boxes`)."""
    names = [name for name, spec in config["datasets"].items() if spec["source"] != "synthetic" and "boxes" in spec]
    return "|".join(map(re.escape, names)) or match_nothing()


# A synthetic data set's drawing options (workflow_scripts.synthetic.SceneStyle), set per data set.
SCENE_STYLE = ("background_marks", "foreground_radius")
