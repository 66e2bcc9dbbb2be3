"""Run a training script under srun or mpirun: set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* from the scheduler's vars.

    srun python launch/scheduler_env.py launch/train.py --config configs/frrn_b.yaml [key=value ...]
    deepspeed --launcher slurm   ... launch/scheduler_env.py launch/train.py --config ...
    deepspeed --launcher openmpi ... launch/scheduler_env.py launch/train.py --config ...

DeepSpeed's own launcher (pdsh, --no_ssh, one node) and torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for each process; frrn_dist.distributed reads those. `deepspeed --launcher slurm|openmpi` and a bare
`srun` start the processes themselves and set only their own variables (SLURM_PROCID, OMPI_COMM_WORLD_RANK, ...);
without this wrapper every process would take itself for a 1-rank job. Variables already set win.

Global rank (RANK) picks the data shard and the rank-0 role; LOCAL_RANK only picks the GPU. When a scheduler
binds one GPU per task (CUDA_VISIBLE_DEVICES holds a single id), LOCAL_RANK is 0, the only device the task sees.
MASTER_ADDR defaults to the first host of the SLURM step (scontrol show hostnames); MASTER_PORT to 29500.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

# (rank, world size, local rank) variable names per scheduler, most specific first.
SCHEDULERS = {
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "mpich/intel mpi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
}


def first_slurm_host(env: dict[str, str]) -> str | None:
    """First host name of the SLURM step's (or job's) node list, e.g. gpu[03-04] -> gpu03."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            f"scheduler_env: cannot expand SLURM node list {nodelist!r} with scontrol ({e}); "
            "export MASTER_ADDR=<first node>"
        ) from None
    return out.stdout.split()[0]


def scheduler_env(env: dict[str, str]) -> dict[str, str]:
    """The variables to add to `env` so that torch.distributed's env:// rendezvous works; {} when already set."""
    if "RANK" in env:
        return {}
    for name, (rank, size, local) in SCHEDULERS.items():
        if rank not in env:
            continue
        size_value = env.get(size) or env.get("SLURM_NTASKS")
        if size_value is None:
            raise SystemExit(f"scheduler_env: {rank} is set but {size} is not ({name}); cannot tell the world size")
        local_value = env.get(local, env.get("MV2_COMM_WORLD_LOCAL_RANK", "0"))
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
        if visible and "," not in visible:
            local_value = "0"  # one GPU bound to this task: it is device 0 whatever the task's local rank
        out = {"RANK": env[rank], "WORLD_SIZE": size_value, "LOCAL_RANK": local_value}
        if "MASTER_ADDR" not in env:
            host = first_slurm_host(env)
            if host is None:
                raise SystemExit(
                    f"scheduler_env: MASTER_ADDR is not set ({name} gives no master host); export it (first node) "
                    "and list it in .deepspeed_env (launch/deepspeed_env.sh) so every node gets it"
                )
            out["MASTER_ADDR"] = host
        out.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
        return out
    return {}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    os.environ.update(scheduler_env(dict(os.environ)))
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"scheduler_env: {script}: no such script")
    sys.argv = list(argv)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
