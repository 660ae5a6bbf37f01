"""Tests of the spatio-temporal transformer: shapes, size, causality and cached decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnist_world.config import ModelConfig
from mnist_world.masking import causal_mask, identity_mask
from mnist_world.model import Architecture, build_model, cache_frames

TINY = Architecture(levels=16, frame_size=8, frames=20, layers=1, embed_dim=16, heads=2, dropout=0.1)


def inputs(arch: Architecture, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = (batch, arch.frames, arch.frame_size, arch.frame_size)
    tokens = torch.randint(0, arch.vocab_size, size, generator=generator)  # mask ids included
    return tokens, torch.randn(batch, arch.frames, 2, generator=generator)


def test_logits_cover_every_token_with_the_levels_only() -> None:
    model = build_model(TINY).eval()
    tokens, actions = inputs(TINY)
    logits, cache = model(tokens, actions, causal_mask(TINY.frames))
    assert logits.shape == (2, TINY.frames, 8, 8, TINY.levels)  # the mask token is never predicted
    assert len(cache) == TINY.layers and cache_frames(cache) == TINY.frames
    assert cache[0][0].shape == (2 * 8 * 8, TINY.heads, TINY.frames, TINY.embed_dim // TINY.heads)


@pytest.mark.parametrize(
    ("model_config", "expected"),
    [(ModelConfig(), 667_664), (ModelConfig(layers=6, embed_dim=384), 14_600_000)],
)
def test_parameter_counts_match_the_recipe(model_config: ModelConfig, expected: int) -> None:
    arch = Architecture.from_config(model_config, levels=16, frame_size=32, frames=20)
    assert build_model(arch).num_parameters() == pytest.approx(expected, rel=0.02)


def test_the_architecture_rebuilds_the_same_model() -> None:
    model = build_model(TINY)
    rebuilt = build_model(dataclasses.asdict(TINY))
    rebuilt.load_state_dict(model.state_dict())
    tokens, actions = inputs(TINY)
    assert torch.equal(model.eval()(tokens, actions)[0], rebuilt.eval()(tokens, actions)[0])


def test_causal_mask_hides_the_future() -> None:
    model = build_model(TINY).eval()
    tokens, actions = inputs(TINY)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % TINY.levels
    before = model(tokens, actions, causal_mask(TINY.frames))[0]
    after = model(changed, actions, causal_mask(TINY.frames))[0]
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_identity_mask_sees_one_frame() -> None:
    model = build_model(TINY).eval()
    tokens, actions = inputs(TINY)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % TINY.levels
    before = model(tokens, actions, identity_mask(TINY.frames))[0]
    after = model(changed, actions, identity_mask(TINY.frames))[0]
    untouched = [t for t in range(TINY.frames) if t != 5]
    torch.testing.assert_close(before[:, untouched], after[:, untouched])


def test_cached_decoding_equals_uncached() -> None:
    """Frames 10..19 decoded against a cache of frames 0..9 give the logits of one causal pass over 0..19."""
    model = build_model(TINY).eval()
    tokens, actions = inputs(TINY)
    full, _ = model(tokens, actions, causal_mask(20))
    _, cache = model(tokens[:, :10], actions[:, :10], causal_mask(10))
    future, extended = model(tokens[:, 10:], actions[:, 10:], causal_mask(10, past=10), cache=cache)
    torch.testing.assert_close(future, full[:, 10:], rtol=1e-5, atol=1e-5)
    assert cache_frames(extended) == 20


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
