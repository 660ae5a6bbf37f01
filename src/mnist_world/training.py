"""The training loop: one objective per batch, AdamW with a per-step cosine schedule, validation, DVCLive
logging, self-describing checkpoints and exact resume after an interruption, in one process or under DDP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from tqdm import tqdm

from mnist_world.checkpoint import load_checkpoint, save_checkpoint
from mnist_world.config import DataConfig, ModelConfig, TrainConfig, as_dict
from mnist_world.devices import autocast, autocast_dtype, resolve_device
from mnist_world.masking import MaskedBatch, choose_objectives, make_batch
from mnist_world.model import Architecture, WorldModel

METRICS = ("loss", "val_loss", "lr", "val_accuracy")  # logged once per epoch, in this order
LAST, BEST = "last.pt", "best.pt"
NO_BAD_STEP = 2**62  # "no non-finite loss yet": above any step, so a MIN across ranks finds the first bad one
# Each random stream has its own seed, derived from (train.seed, stream, epoch, rank...), so that none
# depends on how much another consumed: a resumed run redraws exactly what it would have drawn.
SHUFFLE, OBJECTIVES, MASKS, DROPOUT, VALIDATION = range(5)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; training stops before such weights reach a checkpoint."""


class Sequences(NamedTuple):
    """A split held in memory: tokens uint8 (N, T, H, W) and actions float32 (N, T, 2)."""

    tokens: Tensor
    actions: Tensor


