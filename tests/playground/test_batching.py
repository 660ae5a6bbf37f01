"""Sessions dreaming at once share their model calls: one call for every waiting session's rows, each session
getting its own logits (or extended context) back, or the call's error."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_architecture

from mnist_world.model.network import build_model
from mnist_world.model.sampling import Context
from mnist_world.playground.dreamer import CallBatcher, Dreamer

LEVELS, SIZE, FRAMES = 4, 8, 6
pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(torch.nn.Module):
    """The model, recording the rows of every call (and failing when asked to)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model(tiny_architecture(LEVELS, SIZE, FRAMES, dropout=0.0, patch_size=2)).eval()
        self.arch = self.model.arch
        self.rows: list[int] = []
        self.failing = False

    def forward(self, tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        self.rows.append(tokens.shape[0])
        if self.failing:
            raise RuntimeError("out of memory")
        return self.model(tokens, actions, temporal_mask, cache=cache, start_frame=start_frame)


def contexts(model: Recording) -> list[tuple[Context, torch.Tensor]]:
    """Three sessions' contexts (1, 2 and 4 frames; the second held twice for action guidance) and a
    half-decoded next frame of each."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, LEVELS, (3, FRAMES, SIZE, SIZE), generator=generator)
    actions = 0.1 * torch.randn(3, FRAMES, 2, generator=generator)
    made = []
    for session, (frames, twinned) in enumerate([(1, False), (2, True), (4, False)]):
        past, moves = tokens[session : session + 1, :frames], actions[session : session + 1]
        with torch.no_grad():
            context = Context.encode(model, past, moves, twinned=twinned)
        state = tokens[session : session + 1, frames : frames + 1].clone()
        state[..., ::2] = LEVELS  # hidden
        made.append((context, state))
    return made


def ask_together(
    batcher: CallBatcher, asks: list[tuple[Context, torch.Tensor]], append: bool = False
) -> list[object]:
    """Each (context, tokens) asked from its own thread, all of them dreaming before any asks: the logits
    (or, with `append`, the extended context), or the error, each got."""
    ready = threading.Barrier(len(asks))
    answers: list[object] = [None] * len(asks)

    def ask(index: int) -> None:
        with batcher.dreaming():
            ready.wait()
            try:
                answers[index] = (batcher.append if append else batcher.logits)(*asks[index])
            except RuntimeError as error:
                answers[index] = error

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_sessions_dreaming_at_once_share_one_model_call_and_get_their_own_logits():
    model = Recording()
    asks = contexts(model)
    with torch.no_grad():
        own = [context.logits(model, tokens) for context, tokens in asks]
    model.rows.clear()
    answers = ask_together(CallBatcher(model, gather_s=30.0), asks)
    assert model.rows == [1 + 2 + 1]  # one call, every session's rows
    for mine, theirs in zip(answers, own, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_decoded_frames_join_their_contexts_in_one_shared_call():
    model = Recording()
    asks = [(context, tokens.clamp(max=LEVELS - 1)) for context, tokens in contexts(model)]  # decoded
    with torch.no_grad():
        own = [context.append(model, tokens) for context, tokens in asks]
    model.rows.clear()
    answers = ask_together(CallBatcher(model, gather_s=30.0), asks, append=True)
    assert model.rows == [1 + 2 + 1]  # one call, every session's rows
    for mine, theirs in zip(answers, own, strict=True):
        assert isinstance(mine, Context) and torch.equal(mine.tokens, theirs.tokens)
        for (keys, values), (own_keys, own_values) in zip(mine.cache, theirs.cache, strict=True):
            torch.testing.assert_close(keys, own_keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values, own_values, rtol=1e-5, atol=1e-5)


def test_a_lone_session_makes_its_own_call():
    model = Recording()
    context, tokens = contexts(model)[1]
    with torch.no_grad():
        own = context.logits(model, tokens)
    batcher = CallBatcher(model, gather_s=30.0)  # nobody else dreams: no waiting
    with batcher.dreaming():
        assert torch.equal(batcher.logits(context, tokens), own)


def test_a_failing_shared_call_fails_every_session_in_it_and_the_next_call_works():
    model = Recording()
    asks = contexts(model)
    batcher = CallBatcher(model, gather_s=30.0)
    model.failing = True
    answers = ask_together(batcher, asks)
    assert all(isinstance(answer, RuntimeError) and str(answer) == "out of memory" for answer in answers)
    model.failing = False
    assert all(isinstance(answer, torch.Tensor) for answer in ask_together(batcher, asks))


def test_a_dreamer_refuses_a_batcher_of_another_model():
    model, other = Recording(), Recording()
    tokens = torch.zeros((2, SIZE, SIZE), dtype=torch.long)
    with pytest.raises(ValueError, match="another model"):
        Dreamer(model, tokens, torch.zeros(2, 2), keep=1, batcher=CallBatcher(other))
    Dreamer(model, tokens, torch.zeros(2, 2), keep=1, batcher=CallBatcher(model))  # its own: fine
