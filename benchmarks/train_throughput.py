"""Training throughput of the fast recipe (recipe.yaml's model, batch and frame size, future objective), in
sequences per second: our path (the model as it trains: attention written out in bf16 on a CPU and across
the 20 frames, the fused kernel within frames otherwise, dropout drawn 16 bits at a time, bf16 autocast where
the CPU has it natively) beside a plain reference of the same weights (fp32, attention as explicit
softmax(q k^T / sqrt(d) + mask) v, torch's dropout), all timed in the same run on the same batches with the
library's own training step (`learner.train_step`), and against the machine's matmul roofline. The process
keeps freed memory for reuse, as training does (`core.devices.keep_freed_memory`); `--return-freed-memory`
leaves glibc's default, under which every variant pays page faults on its large activations, the reference
most (its (L, L) scores).

    python benchmarks/train_throughput.py                 # CPU: 1 warm-up step, 3 timed steps per variant
    python benchmarks/train_throughput.py --patch 4       # the model with 4 x 4 patch tokens
    python benchmarks/train_throughput.py --device cuda   # GPU: 5 warm-up steps, 30 timed steps
    python benchmarks/train_throughput.py --original      # also with the original's attention dropout
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
      python benchmarks/train_throughput.py --precision fp32  # as a CPU with AVX2 only (no AVX-512/bf16)

"speedup" is a variant's time per step over ours: how many times faster our path trains. Where ours is
bf16 on a CPU, "ours in fp32" is what a CPU without native bf16 runs; its speedup over the plain reference
is printed last. "roofline" is the model's arithmetic (forward and backward FLOPs, counted by torch's
FlopCounterMode on the plain reference, whose attention is explicit matmuls) per second as a share of the
peak matmul rate measured here in the variant's precision (bf16 only where the CPU computes it natively:
AVX512-BF16 or AMX), with the same threads.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from mnist_world.config import TrainConfig
from mnist_world.core.devices import autocast_dtype, cpu_has_native_bf16, keep_freed_memory, resolve_device
from mnist_world.model.network import Architecture, Dropout, SelfAttention, WorldModel, build_model
from mnist_world.training import recipe
from mnist_world.training.learner import Learner, configure_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


class PlainSelfAttention(SelfAttention):
    """The same weights, attention written out: the (L, L) scores and their softmax are materialised."""

    attention_dropout = 0.0  # the original also dropped attention weights; --original sets 0.1

    def forward(
        self, x: Tensor, mask: Tensor | None = None, prefix: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B', heads, L, L)
        if mask is not None:  # additive form, as the original's triu(-inf) matrix
            scores = scores + torch.zeros(mask.shape, device=x.device).masked_fill(~mask, float("-inf"))
        weights = F.dropout(scores.softmax(dim=-1), self.attention_dropout, self.training)
        out = rearrange(weights @ v, "b h l d -> b l (h d)")
        return self.proj_dropout(self.proj(out)), (k, v)


class DroppingSelfAttention(SelfAttention):
    """SDPA with dropout on the attention weights, as model.py first had it: on a CPU that is no fused
    kernel but the explicit fallback, plus a Bernoulli draw per attention weight."""

    def forward(
        self, x: Tensor, mask: Tensor | None = None, prefix: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        dropout = 0.1 if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.proj_dropout(self.proj(out)), (k, v)


def with_attention(model: WorldModel, attention: type[SelfAttention], dropout: float = 0.0) -> WorldModel:
    """A copy of `model` (same weights) whose attention layers are computed by `attention`, with torch's own
    dropout (a Bernoulli draw per element) in place of the model's."""
    variant = copy.deepcopy(model)
    for module in variant.modules():
        if isinstance(module, SelfAttention):
            module.__class__ = attention
            module.attention_dropout = dropout
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, torch.nn.Dropout(child.p))
    return variant


def training_step(
    model: WorldModel, config: TrainConfig, device: torch.device, amp: torch.dtype | None
) -> Callable[[tuple[Tensor, Tensor]], float]:
    """A function that runs one `training.train_step` (make the batch's masks, forward, masked loss,
    backward, clipping, AdamW, schedule) on a batch (tokens, actions) and returns its wall-clock seconds."""
    model.train()
    optimizer = configure_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    learner = Learner(model, optimizer, scheduler)
    masks = torch.Generator(device=device).manual_seed(0)
    synchronize: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def step(batch: tuple[Tensor, Tensor]) -> float:
        tokens, actions = batch
        synchronize()
        started = time.perf_counter()
        train_step(model, learner, tokens, actions, "future", config, masks, amp)
        synchronize()
        return time.perf_counter() - started

    return step