@dataclasses.dataclass(frozen=True)
class Process:
    """Where this process stands in a (possibly single-process) distributed run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# --- Small helpers ---------------------------------------------------------------------------------------


def run_params(model: ModelConfig, train: TrainConfig, data: DataConfig) -> dict[str, Any]:
    """The params a checkpoint records and a resume must match: model, train and the data split."""
    return {
        "model": as_dict(model),
        "train": as_dict(train),
        "data": {"train_sequences": data.train_sequences, "val_sequences": data.val_sequences},
    }


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, epoch, rank...): nearby keys, unrelated seeds."""
    entropy = [key % 2**64 for key in keys]  # SeedSequence takes non-negative integers only
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def masked_cross_entropy(
    logits: Tensor, targets: Tensor, loss_mask: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy over the positions of `loss_mask`, the correct argmax count there, and the count.

    logits (B, T, H, W, V), targets (B, T, H, W) ids, loss_mask (B, T, H, W) bool. Weighting every position
    instead of indexing the masked ones keeps shapes static: no host-device sync on a GPU.
    """
    per_token = F.cross_entropy(
        rearrange(logits.float(), "b t h w v -> (b t h w) v"),
        targets.reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    weights = loss_mask.reshape(-1).to(per_token.dtype)
    count = weights.sum()
    loss = (per_token * weights).sum() / count.clamp(min=1)
    correct = ((logits.argmax(dim=-1) == targets) & loss_mask).sum()
    return loss, correct, count


def data_fingerprint(*splits: Sequences) -> str:
    """A digest of the training and validation data, so a resume never continues on different data."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in split:
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- Random state, as weights_only-loadable values --------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and python random states."""
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [
            numpy_name,
            torch.from_numpy(numpy_keys.astype(np.int64)),
            numpy_pos,
            numpy_has_gauss,
            numpy_gauss,
        ],
        "python": [python_version, list(python_internal), python_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states(process: Process) -> list[dict[str, Any]]:
    """Every rank's random state (rank order), so that a resumed DDP run draws dropout as before."""
    state = rng_state()
    if process.world_size == 1:
        return [state]
    states: list[Any] = [None] * process.world_size
    dist.all_gather_object(states, state)
    return states


# --- Checkpoints and resume ------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def run_differences(payload: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """'key: stored -> now' for each entry of `expected` (params, architecture, data) that differs."""
    stored = _flatten({key: payload[key] for key in expected if key in payload}, "")
    wanted = _flatten(expected, "")
    return [
        f"{key}: {stored.get(key, '<missing>')!r} -> {wanted.get(key, '<missing>')!r}"
        for key in sorted(set(stored) | set(wanted))
        if stored.get(key, "<missing>") != wanted.get(key, "<missing>")
    ]


def checkpoint_files(output_dir: Path, temporaries_only: bool = False) -> list[Path]:
    """Our checkpoints in `output_dir` and the temporaries a killed writer left (those alone if asked)."""
    patterns = (".*.partial-*", ".*.previous-*") + (() if temporaries_only else (LAST, BEST, "epoch_*.pt"))
    return sorted({path for pattern in patterns for path in output_dir.glob(pattern)})


def find_resumable(
    output_dir: Path, expected: dict[str, Any], echo: Callable[[str], None]
) -> dict[str, Any] | None:
    """The payload of `output_dir/last.pt` when it was written by this same run, else None (saying why).

    A corrupt or truncated last.pt raises CheckpointError rather than being silently thrown away.
    """
    path = output_dir / LAST
    if not path.exists():
        return None
    payload = load_checkpoint(path)
    differences = run_differences(payload, expected)
    if differences:
        shown = "; ".join(differences[:8]) + (
            f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
        )
        echo(f"{path}: written by a different run ({shown}); starting afresh and removing its checkpoints")
        return None
    return payload


# --- DVCLive ---------------------------------------------------------------------------------------------


def open_live(reports_dir: Path, history: Sequence[dict[str, Any]]) -> Any:
    """A DVCLive logger whose files hold exactly the epochs of `history` (from the checkpoint).

    DVCLive's own resume reads the step from metrics.json, but `dvc repro` deletes non-persistent outputs
    before re-running a stage, and a kill between logging and checkpointing would leave an extra row; so the
    files are rewritten from the checkpoint's history instead, and the step count continues from there.
    """
    live = _files_only_live()(dir=str(reports_dir), resume=False, save_dvc_exp=False, dvcyaml=None)
    for record in history:
        log_epoch(live, record)
    return live


def _files_only_live() -> type:
    from dvclive import Live  # imported here: it is slow to import and only the main rank logs

    class FilesOnlyLive(Live):
        """DVCLive writing its files and nothing else.

        Its repository probing serves experiment tracking, which this project leaves to DVC (the stage
        declares the files; save_dvc_exp=False, dvcyaml=None), yet it fails in a git repository without
        commits (dvclive 3.49: `scm.get_rev()` before the `no_commits` check) and runs `dvc init` in a git
        repository without DVC.
        """

        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

    return FilesOnlyLive


def log_epoch(live: Any, record: dict[str, Any]) -> None:
    live.step = record["epoch"]
    for name in METRICS:
        live.log_metric(name, record[name])
    live.next_step()


# --- Distributed setup -----------------------------------------------------------------------------------


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


def inside_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_distributed(nproc: int, script: str, arguments: Sequence[str]) -> int:
    """Re-run `script arguments` under torchrun with `nproc` processes; return its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*command, script, *arguments], check=False).returncode


# --- The loop --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Learner:
    """The model and everything a checkpoint must hold to continue training it exactly."""

    model: WorldModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one metrics record per epoch

    @classmethod
    def build(
        cls, arch: Architecture, config: TrainConfig, steps_per_epoch: int, device: torch.device
    ) -> Learner:
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = WorldModel(arch).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # Stepped once per batch: a smooth decay even over the 2-epoch CPU budget.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.min_lr
        )
        return cls(model, optimizer, scheduler)

    def payload(self, expected: dict[str, Any], rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            **expected,  # architecture, params, data_fingerprint
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,  # one entry per rank
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "history": self.history,
            "metrics": self.history[-1],  # this epoch's (in best.pt: the best epoch's)
        }

    def restore(self, payload: dict[str, Any], rank: int) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"][rank])
        self.epoch, self.best_val_loss = payload["epoch"], payload["best_val_loss"]
        self.history = list(payload["history"])


def limit(split: Sequences, count: int) -> Sequences:
    tokens, actions = split
    return Sequences(tokens[:count], actions[:count]) if count else Sequences(tokens, actions)


def check_data(split: Sequences, arch: Architecture, name: str, minimum: int) -> None:
    tokens, actions = split
    expected = (arch.frames, arch.frame_size, arch.frame_size)
    if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
        raise ValueError(
            f"{name} tokens: expected (N, {', '.join(map(str, expected))}), got {tuple(tokens.shape)}"
        )
    if tuple(actions.shape) != (tokens.shape[0], arch.frames, arch.action_dim):
        raise ValueError(
            f"{name} actions: expected ({tokens.shape[0]}, {arch.frames}, 2), got {tuple(actions.shape)}"
        )
    if tokens.shape[0] < minimum:
        raise ValueError(f"{name} split: {tokens.shape[0]} sequences, need at least {minimum}")
    if tokens.numel() and int(tokens.max()) >= arch.levels:
        raise ValueError(f"{name} tokens: ids up to {int(tokens.max())}, the model has {arch.levels} levels")


def epoch_batches(
    count: int, config: TrainConfig, epoch: int, process: Process, device: torch.device
) -> list[Tensor]:
    """This rank's batches of sequence indices for `epoch`, on `device`.

    The permutation is seeded by (seed, epoch) alone, so a resumed run sees the same order; each rank takes
    every world_size-th index of an equal share, so all ranks run the same number of steps.
    """
    generator = torch.Generator().manual_seed(derived_seed(config.seed, SHUFFLE, epoch))
    order = torch.randperm(count, generator=generator)
    usable = count // process.world_size * process.world_size
    return list(order[:usable][process.rank :: process.world_size].to(device).split(config.batch_size))


def train_epoch(
    net: torch.nn.Module,
    learner: Learner,
    data: Sequences,
    config: TrainConfig,
    epoch: int,
    process: Process,
    amp: torch.dtype | None,
    progress: bool,
) -> tuple[float, float]:
    """One pass over this rank's share of the data; returns (mean batch loss, lr of the last step)."""
    model, optimizer, scheduler = learner.model, learner.optimizer, learner.scheduler
    device = data.tokens.device
    batches = epoch_batches(data.tokens.shape[0], config, epoch, process, device)
    objectives = choose_objectives(
        config, len(batches), torch.Generator().manual_seed(derived_seed(config.seed, OBJECTIVES, epoch))
    )
    masks = torch.Generator(device=device).manual_seed(derived_seed(config.seed, MASKS, epoch, process.rank))
    # A GPU step must not wait for the host: losses stay on the device and are read every `sync_every` steps.
    sync_every = 1 if device.type == "cpu" else 50
    loss_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    bar = tqdm(
        total=len(batches),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        disable=not (progress and process.is_main),
        dynamic_ncols=True,
        leave=True,
    )
    started, lr = time.perf_counter(), scheduler.get_last_lr()[0]
    net.train()
    for step, (indices, objective) in enumerate(zip(batches, objectives, strict=True), start=1):
        tokens = data.tokens[indices].long()  # (B, T, H, W)
        batch = make_batch(objective, tokens, config, model.arch.levels, masks)
        with autocast(device, amp):
            logits, _ = net(batch.inputs, data.actions[indices], batch.temporal_mask)  # (B, T, H, W, levels)
        loss, _, _ = masked_cross_entropy(logits, tokens, batch.loss_mask, config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        loss = loss.detach()
        loss_sum += loss
        first_bad_step = torch.where(torch.isfinite(loss) | (first_bad_step < step), first_bad_step, step)
        if step % sync_every == 0 or step == len(batches):
            stop_if_diverged(first_bad_step, epoch, process)
            seconds = time.perf_counter() - started
            rate = step * config.batch_size * process.world_size / max(seconds, 1e-9)
            bar.set_postfix(loss=f"{loss_sum.item() / step:.4f}", seq_per_s=f"{rate:.2f}", refresh=False)
            bar.update(step - bar.n)
    bar.close()
    total = loss_sum.clone()
    if process.world_size > 1:
        dist.all_reduce(total)
    return total.item() / (len(batches) * process.world_size), lr


def rank_zero_decides(flag: bool, process: Process, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every rank: ranks that disagreed on stopping would wait on each other."""
    if process.world_size == 1:
        return flag
    decision = torch.tensor([int(flag)], device=device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def stop_if_diverged(first_bad_step: Tensor, epoch: int, process: Process) -> None:
    """Raise (on every rank together, so none waits forever in an all-reduce) at the first non-finite loss."""
    if process.world_size > 1:
        first_bad_step = first_bad_step.clone()
        dist.all_reduce(first_bad_step, op=dist.ReduceOp.MIN)
    step = int(first_bad_step.item())
    if step != NO_BAD_STEP:
        raise DivergenceError(
            f"non-finite training loss at epoch {epoch}, step {step}: stopped without checkpointing these "
            f"weights (lower train.lr, or check the data for NaN actions)"
        )


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    data: Sequences,
    masked: MaskedBatch,
    config: TrainConfig,
    process: Process,
    amp: torch.dtype | None,
) -> tuple[float, float]:
    """Future-objective loss (no label smoothing: a true NLL) and masked-token accuracy on the fixed masks."""
    device = data.tokens.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    indices = torch.arange(process.rank, data.tokens.shape[0], process.world_size, device=device)
    model.eval()
    for chunk in indices.split(config.batch_size):
        tokens = data.tokens[chunk].long()
        with autocast(device, amp):
            logits, _ = model(masked.inputs[chunk].long(), data.actions[chunk], masked.temporal_mask)
        loss, correct, count = masked_cross_entropy(logits, tokens, masked.loss_mask[chunk])
        totals += torch.stack([loss.double() * count, correct.double(), count.double()])
    model.train()
    if process.world_size > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


def start_or_resume(
    learner: Learner,
    output_dir: Path,
    expected: dict[str, Any],
    fresh: bool,
    process: Process,
    say: Callable[[str], None],
) -> None:
    """Restore `learner` from output_dir/last.pt when it belongs to this run, else clear old checkpoints."""
    output_dir.mkdir(parents=True, exist_ok=True)
    resumed = None if fresh else find_resumable(output_dir, expected, say)
    process.barrier()  # every rank has read last.pt before rank 0 may remove it
    if process.is_main:
        for path in checkpoint_files(output_dir, temporaries_only=resumed is not None):
            path.unlink()
    if resumed is not None:
        learner.restore(resumed, process.rank)
        say(f"{output_dir / LAST}: resuming after epoch {learner.epoch}")
    process.barrier()


def save_epoch(output_dir: Path, payload: dict[str, Any], improved: bool, config: TrainConfig) -> None:
    epoch = payload["epoch"]
    if improved:
        save_checkpoint(output_dir / BEST, payload)
    if epoch % config.checkpoint_every == 0:
        save_checkpoint(output_dir / f"epoch_{epoch:03d}.pt", payload)
    # last.pt goes last: it is the resume point, so what it vouches for is on disk before it.
    save_checkpoint(output_dir / LAST, payload)


def train(
    config: TrainConfig,
    arch: Architecture,
    train_data: tuple[Tensor, Tensor],
    val_data: tuple[Tensor, Tensor],
    output_dir: str | Path = "models",
    reports_dir: str | Path | None = "reports/train",
    params: dict[str, Any] | None = None,
    progress: bool = True,
    fresh: bool = False,
    echo: Callable[[str], None] = print,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a WorldModel; write checkpoints to `output_dir` and DVCLive logs to
    `reports_dir` (None: no logs). Returns the last epoch's metrics plus `best_val_loss` and `epoch`.

    train_data / val_data: (tokens uint8 (N, T, H, W), actions float32 (N, T, 2)), cut here to
    train.max_train_sequences / max_val_sequences. `params` (see `run_params`) is recorded in every
    checkpoint; `last.pt` is resumed only when its params, architecture and data all match, and never when
    `fresh`. `deadline` (a `time.monotonic()` value) ends training cleanly after the first epoch that passes
    it. Under torchrun (WORLD_SIZE > 1) every process calls this; rank 0 alone writes files.
    """
    process = init_process(config.device)
    try:
        return _train(
            config,
            arch,
            Sequences(*train_data),
            Sequences(*val_data),
            Path(output_dir),
            reports_dir,
            params or {},
            progress,
            fresh,
            echo,
            process,
            deadline,
        )
    finally:
        if process.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    arch: Architecture,
    train_split: Sequences,
    val_split: Sequences,
    output_dir: Path,
    reports_dir: str | Path | None,
    params: dict[str, Any],
    progress: bool,
    fresh: bool,
    echo: Callable[[str], None],
    process: Process,
    deadline: float | None = None,
) -> dict[str, Any]:
    say = echo if process.is_main else (lambda message: None)
    device = resolve_device(config.device, process.local_rank)
    amp = autocast_dtype(config.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 work autocast leaves
    train_split = limit(train_split, config.max_train_sequences)
    val_split = limit(val_split, config.max_val_sequences)
    check_data(train_split, arch, "train", minimum=process.world_size)
    check_data(val_split, arch, "validation", minimum=1)
    if not 0 < config.past_frames < arch.frames:
        raise ValueError(f"train.past_frames={config.past_frames} must be in [1, {arch.frames - 1}]")
    expected = {
        "architecture": dataclasses.asdict(arch),
        "params": params,
        "data_fingerprint": data_fingerprint(train_split, val_split),
    }
    steps_per_epoch = math.ceil(train_split.tokens.shape[0] // process.world_size / config.batch_size)
    learner = Learner.build(arch, config, steps_per_epoch, device)
    # Dropout draws from the global generator: give each rank its own stream (a resume restores it).
    torch.manual_seed(derived_seed(config.seed, DROPOUT, process.rank))
    start_or_resume(learner, output_dir, expected, fresh, process, say)

    # The splits are tiny (2000 x 20 x 32 x 32 uint8 = 41 MB): keep them on the device, index batches there.
    train_split = Sequences(*(tensor.to(device) for tensor in train_split))
    val_split = Sequences(*(tensor.to(device) for tensor in val_split))
    # The same validation masks every epoch (and for any batch size or rank count): comparable losses.
    val_masks = make_batch(
        "future",
        val_split.tokens,
        dataclasses.replace(config, noise_eta=0.0),
        arch.levels,
        torch.Generator(device=device).manual_seed(derived_seed(config.seed, VALIDATION)),
    )
    evaluator: torch.nn.Module = torch.compile(learner.model) if config.compile else learner.model
    net = evaluator
    if process.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(evaluator, device_ids=ids)

    live = open_live(Path(reports_dir), learner.history) if reports_dir and process.is_main else None
    try:
        if learner.epoch >= config.epochs:
            say(f"{output_dir / LAST}: training already finished ({learner.epoch} epochs); logs rewritten")
        for epoch in range(learner.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            loss, lr = train_epoch(net, learner, train_split, config, epoch, process, amp, progress)
            val_loss, val_accuracy = validate(evaluator, val_split, val_masks, config, process, amp)
            if not math.isfinite(val_loss):
                raise DivergenceError(f"non-finite validation loss after epoch {epoch}: nothing checkpointed")
            seconds = time.perf_counter() - started
            record = {
                "epoch": epoch,
                "loss": loss,
                "val_loss": val_loss,
                "lr": lr,
                "val_accuracy": val_accuracy,
                "seconds": seconds,
            }
            improved = val_loss < learner.best_val_loss
            learner.epoch, learner.history = epoch, [*learner.history, record]
            learner.best_val_loss = min(val_loss, learner.best_val_loss)
            rng = gather_rng_states(process)
            if process.is_main:
                save_epoch(output_dir, learner.payload(expected, rng), improved, config)
                if live is not None:
                    log_epoch(live, record)
                say(
                    f"epoch {epoch}/{config.epochs}: loss {loss:.4f}, val_loss {val_loss:.4f}, "
                    f"val_accuracy {val_accuracy:.4f}, lr {lr:.2e}, {seconds:.1f} s"
                    + (" (best)" if improved else "")
                )
            process.barrier()
            out_of_time = deadline is not None and time.monotonic() > deadline
            if rank_zero_decides(out_of_time, process, device) and epoch < config.epochs:
                say(f"time budget reached after epoch {epoch}/{config.epochs}: stopping with its checkpoints")
                break
    finally:
        if live is not None:
            live.end()
    last = learner.history[-1] if learner.history else {}
    return {**last, "best_val_loss": learner.best_val_loss, "epoch": learner.epoch}
