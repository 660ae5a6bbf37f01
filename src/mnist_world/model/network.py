"""The spatio-temporal transformer: token frames and actions in, logits over token levels out.

It knows nothing about masking schedules or objectives: callers pass masked token ids and a temporal
attention mask. A frame cache lets a caller encode frames once (under a causal mask) and decode later frames
against them, which is what the sampler does with the past frames. With `patch_size` p > 1 each p x p block
of tokens is one transformer position (as ViT/DiT patchify images); callers still see one logit vector per
token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mnist_world.config import ModelConfig
from mnist_world.config.checks import Integer, require, section


@section("model")
class Architecture(ModelConfig):
    """Everything needed to rebuild the network: the model params (ModelConfig's fields, checked by its
    rules) plus the token store's geometry. Checkpoints store it as a plain dict."""

    levels: Integer
    frame_size: Integer
    frames: Integer
    action_dim: Integer = 2  # (dx, dy) per frame

    @pydantic.model_validator(mode="after")
    def _check_patches(self) -> Architecture:
        require(
            self.frame_size % self.patch_size == 0,
            f"model.patch_size={self.patch_size} does not divide the {self.frame_size}x{self.frame_size} "
            f"token frames",
        )
        return self

    @classmethod
    def from_config(cls, model: ModelConfig, levels: int, frame_size: int, frames: int) -> Architecture:
        return cls(**dataclasses.asdict(model), levels=levels, frame_size=frame_size, frames=frames)

    @property
    def mask_id(self) -> int:
        return self.levels

    @property
    def vocab_size(self) -> int:
        return self.levels + 1  # the levels plus the mask token

    @property
    def positions_per_frame(self) -> int:
        """Transformer positions per frame: one per p x p block of tokens."""
        return (self.frame_size // self.patch_size) ** 2


# One layer's keys and values of the temporal attention, each (B*N, heads, frames, head_dim); a cache holds
# them for the frames encoded so far, one pair per layer.
KeysValues = tuple[Tensor, Tensor]
FrameCache = list[KeysValues]


def cache_frames(cache: FrameCache | None) -> int:
    """How many frames a cache holds (0 for none)."""
    return 0 if not cache else cache[0][0].shape[2]


def extend_cache(cache: FrameCache | None, new: FrameCache) -> FrameCache:
    """`cache` followed by the keys/values of later frames (`WorldModel.forward`'s second result)."""
    if not cache:
        return new
    return [
        (torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2))
        for (keys, values), (new_keys, new_values) in zip(cache, new, strict=True)
    ]


class Dropout(nn.Module):
    """nn.Dropout with the keep mask drawn four elements per 64-bit random word (16 bits each), the drop
    probability rounded to 1/65536. On a CPU, where bernoulli_ draws a full random number per element,
    this is 4x faster (dropout was 15% of the default training step); elsewhere it is F.dropout."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        dropped = round(p * 65536)  # of the 65,536 values of a 16-bit draw
        self.threshold = dropped - 32768  # int16 draws below it are dropped
        self.scale = 65536 / (65536 - dropped)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        words = torch.empty(x.numel() // 4 + 1, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), 2**63 - 1)  # every bit uniform (the default range leaves the top bit 0)
        draws = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform in [-32768, 32767]
        return torch.where(draws >= self.threshold, x, 0.0) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


# Up to this many keys, attention is written out: on a CPU the fused kernel's cost per (sequence, head)
# outweighs the small score matrices. Measured forward and backward in bf16: a temporal layer (4,096 x 4
# heads of 20 frames) 5x faster, the default model's spatial layer (64 positions) 2x; fp32 no slower.
SHORT_KEYS = 64
# Training in bf16 on a CPU writes out longer attention too, up to this many scores per layer (2 GiB of
# bf16 weights kept for the backward pass); beyond it the fused kernel, whose memory does not grow with L^2.
WRITTEN_OUT_SCORES = 2**30


def written_out(q: Tensor, keys: int) -> bool:
    """Whether attention of `q` over that many keys is computed by `short_attention` rather than the fused
    kernel: up to SHORT_KEYS keys, and when training in bf16 on a CPU. There the fused kernel at head_dim 32
    runs no faster than in fp32 (~25% of the bf16 matmul peak), while written out its matmuls run at bf16
    speed: the recipe's spatial layer (1,024 positions, batch 4) trains 1.7x faster, keeping 0.7 GB of
    attention weights for the backward pass. Inference keeps the fused kernel."""
    if keys <= SHORT_KEYS:
        return True
    scores = q.shape[:-1].numel() * keys
    training_bf16_cpu = q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
    return training_bf16_cpu and scores <= WRITTEN_OUT_SCORES


def short_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, prefix: KeysValues | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the (L, keys) scores materialised; the softmax accumulates
    in fp32 whatever the inputs' precision (torch's CPU and CUDA kernels do so for bf16), its weights are
    rounded to v's dtype for the product with v, as the fused kernels do. `attn_mask` as
    scaled_dot_product_attention's: bool (True: may attend) or an additive float bias. `prefix`: keys and
    values (B', heads, P, d) before `k` and `v` (a cache), read where they are rather than copied beside
    them: a cached frame's unmasking iterations would otherwise copy the whole cache at every layer."""
    q = q * q.shape[-1] ** -0.5
    scores = q @ k.transpose(-2, -1)  # (B', heads, L, keys)
    if prefix is not None:
        scores = torch.cat([q @ prefix[0].transpose(-2, -1), scores], dim=-1)  # (B', heads, L, P + keys)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = scores.softmax(dim=-1).to(v.dtype)
    if prefix is None:
        return weights @ v
    past = prefix[1].shape[-2]
    return weights[..., :past] @ prefix[1] + weights[..., past:] @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis, with an optional key/value prefix."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, prefix: KeysValues | None = None
    ) -> tuple[Tensor, KeysValues]:
        # x: (B', L, D); mask: (L, prefix + L) bool, True where attention is allowed (or one for each row,
        # (B', 1, L, prefix + L)), or a float bias added to the scores, (heads, L, L).
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        # No dropout on the attention weights (only on the output projection): with dropout_p > 0 the CPU
        # falls back from the fused kernel to the explicit (frames, 1024, 1024) softmax, 3x slower per step.
        if written_out(q, k.shape[-2] + (0 if prefix is None else prefix[0].shape[-2])):
            out = short_attention(q, k, v, attn_mask=mask, prefix=prefix)
        elif prefix is not None:
            keys, values = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.proj_dropout(self.proj(out)), (k, v)  # keys/values of these positions


