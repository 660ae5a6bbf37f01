"""The training loop: one objective per batch, AdamW (matrices decayed) with linear warm-up and a per-step
cosine decay, validation with the point prediction's error, curves every few steps, self-describing
checkpoints and exact resume after an interruption, in one process or under DDP.

`fit` is the entry point of the train stage and the GPU script: stores and params in, checkpoints out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from mnist_world.checkpoint import load_checkpoint, save_checkpoint
from mnist_world.config import DataConfig, ModelConfig, TrainConfig, as_dict
from mnist_world.dataset import load_split
from mnist_world.devices import autocast, autocast_dtype, resolve_device
from mnist_world.distributed import Process, close_process, init_process
from mnist_world.masking import MaskedBatch, choose_objectives, make_batch, masked_cross_entropy
from mnist_world.model import Architecture, WorldModel
from mnist_world.randomness import derived_seed, rng_state, set_rng_state
from mnist_world.sampling import point_prediction
from mnist_world.tokens import Vocabulary
from mnist_world.training_log import TrainingLog

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


def run_params(model: ModelConfig, train: TrainConfig, data: DataConfig) -> dict[str, Any]:
    """The params a checkpoint records and a resume must match: model, train and the data split."""
    return {
        "model": as_dict(model),
        "train": as_dict(train),
        "data": {"train_sequences": data.train_sequences, "val_sequences": data.val_sequences},
    }


def data_fingerprint(*splits: Sequences) -> str:
    """A digest of the training and validation data, so a resume never continues on different data."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in split:
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


# --- Optimisation ----------------------------------------------------------------------------------------