def step_flops(model: WorldModel, config: TrainConfig, batch: tuple[Tensor, Tensor]) -> float:
    """Floating-point operations of one training step's forward and backward (matmuls and attention).

    Counted on the plain reference, whose attention is two explicit matmuls: torch's FlopCounterMode has no
    formula for the CPU's fused attention kernel and would count its share (half the model's arithmetic at
    32x32) as zero."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = with_attention(model, PlainSelfAttention)
    step = training_step(probe, config, batch[0].device, None)
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The best rate of a large square matmul in `dtype`: the roofline a training step is measured against."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = math.inf
    for _ in range(repeats + 1):
        started = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def matmul_peaks(device: torch.device, precisions: set[str], native_bf16: bool) -> dict[str, float]:
    """The peak matmul rate of each precision; bf16 without native support is emulated, so its roofline
    is the fp32 one."""
    peaks = {"fp32": peak_matmul_flops(device, torch.float32)}
    if "bf16" in precisions:
        peaks["bf16"] = peak_matmul_flops(device, torch.bfloat16) if native_bf16 else peaks["fp32"]
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 CPU, 5 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 CPU, 30 GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--full", action="store_true", help="the full model (D=384, L=6) instead of the fast")
    parser.add_argument("--patch", type=int, default=None, help="model.patch_size (default: the recipe's)")
    parser.add_argument("--dropout", type=float, default=None, help="model.dropout (default: the recipe's)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipe.yaml", help="the recipe's file")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="our path's precision (auto: bf16 where the CPU has it natively; fp32: as on a CPU without it)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our path")
    parser.add_argument(
        "--original",
        action="store_true",
        help="also attention-weight dropout 0.1 (the original's), SDPA and plain",
    )
    parser.add_argument("--no-reference", action="store_true", help="time our path only")
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc's malloc as it is (training keeps freed memory: core.devices.keep_freed_memory)",
    )
    args = parser.parse_args()
    if not args.return_freed_memory:
        keep_freed_memory()  # as training does; process-wide, so the reference runs with it too

    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    steps = args.steps if args.steps is not None else (30 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_changes = {"patch_size": args.patch, "dropout": args.dropout}
    model_config = recipe.model_config(
        PARAMS,
        args.full,
        args.recipe,
        **{name: value for name, value in model_changes.items() if value is not None},
    )
    tokens = recipe.section("tokens", PARAMS, args.recipe)
    frames = recipe.section("data", PARAMS, args.recipe).frames
    arch = Architecture.from_config(model_config, tokens.levels, tokens.frame_size, frames)
    batch = {"batch_size": args.batch} if args.batch else {}
    config = recipe.train_config(PARAMS, recipe=args.recipe, device=device.type, **batch)
    args.batch = config.batch_size  # the recipe's unless asked
    torch.manual_seed(0)
    model = build_model(arch).to(device)

    generator = torch.Generator(device=device).manual_seed(0)
    batches = []
    for _ in range(2):  # two different batches, so no step can reuse the previous one's work
        tokens = torch.randint(
            0,
            arch.levels,
            (args.batch, arch.frames, arch.frame_size, arch.frame_size),
            device=device,
            generator=generator,
        )
        actions = torch.randn(args.batch, arch.frames, 2, device=device, generator=generator) * 0.1
        batches.append((tokens, actions))

    ours_amp = autocast_dtype(args.precision, device)
    variants: list[tuple[str, torch.nn.Module, torch.dtype | None]] = [("ours", model, ours_amp)]
    if ours_amp is not None and device.type == "cpu":  # what a CPU without native bf16 would run
        variants.append(("ours in fp32", copy.deepcopy(model), None))
    if args.compile:
        variants.append(("ours + torch.compile", torch.compile(copy.deepcopy(model)), ours_amp))
    if not args.no_reference:
        variants.append(("plain reference", with_attention(model, PlainSelfAttention), None))
    if args.original:
        variants.append(
            ("SDPA + attention dropout 0.1", with_attention(model, DroppingSelfAttention), ours_amp)
        )
        variants.append(
            ("plain + attention dropout 0.1", with_attention(model, PlainSelfAttention, 0.1), None)
        )

    print(
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; model D={arch.embed_dim} "
        f"L={arch.layers} ({model.num_parameters():,} parameters), batch {args.batch}, future objective; "
        f"{warmup} warm-up + {steps} timed steps"
    )
    steppers = {name: training_step(variant, config, device, amp) for name, variant, amp in variants}
    precision = {name: "bf16" if amp else "fp32" for name, _, amp in variants}
    native_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    # The peaks before and after the steps, the higher kept: a neighbour's load during one measurement
    # would otherwise lower the roofline and flatter every variant.
    peaks_before = matmul_peaks(device, set(precision.values()), native_bf16)
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    # Round-robin, one step of each variant per round: on a shared machine, load that comes and goes
    # then slows every variant alike instead of whichever happened to run at the time.
    for round_index in range(warmup + steps):
        for name, step in steppers.items():
            elapsed = step(batches[round_index % len(batches)])
            if round_index >= warmup:
                seconds[name].append(elapsed)
            kind = "warm-up" if round_index < warmup else "timed"
            print(f"  {kind} step {round_index + 1}: {name}: {elapsed:.3f} s", flush=True)
    results = {name: statistics.median(values) for name, values in seconds.items()}

    flops = step_flops(model, config, batches[0])
    peaks_after = matmul_peaks(device, set(precision.values()), native_bf16)
    peaks = {name: max(peaks_before[name], peaks_after[name]) for name in peaks_before}
    shown = ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items())
    print(
        f"\none step: {flops / 1e9:.1f} GFLOP ({flops / args.batch / 1e9:.1f} per sequence); peak matmul "
        f"here: {shown} (bf16 {'native' if native_bf16 else 'not native: its peak is the fp32 one'})"
    )
    base = results["ours"]
    print(f"{'variant':32s} {'precision':>9s} {'s/step':>9s} {'seq/s':>8s} {'speedup':>9s} {'roofline':>9s}")
    for name, median in results.items():
        roofline = flops / median / peaks[precision[name]]
        print(
            f"{name:32s} {precision[name]:>9s} {median:9.3f} {args.batch / median:8.3f} "
            f"{median / base:8.2f}x {roofline:8.1%}"
        )
    if "ours in fp32" in results and "plain reference" in results:
        ratio = results["plain reference"] / results["ours in fp32"]
        print(f"without native bf16 (ours in fp32 against the fp32 plain reference): {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
