"""Tests of the spatio-temporal transformer: shapes, size, causality and cached decoding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import from_params, tiny_architecture

from mnist_world.config import ModelConfig
from mnist_world.model.checkpoint import load_model, save_checkpoint
from mnist_world.model.masking import causal_mask, identity_mask
from mnist_world.model.network import (
    WRITTEN_OUT_SCORES,
    Architecture,
    Dropout,
    build_model,
    cache_frames,
    extend_cache,
    short_attention,
    written_out,
)

TINY = tiny_architecture(levels=16, frame_size=8, frames=20)
PATCHES = [
    TINY,
    *(dataclasses.replace(TINY, patch_size=p) for p in (2, 4)),
    dataclasses.replace(TINY, patch_size=2, spatial_bias=True),
    dataclasses.replace(TINY, patch_size=2, attention="joint"),
    dataclasses.replace(TINY, action_conditioning="input"),
    dataclasses.replace(TINY, patch_size=2, mlp_conv=False),
]
PATCH_IDS = ["p1", "p2", "p4", "p2-bias", "p2-joint", "p1-input", "p2-plain-mlp"]


def inputs(arch: Architecture, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = (batch, arch.frames, arch.frame_size, arch.frame_size)
    tokens = torch.randint(0, arch.vocab_size, size, generator=generator)  # mask ids included
    return tokens, torch.randn(batch, arch.frames, 2, generator=generator)


@pytest.mark.parametrize("arch", PATCHES, ids=PATCH_IDS)
def test_logits_cover_every_token_with_the_levels_only(arch: Architecture) -> None:
    model = build_model(arch).eval()
    tokens, actions = inputs(arch)
    logits, cache = model(tokens, actions, causal_mask(arch.frames))
    assert logits.shape == (2, arch.frames, 8, 8, arch.levels)  # the mask token is never predicted
    assert len(cache) == arch.layers and cache_frames(cache) == arch.frames
    positions = (8 // arch.patch_size) ** 2  # one transformer position per p x p block of tokens
    assert cache[0][0].shape == (2 * positions, arch.heads, arch.frames, arch.embed_dim // arch.heads)


INPUT = {"action_conditioning": "input", "mlp_conv": False}  # the recipe's


@pytest.mark.parametrize(
    ("model_config", "expected"),
    [
        (from_params(ModelConfig, patch_size=1, **INPUT), 667_664),  # the recipe's fast model
        (from_params(ModelConfig, patch_size=1, layers=6, embed_dim=384, **INPUT), 14_615_056),  # its full
        (from_params(ModelConfig, patch_size=2, **INPUT), 582_080),
        (from_params(ModelConfig, patch_size=4, **INPUT), 608_384),
        # Actions through an MLP (2 -> 128 -> 128) and a 128 x 128 map per layer instead of one 2 -> 128 map,
        # and the unknown action's embedding: + (2 * 128 + 128) + (128 * 128 + 128) + 2 * (128 * 128 + 128)
        # - (2 * 128 + 128) + 128 = + 49,664.
        (from_params(ModelConfig, patch_size=2, action_conditioning="blocks", mlp_conv=False), 631_744),
        # A depthwise 3x3 convolution on each layer's 512 hidden channels: + 2 * (512 * 9 + 512) = + 10,240.
        (from_params(ModelConfig, patch_size=2, action_conditioning="blocks", mlp_conv=True), 641_984),
    ],
)
def test_parameter_counts_are_exact(model_config: ModelConfig, expected: int) -> None:
    """Exact: a lost position embedding (2,560 of the fast model's parameters) must not pass."""
    arch = Architecture.from_config(model_config, levels=16, frame_size=32, frames=20)
    assert build_model(arch).num_parameters() == expected


def test_a_patch_holds_its_tokens_in_place() -> None:
    """At p = 2 a token changed at (row 5, column 2) moves the embedding of position (2, 1) alone, and the
    logits come back in the tokens' own layout (the four cells of a patch differ)."""
    arch = dataclasses.replace(TINY, patch_size=2, dropout=0.0)
    model = build_model(arch).eval()
    tokens, actions = inputs(arch)
    changed = tokens.clone()
    changed[:, :, 5, 2] = (changed[:, :, 5, 2] + 1) % arch.levels
    captured = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model(tokens, actions)
    model(changed, actions)
    hook.remove()
    moved = (captured[0] - captured[1]).abs().sum(dim=(0, 1, 3))  # (positions,) embedding change
    assert moved.nonzero().flatten().tolist() == [2 * 4 + 1]
    logits = model(tokens, actions)[0]
    assert not torch.allclose(logits[:, :, 0, 0], logits[:, :, 0, 1])


def test_the_spatial_bias_starts_near_and_is_learned_per_offset() -> None:
    """4x4 positions, 2 heads: head 0 unbiased, head 1 at -distance; a parameter per head and offset."""
    arch = dataclasses.replace(TINY, patch_size=2, spatial_bias=True)
    model = build_model(arch)
    assert model.num_parameters() == build_model(
        dataclasses.replace(arch, spatial_bias=False)
    ).num_parameters() + (arch.layers * arch.heads * 7 * 7)
    bias = model.blocks[0].spatial_bias()  # (heads, 16, 16)
    assert bias.shape == (2, 16, 16) and not bias[0].any()
    assert bias[1, 0, 1].item() == -1.0 and bias[1, 0, 5].item() == pytest.approx(-(2**0.5))
    assert bias[1, 5, 0].item() == bias[1, 15, 10].item()  # the same offset, the same parameter


@pytest.mark.parametrize("patch_size", [1, 2])
def test_the_mlp_convolution_starts_as_the_plain_mlp_and_mixes_neighbours_only(patch_size: int) -> None:
    """Started at zero, `model.mlp_conv` changes nothing; once learned, a change at one position of one
    frame reaches, through the MLP, that position's 3x3 neighbourhood in that frame and nothing else."""
    arch = dataclasses.replace(TINY, patch_size=patch_size, mlp_conv=True)
    model = build_model(arch).eval()
    plain = build_model(dataclasses.replace(arch, mlp_conv=False)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)  # all but the convolution
    tokens, actions = inputs(arch)
    torch.testing.assert_close(model(tokens, actions)[0], plain(tokens, actions)[0], rtol=0, atol=0)

    mlp, side = model.blocks[0].mlp, arch.frame_size // patch_size
    with torch.no_grad():
        mlp.conv.weight.normal_()
    x = torch.randn(2, 3, side * side, arch.embed_dim)  # (B, T, N, D)
    changed = x.clone()
    changed[1, 2, 2 * side + 1] += 1.0  # frame 2 of sequence 1, position (row 2, column 1)
    with torch.no_grad():
        moved = (mlp(changed) - mlp(x)).abs().sum(dim=-1)  # (B, T, N)
    reached = {(b, t, n // side, n % side) for b, t, n in moved.nonzero().tolist()}
    assert reached == {(1, 2, row, column) for row in (1, 2, 3) for column in (0, 1, 2)}


def test_a_patch_size_that_does_not_divide_the_frame_fails() -> None:
    with pytest.raises(ValueError, match="model.patch_size=3 does not divide the 8x8"):
        dataclasses.replace(TINY, patch_size=3)


def test_the_architecture_rebuilds_the_same_model() -> None:
    model = build_model(TINY)
    rebuilt = build_model(dataclasses.asdict(TINY))
    rebuilt.load_state_dict(model.state_dict())
    tokens, actions = inputs(TINY)
    assert torch.equal(model.eval()(tokens, actions)[0], rebuilt.eval()(tokens, actions)[0])


@pytest.mark.parametrize("arch", PATCHES, ids=PATCH_IDS)
def test_causal_mask_hides_the_future(arch: Architecture) -> None:
    model = build_model(arch).eval()
    tokens, actions = inputs(arch)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % arch.levels
    before = model(tokens, actions, causal_mask(arch.frames))[0]
    after = model(changed, actions, causal_mask(arch.frames))[0]
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("conditioning", ["input", "blocks"])
def test_an_action_steers_its_own_frame_and_later_ones(conditioning: str) -> None:
    """Under the causal mask, frame 12's action changes the logits of frame 12 and after, never before; with
    `blocks`, through every layer's own projection as well as the input's."""
    arch = dataclasses.replace(TINY, layers=2, action_conditioning=conditioning)
    model = build_model(arch).eval()
    tokens, actions = inputs(arch)
    turned = actions.clone()
    turned[:, 12] = -turned[:, 12]
    before = model(tokens, actions, causal_mask(arch.frames))[0]
    after = model(tokens, turned, causal_mask(arch.frames))[0]
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12], after[:, 12])
    if conditioning == "blocks":  # each layer's projection starts at zero and, once learned, adds its own say
        with torch.no_grad():
            model.action_to_block[1].weight.normal_()
        assert not torch.allclose(before[:, 12], model(tokens, turned, causal_mask(arch.frames))[0][:, 12])


def test_a_checkpoint_from_before_action_conditioning_loads_as_input(tmp_path: Path) -> None:
    """Checkpoints written before `model.action_conditioning` and `model.mlp_conv` existed embedded actions
    at the input and had the plain MLP."""
    arch = dataclasses.replace(TINY, action_conditioning="input", mlp_conv=False)
    model = build_model(arch).eval()
    stored = dataclasses.asdict(arch)
    del stored["action_conditioning"], stored["mlp_conv"]
    save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "architecture": stored, "epoch": 1})
    loaded, _ = load_model(tmp_path / "old.pt")
    tokens, actions = inputs(arch)
    assert (loaded.arch.action_conditioning, loaded.arch.mlp_conv) == ("input", False)
    assert torch.equal(loaded(tokens, actions)[0], model(tokens, actions)[0])


