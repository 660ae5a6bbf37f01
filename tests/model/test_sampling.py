"""The iterative-unmasking sampler on a tiny random model: schedule, re-masking, caching, guidance, modes."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import from_params, tiny_architecture

from mnist_world.config import SampleConfig
from mnist_world.model.masking import causal_mask, padded_causal_mask
from mnist_world.model.network import build_model, cache_frames
from mnist_world.model.sampling import (
    Context,
    ContextBatch,
    generate,
    guide,
    masked_count,
    new_generator,
    point_prediction,
    predict_future,
    unmask,
    warn_if_actions_never_hidden,
    warn_if_unguided,
)

LEVELS, SIZE, FRAMES, PAST = 4, 8, 6, 3
MASK = LEVELS


@pytest.fixture(
    scope="module", params=[(1, "factorised"), (2, "factorised"), (2, "joint")], ids=["p1", "p2", "p2-joint"]
)
def model(request):
    """Every sampler test runs with one token per position, with 2 x 2 patches, and with joint attention."""
    patch_size, attention = request.param
    torch.manual_seed(0)
    arch = tiny_architecture(LEVELS, SIZE, FRAMES, dropout=0.0, patch_size=patch_size, attention=attention)
    return build_model(arch).eval()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, LEVELS, (3, FRAMES, SIZE, SIZE), generator=generator)
    actions = 0.1 * torch.randn(3, FRAMES, 2, generator=generator)
    return tokens, actions


def run(model, batch, config, seed=0, cached=True, record=None):
    tokens, actions = batch
    on_step = (
        None if record is None else (lambda frame, step, state: record.append((frame, step, state.clone())))
    )
    return predict_future(
        model,
        tokens[:, :PAST],
        actions,
        config,
        mask_id=MASK,
        generator=new_generator(seed, "cpu"),
        cached=cached,
        on_step=on_step,
    )


def expected_counts(total: int, steps: int) -> list[int]:
    return [math.ceil(math.cos(k / steps * math.pi / 2) * total) for k in range(1, steps)] + [0]


@pytest.mark.parametrize(("total", "steps"), [(192, 20), (64, 20), (5, 20), (1000, 7), (1, 1)])
def test_masked_count_follows_the_cosine_schedule(total, steps):
    assert [masked_count(k, steps, total) for k in range(1, steps + 1)] == expected_counts(total, steps)


@pytest.mark.parametrize("steps", [20, 6])
def test_joint_mode_masks_exactly_the_schedule_over_all_future_tokens(model, batch, steps):
    history = []
    run(model, batch, from_params(SampleConfig, steps=steps, mode="joint"), record=history)
    total = (FRAMES - PAST) * SIZE * SIZE  # every future token, not one frame's
    assert [step for _, step, _ in history] == list(range(1, steps + 1))
    for (_, step, state), count in zip(history, expected_counts(total, steps), strict=True):
        assert state.shape == (3, FRAMES - PAST, SIZE, SIZE)
        assert (state == MASK).flatten(1).sum(dim=1).tolist() == [count] * 3, step


def test_joint_mode_never_remasks_a_kept_token(model, batch):
    history = []
    run(model, batch, from_params(SampleConfig, steps=10, mode="joint"), record=history)
    states = [state for _, _, state in history]
    for before, after in zip(states, states[1:], strict=False):
        kept = before != MASK
        assert torch.equal(after[kept], before[kept])


@pytest.mark.parametrize(
    ("choice_temperature", "low", "high"), [(0.0, 1.0, 1.0), (1.0, 0.8, 0.999), (100.0, 0.45, 0.55)]
)
def test_the_choice_temperature_decides_how_much_confidence_orders_the_kept_tokens(
    choice_temperature, low, high
):
    # Half the positions are certain (one level far above the rest), half uniform over the levels. The
    # first of 2 iterations keeps 29% of the tokens: by confidence alone all of them certain ones; with
    # a large choice temperature the Gumbel noise drowns the confidences and the order is random.
    certain = torch.arange(4096).reshape(1, 1, 64, 64) % 2 == 0  # (1, 1, H, W)
    logits = torch.where(certain[..., None], 20.0 * torch.eye(LEVELS)[0], torch.zeros(LEVELS))
    history = []
    unmask(
        lambda tokens: logits, torch.full((1, 1, 64, 64), MASK), MASK, steps=2, temperature=1.0,
        generator=new_generator(0, "cpu"), on_step=lambda step, state: history.append(state.clone()),
        choice_temperature=choice_temperature,
    )  # fmt: skip
    kept = history[0] != MASK
    assert int(kept.sum()) == 4096 - masked_count(1, 2, 4096)
    assert low <= float(certain[kept].float().mean()) <= high  # the share of certain tokens among the kept


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_output_has_no_mask_token_and_the_future_shape(model, batch, mode, temperature):
    future = run(model, batch, from_params(SampleConfig, steps=4, mode=mode, temperature=temperature))
    assert future.shape == (3, FRAMES - PAST, SIZE, SIZE)
    assert int(future.min()) >= 0 and int(future.max()) < LEVELS


def test_same_seed_same_samples_other_seed_other_samples(model, batch):
    config = from_params(SampleConfig, steps=5)
    assert torch.equal(run(model, batch, config, seed=3), run(model, batch, config, seed=3))
    assert not torch.equal(run(model, batch, config, seed=3), run(model, batch, config, seed=4))


def test_cached_and_uncached_contexts_give_the_same_logits(model, batch):
    tokens, actions = batch
    future = tokens[:, PAST:].clone()
    future[:, :, ::2] = MASK  # a half-decoded state
    cached = Context.encode(model, tokens[:, :PAST], actions, cached=True)
    uncached = Context.encode(model, tokens[:, :PAST], actions, cached=False)
    with torch.no_grad():
        reference, _ = model(torch.cat([tokens[:, :PAST], future], 1), actions, causal_mask(FRAMES))
        torch.testing.assert_close(cached.logits(model, future), reference[:, PAST:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(uncached.logits(model, future), reference[:, PAST:], rtol=1e-5, atol=1e-5)
        # Appending a frame to the cache equals encoding it with the past.
        grown = cached.append(model, tokens[:, PAST : PAST + 1])
        torch.testing.assert_close(
            grown.logits(model, future[:, 1:]),
            uncached.append(model, tokens[:, PAST : PAST + 1]).logits(model, future[:, 1:]),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("frames", [1, 2])
def test_a_context_batch_gives_each_context_its_own_logits_and_appends(model, batch, frames):
    """Contexts of different lengths, twinned or not, decoded in one call: each gets the logits (and, once
    decoded, the extended context) of its own call, however long the others' caches (padding) and whichever
    rows come before it."""
    tokens, actions = batch
    state = tokens.clone()
    state[:, :, ::2] = MASK
    contexts = [
        Context.encode(model, tokens[:1, :1], actions[:1], twinned=True),
        Context.encode(model, tokens[1:, :PAST], actions[1:]),
        Context.encode(model, tokens[:1, :2], actions[2:], twinned=True),
    ]
    news = [state[:1, 1 : 1 + frames], state[1:, PAST : PAST + frames], state[:1, 2 : 2 + frames]]
    with torch.no_grad():
        joined = ContextBatch.join(contexts)
        assert joined.counts == (2, 2, 2) and joined.lengths.tolist() == [1, 1, 3, 3, 2, 2]
        for context, new, logits in zip(contexts, news, joined.logits(model, news), strict=True):
            torch.testing.assert_close(logits, context.logits(model, new), rtol=1e-5, atol=1e-5)
        # Appended together, each context holds what its own append gives: its frames and their keys/values.
        decoded = [new.clamp(max=MASK - 1) for new in news]
        for context, new, appended in zip(contexts, decoded, joined.append(model, decoded), strict=True):
            alone = context.append(model, new)
            assert torch.equal(appended.tokens, alone.tokens) and appended.frames == alone.frames
            for (keys, values), (own_keys, own_values) in zip(appended.cache, alone.cache, strict=True):
                torch.testing.assert_close(keys, own_keys, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(values, own_values, rtol=1e-5, atol=1e-5)


def test_padded_causal_mask_hides_the_padding():
    mask = padded_causal_mask(torch.tensor([1, 3]), padded=3, frames=2)
    assert mask.tolist() == [
        [[True, False, False, True, False], [True, False, False, True, True]],
        [[True, True, True, True, False], [True, True, True, True, True]],
    ]
    assert torch.equal(padded_causal_mask(torch.tensor([3]), 3, 2)[0], causal_mask(2, past=3))


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
def test_cached_and_uncached_decoders_give_the_same_samples(model, batch, mode):
    config = from_params(SampleConfig, steps=6, mode=mode)
    assert torch.equal(run(model, batch, config, cached=True), run(model, batch, config, cached=False))


def test_autoregressive_mode_decodes_one_frame_at_a_time(model, batch):
    history = []
    steps = 5
    future = run(model, batch, from_params(SampleConfig, steps=steps, mode="autoregressive"), record=history)
    frames = [frame for frame, _, _ in history]
    assert frames == [f for f in range(FRAMES - PAST) for _ in range(steps)]
    for frame, step, state in history:
        assert state.shape == (3, 1, SIZE, SIZE)
        count = expected_counts(SIZE * SIZE, steps)[step - 1]  # one frame's tokens at a time
        assert (state == MASK).flatten(1).sum(dim=1).tolist() == [count] * 3
        if step == steps:
            assert torch.equal(state[:, 0], future[:, frame])


def test_autoregressive_frames_attend_to_the_past_and_every_frame_decoded_before_them(model, batch):
    calls = []

    def recording(tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        calls.append((tokens.shape[1], cache_frames(cache), tuple(temporal_mask.shape)))
        return model(tokens, actions, temporal_mask, cache=cache, start_frame=start_frame)

    steps = 3
    run(recording, batch, from_params(SampleConfig, steps=steps, mode="autoregressive"))
    expected = [(PAST, 0, (PAST, PAST))]  # the past, encoded once
    for frame in range(FRAMES - PAST):
        context = PAST + frame
        expected += [(1, context, (1, context + 1))] * steps  # K passes over the frame alone
        expected += [(1, context, (1, context + 1))]  # then the decoded frame joins the cache
    assert calls == expected


class CountingModel:
    """Wraps the model and records how it was called."""

    def __init__(self, model, forbid_unconditional=False):
        self.model, self.forbid, self.unconditional = model, forbid_unconditional, []

    def __call__(self, tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        square = temporal_mask is not None and temporal_mask.shape[0] == temporal_mask.shape[1]
        if (
            square
            and tokens.shape[1] > 1
            and torch.equal(temporal_mask, torch.eye(tokens.shape[1], dtype=torch.bool))
        ):
            if self.forbid:
                raise AssertionError("guidance 0 must not run the unconditional model")
            self.unconditional.append((tokens.shape[1], cache, start_frame))
        return self.model(tokens, actions, temporal_mask, cache=cache, start_frame=start_frame)


def test_guidance_zero_is_plain_sampling(model, batch):
    plain = run(
        CountingModel(model, forbid_unconditional=True),
        batch,
        from_params(SampleConfig, steps=5, guidance=0.0),
    )
    assert torch.equal(plain, run(model, batch, from_params(SampleConfig, steps=5)))
    conditional = torch.randn(2, 3)
    assert torch.equal(guide(conditional, torch.randn(2, 3), 0.0), conditional)


def test_guidance_uses_the_frames_alone_with_the_identity_mask(model, batch):
    counting = CountingModel(model)
    # Kept by confidence at temperature 0.5, the sample follows the logits closely enough to show guidance.
    sampler = {"steps": 5, "mode": "joint", "temperature": 0.5, "choice_temperature": 1.0}
    guided = run(counting, batch, from_params(SampleConfig, **sampler, guidance=2.0))
    assert counting.unconditional == [(FRAMES - PAST, None, PAST)] * 5  # no cache, placed after the past
    assert not torch.equal(guided, run(model, batch, from_params(SampleConfig, **sampler)))
    torch.testing.assert_close(guide(torch.tensor([1.0]), torch.tensor([0.25]), 2.0), torch.tensor([2.5]))


class RecordingModel:
    """Wraps the model and records the rows and actions of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        self.calls.append((tokens.clone(), actions.clone()))
        return self.model(tokens, actions, temporal_mask, cache=cache, start_frame=start_frame)


