"""The training launcher: one command and one scheduler request per (nodes, gpus_per_node)."""

import pytest

from workflow_scripts import launch


def test_launch_command_per_layout():
    assert launch.launch_command({}) == "python -m"
    assert launch.launch_command({"nodes": 1, "gpus_per_node": 4}) == (
        "python -m torch.distributed.run --standalone --nproc_per_node 4 -m"
    )
    assert launch.launch_command({"nodes": 3, "gpus_per_node": 8}) == (
        "srun --kill-on-bad-exit=1 --nodes=3 --ntasks-per-node=8 python -m"
    )
    assert launch.launch_command({"nodes": 1, "gpus_per_node": 2, "use_srun": True}) == (
        "srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=2 python -m"
    )


def test_launch_resources_match_the_command():
    assert launch.launch_resources({"gpus_per_node": 4}) == {"gpu": 4}
    assert launch.launch_resources({"nodes": 2, "gpus_per_node": 4}) == {
        "gpu": 8,
        "nodes": 2,
        "tasks": 8,
        "mpi": "srun",
        "tasks_per_gpu": 1,
    }
    assert launch.launch_resources({"gpus_per_node": 2, "use_srun": True, "device": "cpu"}) == {
        "gpu": 0,
        "nodes": 1,
        "tasks": 2,
        "mpi": "srun",
    }


@pytest.mark.parametrize(
    "nodelist, host",
    [("localhost", "localhost"), ("gpu[07-09,12],cpu1", "gpu07"), ("node3,node4", "node3"), ("a[1]", "a1")],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert launch.first_host(nodelist) == host


def test_slurm_rendezvous_only_for_srun_tasks_without_one():
    env = {"SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123"}
    assert launch.slurm_rendezvous(env) == {"MASTER_ADDR": "gpu03", "MASTER_PORT": "15123"}
    assert launch.slurm_rendezvous({**env, "MASTER_ADDR": "x"}) == {}
    assert launch.slurm_rendezvous({**env, "TORCHELASTIC_RUN_ID": "r"}) == {}  # torchrun under srun -n1
    assert launch.slurm_rendezvous({}) == {}
