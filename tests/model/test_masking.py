"""Tests of the training objectives: which tokens each hides, which it scores, how its frames attend."""

from __future__ import annotations

import pytest
import torch
from conftest import from_params

from mnist_world.config import TrainConfig
from mnist_world.model.masking import (
    causal_mask,
    choose_objectives,
    full_mask,
    hide_actions,
    identity_mask,
    make_batch,
    mask_ratios,
    next_frame_mask,
)

LEVELS, FRAMES, PAST, SIZE = 16, 6, 2, 8


def tokens(batch: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, LEVELS, (batch, FRAMES, SIZE, SIZE), generator=generator)


def config(**overrides: object) -> TrainConfig:
    """params.yaml's train section with the recipe's uniform mask ratio, one for a sequence's whole future,
    and no noise, unless overridden."""
    recipe = {"mask_schedule": "uniform", "frame_ratios": 0.0, "noise_eta": 0.0}
    return from_params(TrainConfig, **{"past_frames": PAST, **recipe, **overrides})


def batch_for(objective: str, data: torch.Tensor, seed: int = 0, **overrides: object):
    return make_batch(objective, data, config(**overrides), LEVELS, torch.Generator().manual_seed(seed))


def test_temporal_masks() -> None:
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # With a cache of 2 frames, the 2 new frames are times 2 and 3.
    assert causal_mask(2, past=2).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert identity_mask(3).tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert full_mask(2, past=1).shape == (2, 3) and bool(full_mask(2, past=1).all())


def test_future_hides_only_future_tokens_under_a_causal_mask() -> None:
    data = tokens()
    batch = batch_for("future", data)
    hidden = batch.inputs == LEVELS
    assert torch.equal(hidden, batch.loss_mask)
    assert not hidden[:, :PAST].any()
    assert torch.equal(batch.inputs[~hidden], data[~hidden])
    assert torch.equal(batch.temporal_mask, causal_mask(FRAMES))
    # One ratio per sequence, in [0.5, 1]: every sequence hides about that share of its future tokens, and
    # with a narrow range, exactly that share up to binomial noise.
    share = hidden[:, PAST:].float().mean(dim=(1, 2, 3))
    assert share.min() > 0.4 and share.max() < 1.0  # 1.0 would mean the ratio was not applied
    assert share.std() > 0.05  # the ratio differs between sequences
    narrow = batch_for("future", data, mask_ratio=(0.7, 0.7)).loss_mask[:, PAST:].float().mean(dim=(1, 2, 3))
    assert (narrow - 0.7).abs().max() < 0.1


def test_frame_ratios_give_a_share_of_the_sequences_a_ratio_per_future_frame() -> None:
    data = tokens(batch=256)

    def spread(batch) -> torch.Tensor:  # (B,) how differently each sequence's future frames are hidden
        return batch.loss_mask[:, PAST:].float().mean(dim=(2, 3)).std(dim=1)

    shared = batch_for("future", data, mask_ratio=(0.05, 1.0))
    own = batch_for("future", data, mask_ratio=(0.05, 1.0), frame_ratios=1.0)
    half = batch_for("future", data, mask_ratio=(0.05, 1.0), frame_ratios=0.5)
    # 64 tokens a frame: one shared ratio leaves a binomial spread of about 0.05 between the frames; a ratio
    # per frame from U(0.05, 1) spreads them by about 0.27.
    assert spread(shared).mean() < 0.07 and spread(own).mean() > 0.2
    wide = [(spread(batch) > 0.15).float().mean().item() for batch in (shared, half, own)]
    assert wide[0] < 0.05 and wide[2] > 0.6
    assert abs(wide[1] - wide[2] / 2) < 0.12  # about half the sequences draw a ratio per frame
    assert not own.loss_mask[:, :PAST].any()  # the past stays given
    assert (own.loss_mask.sum(dim=(1, 2, 3)) >= 1).all()