def test_action_guidance_zero_runs_each_sequence_once_with_its_actions(model, batch):
    recording = RecordingModel(model)
    run(recording, batch, from_params(SampleConfig, steps=4, action_guidance=0.0))
    assert all(len(tokens) == 3 and not actions.isnan().any() for tokens, actions in recording.calls)


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
def test_action_guidance_contrasts_each_sequence_with_itself_without_actions(model, batch, mode):
    """Every call holds each sequence twice, the second time with every action unknown; the sample is the one
    drawn from guide(logits with the actions, logits without, weight), computed here without any cache."""
    tokens, actions = batch
    model = copy.deepcopy(model)
    with torch.no_grad():  # an unknown action far from any known one: guidance then shows in the samples
        model.unknown_action.normal_(std=3.0)
    config = from_params(SampleConfig, steps=4, mode=mode, action_guidance=1.5)
    recording = RecordingModel(model)
    guided = run(recording, batch, config)
    for rows, row_actions in recording.calls:
        assert torch.equal(rows[:3], rows[3:])
        assert not row_actions[:3].isnan().any() and row_actions[3:].isnan().all()

    unknown = torch.full_like(actions, float("nan"))
    generator = new_generator(0, "cpu")
    decoded = tokens[:, :PAST]
    for first, count in [(0, FRAMES - PAST)] if mode == "joint" else [(f, 1) for f in range(FRAMES - PAST)]:
        end = PAST + first + count

        def logits_of(future, decoded=decoded, end=end):
            whole = torch.cat([decoded, future], dim=1)
            with_actions = model(whole, actions[:, :end], causal_mask(end))[0][:, -future.shape[1] :]
            without = model(whole, unknown[:, :end], causal_mask(end))[0][:, -future.shape[1] :]
            return guide(with_actions, without, 1.5)

        blank = torch.full((3, count, SIZE, SIZE), MASK)
        with torch.no_grad():
            frames = unmask(
                logits_of, blank, MASK, 4, config.temperature, generator,
                choice_temperature=config.choice_temperature,
            )  # fmt: skip
        decoded = torch.cat([decoded, frames], dim=1)
    assert torch.equal(guided, decoded[:, PAST:])
    unguided = from_params(SampleConfig, steps=4, mode=mode, action_guidance=0.0)
    assert not torch.equal(guided, run(model, batch, unguided))


