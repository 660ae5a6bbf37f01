"""Sessions dreaming at once share their model calls: their frames are dreamed on a worker thread, one call
per unmasking iteration for every session's rows, each session sampling its own frame, and getting it (or
the error of a call it shared) back."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from conftest import tiny_architecture

from mnist_world.model.network import build_model
from mnist_world.model.sampling import new_generator
from mnist_world.playground import dreamer
from mnist_world.playground.dreamer import CallBatcher, Dreamer, SamplerSettings

LEVELS, SIZE, FRAMES, STEPS = 4, 8, 6, 3
pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(torch.nn.Module):
    """The model, recording the rows and frames of every call (and failing when asked to)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model(tiny_architecture(LEVELS, SIZE, FRAMES, dropout=0.0, patch_size=2)).eval()
        self.arch = self.model.arch
        self.calls: list[tuple[int, int]] = []  # (rows, frames)
        self.failing = False

    def forward(self, tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        self.calls.append(tuple(tokens.shape[:2]))
        if self.failing:
            raise RuntimeError("out of memory")
        return self.model(tokens, actions, temporal_mask, cache=cache, start_frame=start_frame)


# Three sessions: 1, 2 and 4 given frames; the second with action guidance (its rows held twice).
SESSIONS = [(1, 0.0), (2, 1.0), (4, 0.0)]


def sampler(action_guidance: float = 0.0) -> SamplerSettings:
    """Confidence-ordered unmasking at temperature 1 in STEPS iterations."""
    return SamplerSettings(
        steps=STEPS, temperature=1.0, guidance=0.0, choice_temperature=1.0, action_guidance=action_guidance
    )


def sessions(model: Recording, batcher: CallBatcher | None) -> list[tuple[Dreamer, SamplerSettings]]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, LEVELS, (len(SESSIONS), FRAMES, SIZE, SIZE), generator=generator)
    actions = 0.1 * torch.randn(len(SESSIONS), FRAMES, 2, generator=generator)
    made = []
    for index, (frames, action_guidance) in enumerate(SESSIONS):
        given = Dreamer(model, tokens[index, :frames], actions[index, :frames], keep=1, batcher=batcher)
        made.append((given, sampler(action_guidance)))
    return made


def dream_together(made: list[tuple[Dreamer, SamplerSettings]], frames: int = 1) -> list[list[object]]:
    """Each session dreams `frames` frames on its own thread, all starting together: the frames (or the
    error) each got."""
    ready = threading.Barrier(len(made))
    answers: list[list[object]] = [[] for _ in made]

    def dream(index: int) -> None:
        session, settings = made[index]
        generator = new_generator(index, "cpu")
        ready.wait()
        for _ in range(frames):
            try:
                answers[index].append(session.next_frame(torch.tensor([0.1, 0.0]), settings, generator))
            except RuntimeError as error:
                answers[index].append(error)

    threads = [threading.Thread(target=dream, args=(index,)) for index in range(len(made))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return answers


def test_sessions_dreaming_at_once_share_one_call_per_iteration_and_sample_their_own_frames():
    model = Recording()
    alone = dream_together(sessions(model, None), frames=1)  # each session's own calls
    made = sessions(model, CallBatcher(model, gather_s=30.0))
    model.calls.clear()
    answers = dream_together(made, frames=1)
    rows = 1 + 2 + 1
    shared = [call for call in model.calls if call == (rows, 1)]
    assert len(shared) == STEPS + 1  # every iteration's logits, then the decoded frames joining the contexts
    assert [call for call in model.calls if call != (rows, 1)] == [(2, 2)]  # the twin's context, encoded
    for mine, own in zip(answers, alone, strict=True):
        assert torch.equal(mine[0], own[0])  # fixed seeds: no token at a near-tie here


def test_a_round_waits_for_every_session_stepping_so_pages_out_of_step_dream_together_again(monkeypatch):
    """A round of one (the second page alone), then the first page asks and the second 0.2 s after it: the
    round waits for the second, which stepped a moment ago, and the two share their calls again (a round
    waiting only for as many frames as the last one had would start the first page alone)."""
    monkeypatch.setattr(dreamer, "STEPPING_S", 1.0)
    model = Recording()
    made = sessions(model, CallBatcher(model, gather_s=30.0))
    (first, first_settings), (second, second_settings) = made[:2]
    time.sleep(1.1)  # the sessions were seated longer ago than STEPPING_S: none is stepping
    second.next_frame(torch.zeros(2), second_settings, new_generator(1, "cpu"))  # alone, at once
    model.calls.clear()
    late: list[torch.Tensor] = []
    asking = threading.Timer(
        0.2, lambda: late.append(second.next_frame(torch.zeros(2), second_settings, new_generator(2, "cpu")))
    )
    asking.start()
    frame = first.next_frame(torch.zeros(2), first_settings, new_generator(3, "cpu"))
    asking.join(timeout=60)
    assert frame.shape == late[0].shape == (SIZE, SIZE)
    assert model.calls == [(1 + 2, 1)] * (STEPS + 1)  # every iteration, then the append: one call each


def test_a_session_that_stopped_stepping_is_not_waited_for(monkeypatch):
    monkeypatch.setattr(dreamer, "STEPPING_S", 0.1)
    model = Recording()
    made = sessions(model, CallBatcher(model, gather_s=30.0))
    first, first_settings = made[0]
    time.sleep(0.2)  # every session was seated longer ago than STEPPING_S and none has asked since
    started = time.monotonic()
    first.next_frame(torch.zeros(2), first_settings, new_generator(3, "cpu"))
    assert time.monotonic() - started < 10  # not the 30 s of gather_s


def test_a_lone_session_dreams_exactly_what_it_dreams_without_a_batcher():
    model = Recording()
    own, settings = sessions(model, None)[1]
    batched, _ = sessions(model, CallBatcher(model))[1]
    frames = FRAMES + 2  # the context slides on the way
    generator, alone_generator = new_generator(5, "cpu"), new_generator(5, "cpu")
    alone = [own.next_frame(torch.tensor([0.0, 0.1]), settings, alone_generator) for _ in range(frames)]
    own_context = own.context
    dreamed = [batched.next_frame(torch.tensor([0.0, 0.1]), settings, generator) for _ in range(frames)]
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(dreamed, alone, strict=True))
    assert batched.context.frames == own_context.frames