@pytest.mark.parametrize("conditioning", ["input", "blocks"])
def test_an_unknown_action_gets_the_unknown_embedding(conditioning: str) -> None:
    """A NaN action is unknown: `blocks` gives its frame the learned unknown embedding (not a zero step's),
    the recipe's `input` adds nothing; the other frames keep their actions' embeddings."""
    arch = dataclasses.replace(TINY, action_conditioning=conditioning)
    model = build_model(arch).eval()
    _, actions = inputs(arch)
    hidden = actions.clone()
    hidden[:, 7] = float("nan")
    with torch.no_grad():
        if conditioning == "blocks":
            model.unknown_action.normal_()
        known, unknown = model.embed_actions(actions), model.embed_actions(hidden)
        zero_step = model.embed_actions(torch.zeros_like(actions))
    expected = model.unknown_action if conditioning == "blocks" else torch.zeros(arch.embed_dim)
    assert torch.equal(unknown[:, 7, 0], expected.expand(len(actions), -1))
    if conditioning == "blocks":  # the recipe's projection of a zero step is its bias, zero at initialisation
        assert not torch.allclose(unknown[:, 7], zero_step[:, 7])
    others = [frame for frame in range(arch.frames) if frame != 7]
    assert torch.equal(unknown[:, others], known[:, others])
    assert not torch.isnan(model(inputs(arch)[0], hidden)[0]).any()