def test_action_guidance_warns_for_a_model_never_shown_an_unknown_action():
    with pytest.warns(UserWarning, match="action_dropout"):
        assert warn_if_actions_never_hidden(2.0, 0.0)
    with pytest.warns(UserWarning, match="action_dropout"):
        assert warn_if_actions_never_hidden(2.0, None)  # a checkpoint from before it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_actions_never_hidden(2.0, 0.1) is None
        assert warn_if_actions_never_hidden(0.0, 0.0) is None


def test_guidance_warns_without_the_individual_objective():
    with pytest.warns(UserWarning, match="individual"):
        assert warn_if_unguided(1.5, {"future": 1.0, "individual": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_unguided(1.5, {"future": 0.5, "joint": 0.4, "individual": 0.1}) is None
        assert warn_if_unguided(0.0, {"future": 1.0}) is None


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
def test_unconditional_generation_decodes_every_frame(model, batch, mode):
    _, actions = batch
    history = []
    frames = generate(
        model,
        actions,
        from_params(SampleConfig, steps=4, mode=mode),
        frame_size=SIZE,
        mask_id=MASK,
        generator=new_generator(0, "cpu"),
        on_step=lambda frame, step, state: history.append(state.shape[1]),
    )
    assert frames.shape == (3, FRAMES, SIZE, SIZE)
    assert int(frames.max()) < LEVELS
    assert history[0] == (FRAMES if mode == "joint" else 1)


def oracle(truth):
    """A model that knows the true frames (B, T, H, W): confident logits of the true token everywhere, with
    or without the actions (the twins of action guidance get the same)."""

    def model(tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        start = cache_frames(cache) if start_frame is None else start_frame
        frames = tokens.shape[1]
        rows = truth.repeat(tokens.shape[0] // truth.shape[0], 1, 1, 1)  # (R, T, H, W)
        logits = 8.0 * torch.nn.functional.one_hot(rows[:, start : start + frames], LEVELS).float()
        keys = torch.zeros(1, 1, frames, 1)  # stand-in keys/values of these frames, only counting them
        return logits, [(keys, keys)]

    return model


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
@pytest.mark.parametrize("cached", [True, False])
def test_a_model_that_knows_the_future_gets_it_back_exactly(batch, mode, cached):
    tokens, _ = batch
    config = from_params(SampleConfig, steps=5, mode=mode, temperature=0.0, guidance=1.0)
    future = run(oracle(tokens), batch, config, cached=cached)
    assert torch.equal(future, tokens[:, PAST:])


# --- The point prediction --------------------------------------------------------------------------------


def test_a_certain_model_predicts_the_decoded_truth(batch):
    """A model that puts all its probability on the true tokens: its point prediction is the floor."""
    tokens, actions = batch

    def oracle(inputs, actions, temporal_mask, cache=None, start_frame=None):
        return 100.0 * torch.nn.functional.one_hot(tokens, LEVELS).float(), []

    intensities = torch.tensor([0.0, 0.2, 0.7, 1.0])
    point = point_prediction(oracle, tokens[:, :PAST], actions, intensities, MASK)
    torch.testing.assert_close(point, intensities[tokens[:, PAST:]])


def test_the_point_prediction_is_the_mean_of_the_future_distribution(model, batch):
    tokens, actions = batch
    intensities = torch.tensor([0.0, 0.2, 0.7, 1.0])
    point = point_prediction(model, tokens[:, :PAST], actions, intensities, MASK)
    hidden = tokens.clone()
    hidden[:, PAST:] = MASK  # every future token hidden, the past given
    logits, _ = model(hidden, actions, causal_mask(FRAMES))
    probabilities = torch.softmax(logits[:, PAST:], dim=-1)  # (B, F, H, W, levels)
    expected = (probabilities * intensities).sum(dim=-1)
    torch.testing.assert_close(point, expected)
    assert point.shape == (3, FRAMES - PAST, SIZE, SIZE)
