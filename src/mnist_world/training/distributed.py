"""Where this process stands in a (possibly single-process) DistributedDataParallel run: joining the
process group under torchrun, re-launching a stage under torchrun on one node or several, and decisions
every rank must share.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mnist_world.core.devices import resolve_device


@dataclasses.dataclass(frozen=True)
class Process:
    """This process's rank among `world_size` (1: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (picklable values)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (a copy; the input is left as it is)."""
        total = tensor.clone()
        if self.world_size > 1:
            dist.all_reduce(total)
        return total

    def minimum(self, tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.clone()
        if self.world_size > 1:
            dist.all_reduce(result, op=dist.ReduceOp.MIN)
        return result

    def main_decides(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's value of `flag` everywhere: ranks that disagreed on stopping would wait on each other."""
        if self.world_size == 1:
            return flag
        decision = torch.tensor([int(flag)], device=device)
        dist.broadcast(decision, src=0)
        return bool(decision.item())


def init_process(device_name: str) -> Process:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(rank=rank, world_size=world_size, local_rank=local_rank)


def close_process(process: Process) -> None:
    if process.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


NODES, RENDEZVOUS, RUN_ID = "MNIST_WORLD_NODES", "MNIST_WORLD_RENDEZVOUS", "MNIST_WORLD_RUN_ID"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The nodes a DDP run spans and where their launchers meet (torchrun's c10d rendezvous).

    Read from the environment, not params.yaml: they say where a run happens, which differs between a laptop,
    a SLURM allocation and a Kubernetes job, while params say what it computes. Every node runs the same
    command with the same settings; torchrun numbers the nodes as they arrive.
    """

    nodes: int = 1
    rendezvous: str | None = None  # host:port of the c10d store, served by the launcher on that host
    run_id: str = "mnist-world"  # tells apart jobs that share a rendezvous endpoint (SLURM: the job id)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Cluster:
        text = environ.get(NODES, "1").strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{NODES}={text!r}: expected a whole number of nodes, at least 1")
        rendezvous = environ.get(RENDEZVOUS, "").strip() or None
        if int(text) > 1 and rendezvous is None:
            raise ValueError(
                f"{NODES}={text} needs {RENDEZVOUS}=host:port, an address of the first node that every node "
                "reaches"
            )
        if rendezvous is not None:
            host, _, port = rendezvous.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{RENDEZVOUS}={rendezvous!r}: expected host:port, e.g. node001:29500")
        run_id = environ.get(RUN_ID, "").strip() or cls.run_id
        return cls(nodes=int(text), rendezvous=rendezvous, run_id=run_id)

    @property
    def distributed(self) -> bool:
        """Whether a stage must launch torchrun even with one process per node."""
        return self.nodes > 1

    def torchrun_options(self, nproc: int) -> list[str]:
        """torchrun's options for `nproc` processes on each node: standalone on one node, else c10d."""
        if self.rendezvous is None:
            return ["--standalone", f"--nproc_per_node={nproc}"]
        return [
            f"--nnodes={self.nodes}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={self.rendezvous}",
            f"--rdzv_id={self.run_id}",
        ]


def inside_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_distributed(
    nproc: int, script: str, arguments: Sequence[str], cluster: Cluster = Cluster()
) -> int:
    """Re-run `script arguments` under torchrun with `nproc` processes on this node (of `cluster.nodes`,
    each launched alike); return its exit status.

    The ranks' output passes through as it comes, up to the first rank's one-line `error:` or torchrun's
    own report of a failed rank (its log lines, a traceback, a summary block): only that first `error:`
    line passes, so a failure under DDP ends in the same one line as in a single process.
    """
    command = [sys.executable, "-m", "torch.distributed.run", *cluster.torchrun_options(nproc)]
    process = subprocess.Popen([*command, script, *arguments], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    failing, said = False, False
    for line in process.stderr:
        if line.startswith("error: "):
            if not said:  # the first rank to fail speaks for all: the others stop because of it
                sys.stderr.write(line)
            failing = said = True
        elif line.startswith("Traceback") or "torch/distributed/elastic" in line:
            failing = True  # torchrun's report of the failed rank
        elif not failing:
            sys.stderr.write(line)
        sys.stderr.flush()
    status = process.wait()
    if status and not said:
        alone = f"train.nproc=1 and {NODES}=1" if cluster.distributed else "train.nproc=1"
        sys.stderr.write(
            f"error: a training process failed (torchrun exit {status}); run with {alone} to see why\n"
        )
    return status