def test_cut_past_gives_a_share_of_the_sequences_a_shorter_past_and_hides_the_frames_after_it() -> None:
    data = tokens(batch=1024)
    batch = batch_for("future", data, mask_ratio=(0.5, 1.0), cut_past=0.5, past_frames=4)
    hidden = batch.loss_mask.any(dim=(2, 3))  # (B, T): frames with a hidden token
    given = (~hidden).int().argmin(dim=1)  # each sequence's first frame with one: its given past ends there
    assert torch.equal(hidden, torch.arange(FRAMES) >= given[:, None])  # the given past is whole, then hidden
    counts = torch.bincount(given, minlength=5).tolist()
    assert counts[0] == 0 and 450 < counts[4] < 574  # half keep their 4 frames
    assert all(130 < count < 215 for count in counts[1:4])  # the other half are given 1, 2 or 3, evenly
    # None cut: every sequence is given its whole past; a one-frame past has nothing to cut.
    assert not batch_for("future", data).loss_mask[:, :PAST].any()
    assert not batch_for("future", data, cut_past=1.0, past_frames=1).loss_mask[:, :1].any()


def test_next_hides_each_future_frame_on_its_own_after_the_clean_frames_before_it() -> None:
    # Frames 0..4 are read clean; hidden frame 2 sees clean 0-1, hidden 3 sees clean 0-2, and so on.
    assert next_frame_mask(5, past=2).tolist() == [
        [True, True, False, False, True, False, False],
        [True, True, True, False, False, True, False],
        [True, True, True, True, False, False, True],
    ]
    data = tokens()
    batch = batch_for("next", data, noise_eta=0.2)
    assert (batch.first, batch.context) == (PAST, FRAMES - 1)
    assert batch.inputs.shape == data[:, PAST:].shape
    assert torch.equal(batch.temporal_mask, next_frame_mask(FRAMES, PAST))
    hidden = batch.inputs == LEVELS
    assert torch.equal(batch.inputs[~batch.loss_mask], data[:, PAST:][~batch.loss_mask])
    assert (batch.loss_mask & ~hidden).any()  # noised tokens join the loss
    share = hidden.float().mean(dim=(2, 3))  # one ratio per sequence and frame
    assert bool(hidden.any(dim=(2, 3)).all()) and share.std(dim=1).mean() > 0.05


def test_joint_hides_every_frame_with_bidirectional_attention() -> None:
    batch = batch_for("joint", tokens())
    hidden = batch.inputs == LEVELS
    assert torch.equal(hidden, batch.loss_mask)
    assert hidden[:, :PAST].float().mean() > 0.4  # the past is hidden too
    assert bool(batch.temporal_mask.all()) and batch.temporal_mask.shape == (FRAMES, FRAMES)
    # One ratio per sequence: the frames of a sequence hide similar shares (binomial spread only).
    assert hidden.float().mean(dim=(2, 3)).std(dim=1).mean() < 0.1


def test_individual_masks_each_frame_on_its_own() -> None:
    batch = batch_for("individual", tokens(batch=64), mask_ratio=(0.05, 1.0))
    hidden = batch.inputs == LEVELS
    assert torch.equal(batch.temporal_mask, identity_mask(FRAMES))
    per_frame = hidden.float().mean(dim=(2, 3))  # (B, T)
    # A ratio per sequence AND frame: within one sequence the frames hide very different shares.
    assert per_frame.std(dim=1).mean() > 0.15
    assert (hidden.sum(dim=(2, 3)) >= 1).all()


def test_every_region_hides_at_least_one_token() -> None:
    # A ratio of ~0 hides nothing by chance; the smallest draw of each region is hidden regardless.
    for objective, dims in (("future", (1, 2, 3)), ("joint", (1, 2, 3)), ("individual", (2, 3))):
        batch = batch_for(objective, tokens(), mask_ratio=(1e-9, 1e-9))
        assert (batch.loss_mask.sum(dim=dims) == 1).all(), objective
    batch = batch_for("future", tokens(batch=256), mask_schedule="cosine")
    assert (batch.loss_mask.sum(dim=(1, 2, 3)) >= 1).all()