def test_a_checkpoint_from_before_the_unknown_action_loads_with_a_zero_one(tmp_path: Path) -> None:
    model = build_model(TINY).eval()
    weights = model.state_dict()
    del weights["unknown_action"]
    save_checkpoint(tmp_path / "old.pt", {"model": weights, "architecture": dataclasses.asdict(TINY)})
    loaded, _ = load_model(tmp_path / "old.pt")
    tokens, actions = inputs(TINY)
    assert torch.equal(loaded.unknown_action, torch.zeros(TINY.embed_dim))
    assert torch.equal(loaded(tokens, actions)[0], model(tokens, actions)[0])


def test_identity_mask_sees_one_frame() -> None:
    model = build_model(TINY).eval()
    tokens, actions = inputs(TINY)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % TINY.levels
    before = model(tokens, actions, identity_mask(TINY.frames))[0]
    after = model(changed, actions, identity_mask(TINY.frames))[0]
    untouched = [t for t in range(TINY.frames) if t != 5]
    torch.testing.assert_close(before[:, untouched], after[:, untouched])


@pytest.mark.parametrize("arch", PATCHES, ids=PATCH_IDS)
def test_cached_decoding_equals_uncached(arch: Architecture) -> None:
    """Frames 10..19 decoded against a cache of frames 0..9 give the logits of one causal pass over 0..19, and
    their keys/values, appended to the cache, those of the pass."""
    model = build_model(arch).eval()
    tokens, actions = inputs(arch)
    full, whole = model(tokens, actions, causal_mask(20))
    _, cache = model(tokens[:, :10], actions[:, :10], causal_mask(10))
    future, new = model(tokens[:, 10:], actions[:, 10:], causal_mask(10, past=10), cache=cache)
    torch.testing.assert_close(future, full[:, 10:], rtol=1e-5, atol=1e-5)
    assert cache_frames(new) == 10
    for (keys, values), (all_keys, all_values) in zip(extend_cache(cache, new), whole, strict=True):
        torch.testing.assert_close(keys, all_keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, all_values, rtol=1e-5, atol=1e-5)


