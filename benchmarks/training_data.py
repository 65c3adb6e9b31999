"""Training-data throughput from tar shards (shard order vs random order) and per-process peak memory.

1. Writes `--shards` synthetic webdataset shards of `--per-shard` JPEGs (+ captions) each, `--image-size`
   pixels (default 1,000 x 100 images of 160 px, about 8 KB each: ~0.8 GB), and records.parquet with the
   members' offsets as the shards adapter writes them; reads every shard once so the page cache is warm.
2. Throughput: the training stage's own batch reader (train.SideBatches: pread of each member, JPEG
   decode, the model's transform, one caption drawn, tokenised and masked) over `--batches` batches of
   256 in shard order and in a seeded random order, in this process; images/s with wall and CPU time
   (user+sys: wall time is inflated when other jobs share the cores). Also the bare member reads (pread).
3. Memory: `python -m workflow_scripts.train` in a child process on a side of `--sizes` records (the shard
   members, each referenced several times under distinct ids when the side is larger), one epoch cut to
   `--steps` steps of a tiny model with 2 DataLoader workers and no preloading, so what varies is the data
   path. Reports the training process's peak RSS (VmHWM) and private memory, and the DataLoader workers'
   private memory (RssAnon) apart from their file-backed pages (the memory-mapped side table, shared).

Run from the repository root:  .venv/bin/python benchmarks/training_data.py  (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.images import read_tar_member, scan_members, tar_member_path  # noqa: E402

WORDS = ["cat", "dog", "car", "tree", "chair", "cup", "boat", "bird", "lamp", "road", "sky", "table"]

# The training stage, its epochs cut to `steps` batches. At exit it prints its peak RSS (VmHWM), its private
# memory (RssAnon) and its workers' peaks: each worker writes, after every batch, its largest RssAnon and
# RssFile so far (file-backed pages are the memory-mapped side table: page cache, shared and reclaimable).
CUT_TRAINING = (
    "import atexit, os, sys\n"
    "from workflow_scripts import train\n"
    "steps, report = int(sys.argv.pop(1)), sys.argv.pop(1)\n"
    "whole_epoch = train.epoch_batches\n"
    "train.epoch_batches = lambda *args: whole_epoch(*args)[:steps]\n"
    "kb = lambda key: int(open('/proc/self/status').read().split(key + ':')[1].split()[0])\n"
    "peaks = {}\n"
    "def measured(self, item, get=train.SideBatches.__getitem__):\n"
    "    result = get(self, item)\n"
    "    for key in ('RssAnon', 'RssFile'):\n"
    "        peaks[key] = max(peaks.get(key, 0), kb(key))\n"
    "    open(f'{report}/{os.getpid()}', 'w').write(f\"{peaks['RssAnon']} {peaks['RssFile']}\")\n"
    "    return result\n"
    "train.SideBatches.__getitem__ = measured\n"
    "atexit.register(lambda: print('PEAK_KB', kb('VmHWM'), kb('RssAnon'), file=sys.__stderr__, flush=True))\n"
    "train.main(sys.argv[1:])\n"
)


def jpeg_pool(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs with smooth structure and noise (compress like photos, not like flat colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def write_shards(root: Path, n_shards: int, per_shard: int, image_size: int) -> list[Path]:
    pool = jpeg_pool(509, image_size)
    paths = []
    for shard in range(n_shards):
        path = root / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{shard * per_shard + index:09d}"
                caption = " ".join(WORDS[(shard + index * k) % len(WORDS)] for k in range(1, 8)).encode()
                for name, data in (
                    (f"{key}.jpg", pool[(shard * per_shard + index) % len(pool)]),
                    (f"{key}.txt", caption),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def shard_records(shards: list[Path]) -> pl.DataFrame:
    """One record per JPEG member with its offset and size, as the shards adapter writes them."""
    rows = [
        (tar_member_path(shard, m.name), m.offset_data, m.size)
        for shard in shards
        for m in scan_members(shard)
        if m.name.endswith(".jpg")
    ]
    paths, offsets, sizes = zip(*rows)
    captions = [
        f"a photo of a {WORDS[i % len(WORDS)]} next to a {WORDS[(i * 7) % len(WORDS)]}" for i in range(len(rows))
    ]
    return pl.DataFrame(
        {
            "image_path": paths,
            "image_offset": offsets,
            "image_size": sizes,
            "captions": [[c, c + " outdoors"] for c in captions],
        }
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def throughput(records: pl.DataFrame, work: Path, batches: int, batch_size: int = 256) -> None:
    import torch

    from workflow_scripts import train
    from workflow_scripts.models import create_model

    torch.set_num_threads(1)
    side = work / "side"
    side.mkdir(exist_ok=True)
    records.with_columns(id=pl.format("r{}", pl.int_range(pl.len()))).write_parquet(side / "records.parquet")
    pl.read_parquet(side / "records.parquet").select("id").write_parquet(side / "split.parquet")
    train.write_side_table(str(side / "records.parquet"), str(side / "split.parquet"), side / train.SIDE_TABLE)
    _, preprocess, tokenizer = create_model("dejavu-vit-tiny", torch.device("cpu"))
    data = train.SideBatches(side / train.SIDE_TABLE, preprocess, tokenizer, mask_ratio=0.3, seed=0)
    n = len(data)
    table = data.table()
    orders = {"shard order": np.arange(n), "random order": np.random.default_rng(0).permutation(n)}
    print(f"records {n:,}; {batches} batches of {batch_size} per order (page cache warm)")
    for name, order in orders.items():
        rows = order[: batches * batch_size]
        paths = table.column("image_path").take(rows).to_pylist()
        offsets = table.column("image_offset").take(rows).to_pylist()
        sizes = table.column("image_size").take(rows).to_pylist()
        started, cpu = time.perf_counter(), cpu_seconds()
        for path, offset, size in zip(paths, offsets, sizes):
            read_tar_member(path.split("::", 1)[0], offset, size)
        wall = time.perf_counter() - started
        print(
            f"  {name:12s} member reads (pread): {len(rows) / wall:10,.0f} images/s  "
            f"({1e3 * wall / len(rows):.3f} ms/image, cpu {cpu_seconds() - cpu:.2f} s)"
        )
    for name, order in orders.items():
        started, cpu = time.perf_counter(), cpu_seconds()
        for step in range(batches):
            _images, _tokens = data[(0, order[step * batch_size : (step + 1) * batch_size])]
        wall, used = time.perf_counter() - started, cpu_seconds() - cpu
        print(
            f"  {name:12s} training batches:     {batches * batch_size / wall:10,.0f} images/s  "
            f"(wall {wall:.1f} s, cpu {used:.1f} s; read + decode + transform + caption tokens)"
        )


def memory(records: pl.DataFrame, work: Path, size: int, steps: int) -> None:
    side = work / f"side_{size}"
    side.mkdir(exist_ok=True)
    repeats = -(-size // len(records))
    (
        pl.concat([records] * repeats)
        .head(size)
        .with_columns(id=pl.format("r{}", pl.int_range(pl.len())))
        .write_parquet(side / "records.parquet")
    )
    pl.read_parquet(side / "records.parquet", columns=["id"]).write_parquet(side / "split.parquet")
    report = side / "workers"
    report.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-c",
        CUT_TRAINING,
        str(steps),
        str(report),
        "--records",
        str(side / "records.parquet"),
        "--split",
        str(side / "split.parquet"),
        "--out-dir",
        str(side / "model"),
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--device",
        "cpu",
        "--num-workers",
        "2",
        "--preload-images",
        "false",
        "--mask-ratio",
        "0.3",
        "--threads",
        "1",
        "--warmup-steps",
        "1",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    peak_kb, private_kb = map(int, result.stderr.split("PEAK_KB")[-1].split()[:2])
    workers = np.array([list(map(int, f.read_text().split())) for f in report.iterdir()]).max(axis=0)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(
        f"  {size:>9,} records: training process peak RSS {peak_kb / 1024:5.0f} MiB (private at exit "
        f"{private_kb / 1024:4.0f} MiB); a DataLoader worker: private {workers[0] / 1024:4.0f} MiB, mapped side table "
        f"and libraries {workers[1] / 1024:4.0f} MiB  ({steps} steps; wall {wall:.0f} s, cpu {cpu:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", help="keep the shards here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        shards = write_shards(work, args.shards, args.per_shard, args.image_size)
        records = shard_records(shards)
        total = sum(s.stat().st_size for s in shards)
        for shard in shards:  # warm the page cache
            shard.read_bytes()
        print(
            f"{len(shards):,} shards x {args.per_shard} JPEGs ({total / 2**30:.2f} GiB, "
            f"{records['image_size'].mean() / 1024:.1f} KiB per image) written in {time.perf_counter() - started:.0f} s"
        )
        throughput(records, work, args.batches)
        print("peak memory per process (tiny model, 2 workers, preload_images false):")
        for size in args.sizes:
            memory(records, work, size, args.steps)


if __name__ == "__main__":
    main()