def test_a_failing_shared_call_fails_every_session_in_it_and_leaves_their_contexts():
    model = Recording()
    made = sessions(model, CallBatcher(model, gather_s=30.0))
    dream_together(made)  # each context twinned as its settings ask: the next frames make no other call
    contexts = [session.context for session, _ in made]
    model.failing = True
    answers = dream_together(made)
    assert all(isinstance(answer, RuntimeError) and str(answer) == "out of memory" for [answer] in answers)
    assert all(session.context is context for (session, _), context in zip(made, contexts, strict=True))
    model.failing = False
    assert all(isinstance(answer, torch.Tensor) for [answer] in dream_together(made))


def test_a_slow_watcher_holds_up_no_other_sessions_frame():
    model = Recording()
    batcher = CallBatcher(model)
    (slow, settings), (other, _) = sessions(model, batcher)[:2]
    gate, watching = threading.Event(), threading.Event()
    seen: list[int] = []

    def watch(step: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        seen.append(step)
        watching.set()
        assert gate.wait(timeout=30)

    answer: list[object] = []
    thread = threading.Thread(
        target=lambda: answer.append(
            slow.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"), watch)
        )
    )
    thread.start()
    try:
        assert watching.wait(timeout=30)  # the slow session's watcher holds its first iteration
        frame = other.next_frame(torch.zeros(2), sampler(), new_generator(1, "cpu"))
        assert frame.shape == (SIZE, SIZE) and thread.is_alive() and not answer
    finally:
        gate.set()
    thread.join(timeout=30)
    assert seen == list(range(1, STEPS + 1)) and answer[0].shape == (SIZE, SIZE)


def test_a_failing_watcher_fails_its_frame_alone_and_leaves_its_context():
    model = Recording()
    batcher = CallBatcher(model)
    (session, settings), _ = sessions(model, batcher)[:2]
    before = session.context

    def watch(step: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        raise ValueError("the page went away")

    with pytest.raises(ValueError, match="went away"):
        session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"), watch)
    assert session.context is before
    session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"))
    assert session.context.frames == before.frames + 1


def test_sessions_keep_the_least_busy_worker_and_leave_it_when_gone():
    model = Recording()
    batcher = CallBatcher(model, workers=2)
    made = sessions(model, batcher)
    first, second = batcher.workers
    assert [session.worker for session, _ in made] == [first, second, first]
    assert [worker.seated for worker in batcher.workers] == [2, 1]
    del made[:2]
    gc.collect()
    assert [worker.seated for worker in batcher.workers] == [1, 0]


def test_an_idle_worker_thread_ends_and_the_next_frame_starts_another(monkeypatch):
    monkeypatch.setattr(dreamer, "IDLE_S", 0.05)
    model = Recording()
    session, settings = sessions(model, CallBatcher(model))[0]
    worker = session.worker
    session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"))
    first = worker._thread
    first.join(timeout=30)
    assert not first.is_alive() and worker._thread is None
    session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"))
    assert worker._thread is not None and worker._thread is not first


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # what killed it
def test_a_worker_thread_that_fails_fails_its_frames_and_the_next_frame_starts_another(monkeypatch):
    model = Recording()
    session, settings = sessions(model, CallBatcher(model))[0]
    session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"))
    thread = session.worker._thread

    def broken(self, group):
        raise MemoryError("the worker itself")

    with monkeypatch.context() as patched:
        patched.setattr(dreamer.Worker, "_answer", broken)
        with pytest.raises(MemoryError, match="the worker itself"):
            session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu"))
    assert session.worker._thread is None
    thread.join(timeout=30)  # it ended, raising (threads report what killed them)
    assert not thread.is_alive()
    assert session.next_frame(torch.zeros(2), settings, new_generator(0, "cpu")).shape == (SIZE, SIZE)


def test_a_dreamer_refuses_a_batcher_of_another_model():
    model, other = Recording(), Recording()
    tokens = torch.zeros((2, SIZE, SIZE), dtype=torch.long)
    with pytest.raises(ValueError, match="another model"):
        Dreamer(model, tokens, torch.zeros(2, 2), keep=1, batcher=CallBatcher(other))
    Dreamer(model, tokens, torch.zeros(2, 2), keep=1, batcher=CallBatcher(model))  # its own: fine
    with pytest.raises(ValueError, match="at least one worker"):
        CallBatcher(model, workers=0)
