"""How a training job starts one process per GPU: the one place that turns the config into a command.

- 1 process: `python -m MODULE`.
- 1 node x N GPUs: `python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE`.
- several nodes (or `training.use_srun`): `srun` starts nodes x gpus_per_node tasks inside the job's
  SLURM allocation; each task finds its rank in SLURM's variables (open_clip_train's
  `world_info_from_env`) and the rendezvous address in `slurm_rendezvous` (the first node of the job).

`rule train` takes both its shell prefix (`launch_command`) and its scheduler request (`launch_resources`)
from here, so the two cannot disagree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# Config keys of the `training` block that shape the launch, not the training stage's flags.
LAUNCH_SETTINGS = ("nodes", "gpus_per_node", "use_srun")


def uses_srun(training: Mapping) -> bool:
    return training.get("nodes", 1) > 1 or bool(training.get("use_srun", False))


def launch_command(training: Mapping) -> str:
    """Shell prefix to which `MODULE ARGS...` is appended."""
    nodes, per_node = training.get("nodes", 1), training.get("gpus_per_node", 1)
    if uses_srun(training):
        return f"srun --kill-on-bad-exit=1 --nodes={nodes} --ntasks-per-node={per_node} python -m"
    if per_node > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {per_node} -m"
    return "python -m"


def gpus_for(device: str, gpus: int = 1) -> int:
    """GPUs a job asks for: none when the config pins it to the CPU, else `gpus` (auto takes a granted GPU).

    The one place where device choices become scheduler requests: every rule's `resources: gpu=` (sbatch --gpus
    under the SLURM plugin, the gpu=1 budget of profiles/local-gpu) comes from here.
    """
    return 0 if device == "cpu" else gpus


def launch_resources(training: Mapping) -> dict:
    """Snakemake resources of a training job (snakemake-executor-plugin-slurm turns them into sbatch flags).

    `gpu` is the job's total (sbatch --gpus). Under srun the job is an "mpi" job for the plugin: it then
    runs our command as is (not inside its own `srun -n1`) and asks for --nodes and --ntasks.
    """
    nodes, per_node = training.get("nodes", 1), training.get("gpus_per_node", 1)
    on_cpu = training.get("device") == "cpu"
    resources = {"gpu": gpus_for(training.get("device", "auto"), nodes * per_node)}
    if uses_srun(training):
        resources.update(nodes=nodes, tasks=nodes * per_node, mpi="srun")
        if not on_cpu:
            resources["tasks_per_gpu"] = 1
    return resources


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_rendezvous(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for srun-started tasks (torchrun sets its own; an explicit value wins).

    The port is derived from the job id so that two jobs sharing a node do not collide.
    """
    if "SLURM_PROCID" not in environ or "MASTER_ADDR" in environ or "TORCHELASTIC_RUN_ID" in environ:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    port = environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return {"MASTER_ADDR": first_host(nodelist), "MASTER_PORT": port}