def configure_optimizer(model: WorldModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays the weight matrices only (nanoGPT's rule): biases, norms and the position
    embeddings, whose size says nothing about overfitting, are left undecayed."""
    decayed, undecayed = [], []
    for name, parameter in model.named_parameters():
        is_matrix = parameter.dim() >= 2 and not name.endswith("_position")
        (decayed if is_matrix else undecayed).append(parameter)
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a multiple of train.lr: linear warm-up over
    train.warmup_steps, then a cosine decay that reaches train.min_lr when all `total_steps` are done."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class Learner:
    """The model and everything a checkpoint must hold to continue training it exactly."""

    model: WorldModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one record per epoch
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the logged rows, by step

    @classmethod
    def build(
        cls, arch: Architecture, config: TrainConfig, total_steps: int, device: torch.device
    ) -> Learner:
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = WorldModel(arch).to(device)
        optimizer = configure_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config, total_steps)
        )
        return cls(model, optimizer, scheduler)

    def payload(self, expected: dict[str, Any], rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            **expected,  # architecture, params, data_fingerprint, vocabulary
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,  # one entry per rank
            "epoch": self.epoch,
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "history": self.history,
            "curve": self.curve,
            "metrics": self.history[-1],  # this epoch's (in best.pt: the best epoch's)
        }

    def restore(self, payload: dict[str, Any], rank: int) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"][rank])
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.best_val_loss = payload["best_val_loss"]
        self.history, self.curve = list(payload["history"]), list(payload["curve"])


def train_step(
    net: torch.nn.Module,
    learner: Learner,
    tokens: Tensor,
    actions: Tensor,
    objective: str,
    config: TrainConfig,
    masks: torch.Generator,
    amp: torch.dtype | None,
) -> Tensor:
    """One optimizer step on a batch of tokens (B, T, H, W) int64 and actions (B, T, 2); returns the loss
    (detached, on the device: reading it would make a GPU wait)."""
    batch = make_batch(objective, tokens, config, learner.model.arch.levels, masks)
    with autocast(tokens.device, amp):
        logits, _ = net(batch.inputs, actions, batch.temporal_mask)  # (B, T, H, W, levels)
    loss, _, _ = masked_cross_entropy(logits, tokens, batch.loss_mask, config.label_smoothing)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(learner.model.parameters(), config.grad_clip)
    learner.optimizer.step()
    learner.scheduler.step()
    learner.step += 1
    return loss.detach()


# --- Data ------------------------------------------------------------------------------------------------


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


def steps_per_epoch(count: int, config: TrainConfig, process: Process) -> int:
    return math.ceil(count // process.world_size / config.batch_size)


# --- One epoch -------------------------------------------------------------------------------------------


def train_epoch(
    net: torch.nn.Module,
    learner: Learner,
    data: Sequences,
    config: TrainConfig,
    epoch: int,
    process: Process,
    amp: torch.dtype | None,
    progress: bool,
    on_log: Callable[[dict[str, Any]], None],
) -> float:
    """One pass over this rank's share of the data; returns the mean batch loss. Every train.log_every
    steps `on_log` receives {"step", "loss" (mean over those steps and ranks), "lr"}."""
    device = data.tokens.device
    batches = epoch_batches(data.tokens.shape[0], config, epoch, process, device)
    objectives = choose_objectives(
        config, len(batches), torch.Generator().manual_seed(derived_seed(config.seed, OBJECTIVES, epoch))
    )
    masks = torch.Generator(device=device).manual_seed(derived_seed(config.seed, MASKS, epoch, process.rank))
    loss_sum, window_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    window_start = 0
    first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    bar = tqdm(
        total=len(batches),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        disable=not (progress and process.is_main),
        dynamic_ncols=True,
        leave=True,
    )
    started = time.perf_counter()
    for step, (indices, objective) in enumerate(zip(batches, objectives, strict=True), start=1):
        lr = learner.scheduler.get_last_lr()[0]
        loss = train_step(
            net, learner, data.tokens[indices].long(), data.actions[indices], objective, config, masks, amp
        )
        loss_sum += loss
        window_sum += loss
        first_bad_step = torch.where(torch.isfinite(loss) | (first_bad_step < step), first_bad_step, step)
        # A GPU must not wait for the host: losses stay on the device until a log line needs them.
        if learner.step % config.log_every == 0 or step == len(batches):
            stop_if_diverged(first_bad_step, epoch, process)
            mean = process.sum(window_sum).item() / ((step - window_start) * process.world_size)
            on_log({"step": learner.step, "loss": mean, "lr": lr})
            window_sum.zero_()
            window_start = step
            rate = step * config.batch_size * process.world_size / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{mean:.4f}", seq_per_s=f"{rate:.2f}", refresh=False)
            bar.update(step - bar.n)
    bar.close()
    return process.sum(loss_sum).item() / (len(batches) * process.world_size)


def stop_if_diverged(first_bad_step: Tensor, epoch: int, process: Process) -> None:
    """Raise (on every rank together, so none waits forever in an all-reduce) at the first non-finite loss."""
    step = int(process.minimum(first_bad_step).item())
    if step != NO_BAD_STEP:
        raise DivergenceError(
            f"non-finite training loss at epoch {epoch}, step {step}: stopped without checkpointing these "
            f"weights (lower train.lr, or check the data for NaN actions)"
        )


# --- Validation ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Validation:
    """What every epoch is scored on: fixed masks of the future objective over the validation split, and the
    point prediction of the first train.point_sequences sequences against their decoded true tokens."""

    data: Sequences
    masked: MaskedBatch
    intensities: Tensor  # (levels,) the pixel value of each level

    @classmethod
    def build(
        cls, data: Sequences, config: TrainConfig, arch: Architecture, intensities: Tensor
    ) -> Validation:
        generator = torch.Generator(device=data.tokens.device).manual_seed(
            derived_seed(config.seed, VALIDATION)
        )
        masked = make_batch(
            "future", data.tokens, dataclasses.replace(config, noise_eta=0.0), arch.levels, generator
        )
        return cls(data, masked, intensities.to(data.tokens.device))

    @torch.no_grad()
    def score(
        self, model: torch.nn.Module, config: TrainConfig, process: Process, amp: torch.dtype | None
    ) -> dict[str, float]:
        """val_loss (future objective, no label smoothing: a true NLL), val_accuracy on the hidden tokens, and
        val_point_mse and its ratio to the blank frame's, val_point_vs_blank (< 1: better than blank)."""
        tokens_all, actions_all = self.data
        device = tokens_all.device
        totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, correct, count, point, blank
        indices = torch.arange(process.rank, tokens_all.shape[0], process.world_size, device=device)
        points = min(config.point_sequences, tokens_all.shape[0])
        model.eval()
        for chunk in indices.split(config.batch_size):
            tokens = tokens_all[chunk].long()
            with autocast(device, amp):
                logits, _ = model(
                    self.masked.inputs[chunk].long(), actions_all[chunk], self.masked.temporal_mask
                )
            loss, correct, count = masked_cross_entropy(logits, tokens, self.masked.loss_mask[chunk])
            totals[:3] += torch.stack([loss.double() * count, correct.double(), count.double()])
            scored = chunk[chunk < points]
            if len(scored):
                past = tokens_all[scored, : config.past_frames]
                with autocast(device, amp):
                    point = point_prediction(
                        model, past, actions_all[scored], self.intensities, model.arch.mask_id
                    )
                truth = self.intensities[tokens_all[scored, config.past_frames :].long()]
                totals[3] += ((point.float() - truth) ** 2).mean(dim=(2, 3)).sum().double()
                totals[4] += (truth**2).mean(dim=(2, 3)).sum().double()
        model.train()
        loss_sum, correct, count, point_error, blank_error = process.sum(totals).tolist()
        frames = max(points * (tokens_all.shape[1] - config.past_frames), 1)
        scores = {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}
        if points:
            scores["val_point_mse"] = point_error / frames
            scores["val_point_vs_blank"] = point_error / blank_error if blank_error > 0 else math.inf
        return scores


# --- The run --------------------------------------------------------------------------------------------


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
    vocabulary: Vocabulary | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a WorldModel; write checkpoints to `output_dir` and the curves to
    `reports_dir` (None: no logs). Returns the last epoch's metrics plus `best_val_loss` and `epoch`.

    train_data / val_data: (tokens uint8 (N, T, H, W), actions float32 (N, T, 2)), cut here to
    train.max_train_sequences / max_val_sequences. `params` (see `run_params`) is recorded in every
    checkpoint; `last.pt` is resumed only when its params, architecture and data all match, and never when
    `fresh`. `deadline` (a `time.monotonic()` value) ends training cleanly after the first epoch that passes
    it. `vocabulary` decodes tokens for the point prediction's error (bin centres when None). Under torchrun
    (WORLD_SIZE > 1) every process calls this; rank 0 alone writes files.
    """
    process = init_process(config.device)
    vocabulary = vocabulary or Vocabulary.uniform(arch.levels, arch.frame_size, arch.frames)
    try:
        run = _Run(config, arch, process, echo, vocabulary)
        splits = Sequences(*train_data), Sequences(*val_data)
        return run.train(*splits, Path(output_dir), reports_dir, params or {}, progress, fresh, deadline)
    finally:
        close_process(process)


@dataclasses.dataclass
class _Run:
    config: TrainConfig
    arch: Architecture
    process: Process
    echo: Callable[[str], None]
    vocabulary: Vocabulary

    def say(self, message: str) -> None:
        if self.process.is_main:
            self.echo(message)

    def train(
        self,
        train_split: Sequences,
        val_split: Sequences,
        output_dir: Path,
        reports_dir: str | Path | None,
        params: dict[str, Any],
        progress: bool,
        fresh: bool,
        deadline: float | None,
    ) -> dict[str, Any]:
        config, arch, process = self.config, self.arch, self.process
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
            "vocabulary": dataclasses.asdict(self.vocabulary),
        }
        total_steps = config.epochs * steps_per_epoch(train_split.tokens.shape[0], config, process)
        learner = Learner.build(arch, config, total_steps, device)
        # Dropout draws from the global generator: give each rank its own stream (a resume restores it).
        torch.manual_seed(derived_seed(config.seed, DROPOUT, process.rank))
        start_or_resume(learner, output_dir, expected, fresh, process, self.say)

        # The splits are small (10,000 x 20 x 32 x 32 uint8 = 205 MB at most): keep them on the device.
        train_split = Sequences(*(tensor.to(device) for tensor in train_split))
        val_split = Sequences(*(tensor.to(device) for tensor in val_split))
        intensities = torch.tensor(self.vocabulary.intensities, dtype=torch.float32)
        validation = Validation.build(val_split, config, arch, intensities)
        evaluator: torch.nn.Module = torch.compile(learner.model) if config.compile else learner.model
        net = evaluator
        if process.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(evaluator, device_ids=ids)

        log = TrainingLog(reports_dir, learner.curve) if reports_dir and process.is_main else None

        def on_log(row: dict[str, Any]) -> None:
            learner.curve.append(row)
            if log is not None:
                log.add(row)
                log.write()

        if log is not None:
            log.write()
        if learner.epoch >= config.epochs:
            self.say(
                f"{output_dir / LAST}: training already finished ({learner.epoch} epochs); logs rewritten"
            )
        for epoch in range(learner.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            loss = train_epoch(net, learner, train_split, config, epoch, process, amp, progress, on_log)
            scores = validation.score(evaluator, config, process, amp)
            if not math.isfinite(scores["val_loss"]):
                raise DivergenceError(f"non-finite validation loss after epoch {epoch}: nothing checkpointed")
            record = {"epoch": epoch, "step": learner.step, "loss": loss, **scores}
            record["seconds"] = time.perf_counter() - started
            improved = scores["val_loss"] < learner.best_val_loss
            learner.epoch, learner.history = epoch, [*learner.history, record]
            learner.best_val_loss = min(scores["val_loss"], learner.best_val_loss)
            on_log({"step": learner.step, **scores})
            rng = process.gather(rng_state())
            if process.is_main:
                save_epoch(output_dir, learner.payload(expected, rng), improved, config)
                shown = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
                self.say(
                    f"epoch {epoch}/{config.epochs}: loss {loss:.4f}, {shown}, {record['seconds']:.1f} s"
                    + (" (best)" if improved else "")
                )
            process.barrier()
            out_of_time = deadline is not None and time.monotonic() > deadline
            if process.main_decides(out_of_time, device) and epoch < config.epochs:
                self.say(
                    f"time budget reached after epoch {epoch}/{config.epochs}: stopping with its checkpoints"
                )
                break
        last = learner.history[-1] if learner.history else {}
        summary = {**last, "best_val_loss": learner.best_val_loss, "epoch": learner.epoch}
        if log is not None:
            log.write({"best_val_loss": learner.best_val_loss, "epoch": learner.epoch})
        return summary


def fit(
    model_config: ModelConfig,
    config: TrainConfig,
    data: DataConfig,
    tokens_path: str | Path,
    actions_path: str | Path,
    output_dir: str | Path = "models",
    reports_dir: str | Path | None = "reports/train",
    **options: Any,
) -> dict[str, Any]:
    """Train on the stores: the vocabulary and frame geometry from the token store, the architecture from
    `model_config`, the splits from `data`; `options` go to `train` (progress, fresh, echo, deadline)."""
    vocabulary = Vocabulary.from_store(tokens_path)
    arch = Architecture.from_config(model_config, vocabulary.levels, vocabulary.frame_size, vocabulary.frames)
    sizes = (data.train_sequences, data.val_sequences)
    train_data = load_split(tokens_path, actions_path, "train", *sizes, config.max_train_sequences)
    val_data = load_split(tokens_path, actions_path, "val", *sizes, config.max_val_sequences)
    params = run_params(model_config, config, data)
    return train(
        config, arch, train_data, val_data, output_dir, reports_dir, params, vocabulary=vocabulary, **options
    )