def test_cosine_schedule_spans_zero_to_one() -> None:
    ratios = mask_ratios((10000,), config(mask_schedule="cosine"), torch.Generator().manual_seed(0))
    assert 0 <= ratios.min() < 0.05 and 0.95 < ratios.max() <= 1
    # cos(u pi / 2) with u uniform has mean 2 / pi.
    assert abs(ratios.mean().item() - 2 / torch.pi) < 0.02
    uniform = mask_ratios((10000,), config(), torch.Generator().manual_seed(0))
    assert uniform.min() >= 0.5 and uniform.max() <= 1.0
    assert abs(uniform.mean().item() - 0.75) < 0.01 and uniform.std().item() > 0.13  # U(0.5, 1): sd 0.144


def test_noise_replaces_visible_tokens_and_joins_the_loss() -> None:
    data = tokens(batch=64)
    batch = batch_for("future", data, noise_eta=0.5)
    hidden = batch.inputs == LEVELS
    noised = batch.loss_mask & ~hidden
    assert noised.any()
    assert not noised[:, :PAST].any()  # the given past stays clean
    assert (batch.inputs[noised] < LEVELS).all()
    assert torch.equal(batch.inputs[~batch.loss_mask], data[~batch.loss_mask])  # unscored tokens untouched
    visible = ~hidden[:, PAST:]
    share = noised[:, PAST:].sum() / visible.sum()
    assert 0.05 < share < 0.5  # "up to eta": about eta / 2 of the visible future tokens on average


def test_batches_are_reproducible_from_the_generator() -> None:
    data = tokens()
    first, second = batch_for("joint", data, seed=3), batch_for("joint", data, seed=3)
    assert torch.equal(first.inputs, second.inputs)
    assert not torch.equal(first.inputs, batch_for("joint", data, seed=4).inputs)


def test_unknown_objective_and_bad_past_frames_fail() -> None:
    with pytest.raises(ValueError, match="unknown objective"):
        batch_for("sideways", tokens())
    with pytest.raises(ValueError, match="past_frames"):
        make_batch(
            "future", tokens(), from_params(TrainConfig, past_frames=FRAMES), LEVELS, torch.Generator()
        )


def test_objectives_are_drawn_by_weight() -> None:
    mixture = from_params(TrainConfig, objectives={"future": 0.5, "joint": 0.4, "individual": 0.1})
    picks = choose_objectives(mixture, 20000, torch.Generator().manual_seed(0))
    shares = {name: picks.count(name) / len(picks) for name in ("future", "joint", "individual")}
    assert shares == pytest.approx({"future": 0.5, "joint": 0.4, "individual": 0.1}, abs=0.02)
    assert picks == choose_objectives(mixture, 20000, torch.Generator().manual_seed(0))
    only_future = from_params(TrainConfig, objectives={"future": 1.0, "joint": 0.0})
    assert set(choose_objectives(only_future, 100, torch.Generator())) == {"future"}


def test_hide_actions_hides_whole_sequences_at_the_share_asked():
    actions = torch.randn(4000, 6, 2)
    generator = torch.Generator().manual_seed(0)
    hidden = hide_actions(actions, 0.25, generator)
    unknown = hidden.isnan()
    per_sequence = unknown.flatten(1)
    assert bool((per_sequence.all(dim=1) | ~per_sequence.any(dim=1)).all())  # all of a sequence or none
    assert 0.23 < per_sequence.all(dim=1).float().mean().item() < 0.27
    assert torch.equal(hidden[~unknown], actions[~unknown])
    assert torch.equal(hide_actions(actions, 0.25, torch.Generator().manual_seed(0)).isnan(), unknown)


def test_hide_actions_at_zero_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    actions = torch.randn(3, 6, 2)
    assert hide_actions(actions, 0.0, generator) is actions
    assert torch.equal(generator.get_state(), state)  # the masks drawn after it are as before