def test_frames_beyond_the_model_fail() -> None:
    model = build_model(TINY).eval()
    tokens, actions = inputs(TINY)
    with pytest.raises(ValueError, match="exceed"):
        model(tokens[:, :5], actions[:, :5], start_frame=18)


def test_dropout_only_in_training() -> None:
    model = build_model(TINY)
    tokens, actions = inputs(TINY)
    model.train()
    assert not torch.equal(model(tokens, actions)[0], model(tokens, actions)[0])
    model.eval()
    assert torch.equal(model(tokens, actions)[0], model(tokens, actions)[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_its_share_and_keeps_the_mean(p: float) -> None:
    dropout = Dropout(p).train()
    x = torch.ones(1_000, 1_001, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.003  # 1M draws: the standard error is under 0.0005
    assert abs(y.mean().item() - 1.0) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)), rtol=1e-4)
    y.sum().backward()  # the gradient flows through the kept elements only, scaled alike
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the global generator decides, as for torch's dropout


def test_dropout_masks_differ_between_calls_and_elements() -> None:
    """Four elements share each 64-bit random word: neighbours must still be dropped independently."""
    dropout = Dropout(0.5).train()
    kept = dropout(torch.ones(400_000)) != 0
    pairs = kept.view(-1, 4)  # the four 16-bit draws of one word
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert abs(both - 0.25) < 0.005
    assert not torch.equal(kept, dropout(torch.ones(400_000)) != 0)
    assert torch.equal(Dropout(0.5).eval()(torch.ones(8)), torch.ones(8))


def test_training_in_bf16_on_a_cpu_writes_long_attention_out() -> None:
    """Past SHORT_KEYS keys attention is written out only for training (q wants a gradient) in bf16 on a
    CPU with at most WRITTEN_OUT_SCORES scores; there it computes what fp32 attention does, forward and
    backward, within bf16's rounding."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 32, generator=generator) for _ in range(3))
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    assert written_out(leaves[0], 256)
    assert not written_out(leaves[0].detach(), 256)  # inference
    assert not written_out(q.requires_grad_(), 256)  # fp32
    huge = torch.zeros(1, 1, 1, 32, dtype=torch.bfloat16, requires_grad=True).expand(4096, 4, 1024, 32)
    assert huge.shape[:-1].numel() * 1024 > WRITTEN_OUT_SCORES and not written_out(huge, 1024)

    out = short_attention(*leaves)
    out.float().square().sum().backward()
    reference = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*reference)
    expected.square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.02, rtol=0.02)
    for mine, theirs in zip(leaves, reference, strict=True):
        scale = theirs.grad.abs().max()
        assert (mine.grad.float() - theirs.grad).abs().max() < 0.03 * scale


@pytest.mark.parametrize("keys", [5, 12])
def test_short_attention_equals_the_fused_kernel(keys: int) -> None:
    """The written-out attention of short axes computes what scaled_dot_product_attention does, with a
    boolean mask (a cache prefix: keys beyond the queries), an additive bias, or none."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=generator)
    k, v = (torch.randn(3, 2, keys, 8, generator=generator) for _ in range(2))
    for mask in (
        causal_mask(5, past=keys - 5),
        torch.randn(2, 5, keys, generator=generator),
        None,
    ):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(short_attention(q, k, v, attn_mask=mask), expected, atol=1e-5)