class RelativePositionBias(nn.Module):
    """A learned bias per head for every (dy, dx) offset between two positions of a frame (Swin's relative
    position bias), started at -slope * distance (ALiBi's prior, in 2-D; head 0 unbiased): spatial attention
    starts out looking near, which absolute position embeddings would have to learn first."""

    def __init__(self, side: int, heads: int) -> None:
        super().__init__()
        span = torch.arange(-(side - 1), side, dtype=torch.float32)
        distance = torch.sqrt(span[:, None] ** 2 + span[None, :] ** 2).flatten()  # ((2S-1)^2,) by (dy, dx)
        slopes = torch.tensor([0.0] + [2.0 ** -(heads - 1 - h) for h in range(1, heads)])  # 0, ..., 1/2, 1
        self.table = nn.Parameter(-slopes[:, None] * distance[None, :])  # (heads, (2S-1)^2)
        rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        dy = rows.flatten()[:, None] - rows.flatten()[None, :] + side - 1  # (N, N) offsets, shifted to >= 0
        dx = columns.flatten()[:, None] - columns.flatten()[None, :] + side - 1
        self.register_buffer("offset", dy * (2 * side - 1) + dx, persistent=False)

    def forward(self) -> Tensor:
        return self.table[:, self.offset]  # (heads, N, N), added to the attention scores


class MLP(nn.Module):
    """Linear, GELU, linear. With `side`, each frame's hidden layer, a side x side grid of positions, also
    passes through a depthwise 3x3 convolution added to it (PVTv2's and LocalViT's ConvFFN): the same local
    mixing at every place of the frame, so a motion learned at one place holds at all. The convolution
    starts at zero, so the block starts as the plain MLP."""

    def __init__(self, dim: int, ratio: float, dropout: float, side: int | None = None) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), Dropout(dropout))
        self.side = side
        if side is not None:
            self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.side is None:
            return self.net(x)
        expand, activation, project, dropout = self.net
        hidden = expand(x)  # (B, T, N, Dh), N = side * side
        grid = rearrange(hidden, "b t (y x) c -> (b t) c y x", y=self.side)
        mixed = rearrange(self.conv(grid), "(b t) c y x -> b t (y x) c", b=x.shape[0])
        return dropout(project(activation(hidden + mixed)))


class Block(nn.Module):
    """Pre-norm residual block: the subclass's attention (`attend`, which also returns the temporal keys and
    values), then an MLP."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.mlp_norm = nn.LayerNorm(arch.embed_dim)
        side = arch.frame_size // arch.patch_size if arch.mlp_conv else None
        self.mlp = MLP(arch.embed_dim, arch.mlp_ratio, arch.dropout, side)

    def forward(
        self, x: Tensor, temporal_mask: Tensor | None, prefix: KeysValues | None
    ) -> tuple[Tensor, KeysValues]:
        x, keys_values = self.attend(x, temporal_mask, prefix)  # x: (B, T, N, D)
        return x + self.mlp(self.mlp_norm(x)), keys_values


class SpatioTemporalBlock(Block):
    """Attention within each frame, then across frames at each position, then the MLP."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__(arch)
        dim = arch.embed_dim
        self.spatial_norm = nn.LayerNorm(dim)
        self.spatial = SelfAttention(dim, arch.heads, arch.dropout)
        side = arch.frame_size // arch.patch_size
        self.spatial_bias = RelativePositionBias(side, arch.heads) if arch.spatial_bias else None
        self.temporal_norm = nn.LayerNorm(dim)
        self.temporal = SelfAttention(dim, arch.heads, arch.dropout)

    def attend(
        self, x: Tensor, temporal_mask: Tensor | None, prefix: KeysValues | None
    ) -> tuple[Tensor, KeysValues]:
        batch, _, positions, _ = x.shape  # x: (B, T, N, D)
        spatial_in = rearrange(self.spatial_norm(x), "b t n d -> (b t) n d")
        bias = None if self.spatial_bias is None else self.spatial_bias()
        spatial_out, _ = self.spatial(spatial_in, bias)
        x = x + rearrange(spatial_out, "(b t) n d -> b t n d", b=batch)

        temporal_in = rearrange(self.temporal_norm(x), "b t n d -> (b n) t d")
        if temporal_mask is not None and temporal_mask.dim() == 3:  # (B, T, P + T), a mask for each sequence
            temporal_mask = temporal_mask.repeat_interleave(positions, dim=0)[:, None]  # (B N, 1, T, P + T)
        temporal_out, keys_values = self.temporal(temporal_in, temporal_mask, prefix)
        return x + rearrange(temporal_out, "(b n) t d -> b t n d", b=batch), keys_values


class JointBlock(Block):
    """One attention over every position of every frame (under the temporal mask, frame by frame), then the
    MLP: a position reaches a neighbour's past in one hop, where the factorised block needs two (across
    time, then across space). Its cache has the factorised block's layout."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__(arch)
        self.attention_norm = nn.LayerNorm(arch.embed_dim)
        self.attention = SelfAttention(arch.embed_dim, arch.heads, arch.dropout)

    def attend(
        self, x: Tensor, temporal_mask: Tensor | None, prefix: KeysValues | None
    ) -> tuple[Tensor, KeysValues]:
        batch, frames, positions, _ = x.shape  # (B, T, N, D)
        mask = None
        if temporal_mask is not None:  # ([B,] T, P + T) frames -> ([B, 1,] T N, (P + T) N) positions
            mask = temporal_mask.repeat_interleave(positions, -2).repeat_interleave(positions, -1)
            if mask.dim() == 3:
                mask = mask[:, None]  # one mask for each sequence, broadcast over the heads
        if prefix is not None:
            prefix = tuple(rearrange(p, "(b n) h f d -> b h (f n) d", b=batch) for p in prefix)
        attention_in = rearrange(self.attention_norm(x), "b t n d -> b (t n) d")
        attention_out, (keys, values) = self.attention(attention_in, mask, prefix)
        x = x + rearrange(attention_out, "b (t n) d -> b t n d", t=frames)
        cache = tuple(rearrange(p, "b h (f n) d -> (b n) h f d", n=positions) for p in (keys, values))
        return x, cache


class WorldModel(nn.Module):
    """Masked-token video transformer conditioned on per-frame ego actions."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        dim, cells = arch.embed_dim, arch.patch_size**2
        # One embedding per (cell of the patch, token id): a patch's embedding is the sum over its cells,
        # a linear map of the one-hot patch like ViT's patch projection. At p = 1 it is the plain embedding.
        # EmbeddingBag sums without materialising the p * p embeddings of every position.
        self.token_embedding = nn.EmbeddingBag(cells * arch.vocab_size, dim, mode="sum")
        self.register_buffer("cell_offset", torch.arange(cells) * arch.vocab_size, persistent=False)
        if arch.action_conditioning == "input":
            self.action_projection = nn.Linear(arch.action_dim, dim)
        else:
            self.action_embedding = nn.Sequential(
                nn.Linear(arch.action_dim, dim), nn.GELU(), nn.Linear(dim, dim)
            )
            self.action_to_block = nn.ModuleList(nn.Linear(dim, dim) for _ in range(arch.layers))
            # A frame whose action is unknown (NaN: hidden in training, left out by action guidance) gets
            # this embedding instead of its action's. (The recipe's input conditioning adds nothing then.)
            self.unknown_action = nn.Parameter(torch.zeros(dim))
        self.spatial_position = nn.Parameter(torch.zeros(arch.positions_per_frame, dim))
        self.temporal_position = nn.Parameter(torch.zeros(arch.frames, dim))
        self.embedding_dropout = Dropout(arch.dropout)
        block = {"factorised": SpatioTemporalBlock, "joint": JointBlock}[arch.attention]
        self.blocks = nn.ModuleList(block(arch) for _ in range(arch.layers))
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cells * arch.levels)  # the mask token is never a prediction
        self.apply(self._init_weights)
        nn.init.normal_(self.spatial_position, std=0.02)
        nn.init.normal_(self.temporal_position, std=0.02)
        for projection in getattr(self, "action_to_block", []):  # each layer starts from the input's action
            nn.init.zeros_(projection.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        tokens: Tensor,
        actions: Tensor,
        temporal_mask: Tensor | None = None,
        cache: FrameCache | None = None,
        start_frame: int | Tensor | None = None,
    ) -> tuple[Tensor, FrameCache]:
        """Logits for every token of `tokens`, and these frames' keys/values (what a cache keeps of them).

        tokens: (B, T, H, W) ids in [0, levels] (levels = mask); actions: (B, T, 2), NaN where unknown.
        temporal_mask: (T, P + T) bool, True where frame i may attend to frame j, P = frames in `cache`, or
        (B, T, P + T), one for each sequence (caches of different lengths padded to P); None attends
        everywhere. `start_frame` places the frames in time (default: right after the cache), or (B,) one
        start for each sequence. Returns logits (B, T, H, W, levels) and the per-layer keys/values of these
        frames (`extend_cache` appends them to `cache`).
        """
        batch, frames, height, width = tokens.shape
        past = cache_frames(cache)
        start = past if start_frame is None else start_frame
        last = int(start.max()) if isinstance(start, Tensor) else start
        if last + frames > self.arch.frames:
            raise ValueError(f"frames {last}..{last + frames - 1} exceed the model's {self.arch.frames}")

        p = self.arch.patch_size
        cells = rearrange(tokens, "b t (h p1) (w p2) -> b t (h w) (p1 p2)", p1=p, p2=p)
        bags = rearrange(cells + self.cell_offset, "b t n c -> (b t n) c")
        x = rearrange(self.token_embedding(bags), "(b t n) d -> b t n d", b=batch, t=frames)  # N: positions
        x = x + self.spatial_position  # (N, D) broadcast over batch and time
        if isinstance(start, Tensor):
            times = start[:, None] + torch.arange(frames, device=start.device)  # (B, T)
            x = x + self.temporal_position[times][:, :, None, :]  # (B, T, 1, D)
        else:
            x = x + self.temporal_position[start : start + frames, None, :]  # (T, 1, D)
        command = self.embed_actions(actions)  # (B, T, 1, D)
        x = self.embedding_dropout(x + command)

        new_cache: FrameCache = []
        for index, block in enumerate(self.blocks):
            if self.arch.action_conditioning == "blocks":
                x = x + self.action_to_block[index](command)
            prefix = cache[index] if cache else None
            x, keys_values = block(x, temporal_mask, prefix)
            new_cache.append(keys_values)

        logits = self.head(self.final_norm(x))  # (B, T, N, p * p * levels)
        logits = rearrange(logits, "b t (h w) (p1 p2 v) -> b t (h p1) (w p2) v", h=height // p, p1=p, p2=p)
        return logits, new_cache

    def embed_actions(self, actions: Tensor) -> Tensor:
        """Actions (B, T, 2) as one embedding per frame (B, T, 1, D), broadcast over its positions; a frame
        whose action has a NaN gets the learned unknown action."""
        known = ~actions.isnan().any(dim=-1, keepdim=True)  # (B, T, 1)
        actions = actions.nan_to_num(0.0)
        if self.arch.action_conditioning == "input":
            return torch.where(known, self.action_projection(actions), 0.0)[:, :, None, :]
        # Actions are steps over half the frame (|a| ~ 0.07 at 16x16): in token pixels they are of order 1,
        # the scale an MLP reads without first growing its weights tenfold.
        embedded = self.action_embedding(actions * (self.arch.frame_size / 2))  # (B, T, D)
        return torch.where(known, embedded, self.unknown_action)[:, :, None, :]  # (B, T, 1, D)


def build_model(arch: Architecture | dict[str, Any]) -> WorldModel:
    """A fresh model from an architecture (or its dict form, as stored in checkpoints)."""
    if isinstance(arch, dict):
        arch = Architecture(**arch)
    return WorldModel(arch)
