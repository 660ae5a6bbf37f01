"""The playground page in a real browser (headless Chromium over the DevTools pipe): it loads, frames arrive,
restart works, bad input shows on the page, and the arrow keys steer. Skipped only where no Chromium exists;
the README's test command and CI install Debian's `chromium` first.

Steering is checked with a model double that moves the frame by exactly the commanded action: the one place
a double is right, since what is tested is the page and its protocol, not what a model has learned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import from_params
from test_playground import (
    PAST,
    make_checkpoint,
    make_stores,
    serving,
    settings_for,
    tiny_arch,
)

from mnist_world.config import DataConfig
from mnist_world.model.network import Architecture
from mnist_world.playground.chromium import Chromium, find_chromium
from mnist_world.playground.server import Playground
from mnist_world.playground.session import overlay_centres
from mnist_world.playground.world import ValidationData, World

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium)"),
    pytest.mark.usefixtures("one_thread"),
]

# One digit, so that moving the whole frame moves the ego digit and nothing else.
SIZE, FRAMES, LEVELS = 32, 8, 8
ONE_DIGIT = from_params(
    DataConfig, num_sequences=12, frames=FRAMES, seed=3, digits=1, train_sequences=4, val_sequences=8
)


@pytest.fixture(scope="module")
def browser():
    with Chromium(CHROMIUM, width=1200, height=900) as chromium:
        yield chromium


class ShiftModel(torch.nn.Module):
    """A deterministic double of the world model: the next frame is the last one moved by exactly the action
    (action x W / 2 pixels, as the action store defines it), with background coming in at the edge."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch

    def forward(self, tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        # Its "cache" keeps the frames themselves: (B, C, H, W) ids, where a real model keeps keys and values.
        history = tokens if cache is None else torch.cat([cache[0][0], tokens], dim=1)
        previous = history[:, -tokens.shape[1] - 1 : -1] if cache is not None else tokens
        half = self.arch.frame_size / 2
        moved = torch.stack(
            [
                torch.stack([shift(frame, action, half) for frame, action in zip(frames, moves, strict=True)])
                for frames, moves in zip(previous, actions, strict=True)
            ]
        )
        logits = 1e4 * F.one_hot(moved.clamp(max=self.arch.levels - 1), self.arch.levels).float()
        return logits, [(history, history)]


def shift(frame: torch.Tensor, action: torch.Tensor, half: float) -> torch.Tensor:
    """`frame` (H, W) moved by round(action x half) pixels, (dx, dy), zeros coming in."""
    dx, dy = (int(round(float(value) * half)) for value in action)
    height, width = frame.shape
    moved = torch.zeros_like(frame)
    moved[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = frame[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return moved


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = make_stores(tmp_path_factory.mktemp("browser"), ONE_DIGIT, SIZE, LEVELS)
    make_checkpoint(root / "best.pt", tiny_arch(SIZE, LEVELS, FRAMES))
    return root


@pytest.fixture(scope="module")
def real(stores):
    """The page served with a tiny random model from a checkpoint."""
    with serving(Playground(settings_for(stores, ONE_DIGIT))) as url:
        yield url


def leftmost_sequence(stores) -> int:
    """The validation sequence whose digit starts its dreaming furthest left: room to move right."""
    data = ValidationData(
        *(stores / f"{name}.zarr" for name in ("tokens", "frames", "actions")), 4, 8, "centre"
    )
    starts = {index: overlay_centres(data.tracker, data.sequence(index).frames[:PAST]) for index in data.rows}
    return min((centre[-1][0], index) for index, centre in starts.items() if centre is not None)[1]


@pytest.fixture(scope="module")
def shifting(stores):
    """The page served with the shifting double; one arrow step is exactly one pixel."""
    data = ValidationData(
        *(stores / f"{name}.zarr" for name in ("tokens", "frames", "actions")), 4, 8, "centre"
    )
    arch = tiny_arch(SIZE, LEVELS, FRAMES)
    world = World(ShiftModel(arch), data, PAST, "shift-double", torch.device("cpu"))
    settings = settings_for(stores, ONE_DIGIT, step_px=1.0, sequence=leftmost_sequence(stores))
    with serving(Playground(settings, load=lambda _: world)) as url:
        yield url


def frames_arrived(page, count: int) -> None:
    page.wait_for(f"window.playground.frames.length >= {count}", timeout=60)


def test_the_page_loads_dreams_and_restarts_without_console_errors(browser, real):
    page = browser.open(real + "/")
    frames_arrived(page, PAST + 3)  # it plays by itself: frames arrive
    assert page.evaluate("window.playground.frames.slice(0, 3).every(f => f.given)")
    assert page.evaluate(f"window.playground.frames.slice({PAST}).every(f => !f.given)")
    assert page.evaluate("document.getElementById('dream').width") == 384

    page.evaluate("document.getElementById('sequence').value = 9")
    page.click("#restart")
    page.wait_for("window.playground.sequence === 9")
    frames_arrived(page, PAST + 1)  # restarted, and dreaming again
    assert page.evaluate("window.playground.frames.every((f, t) => f.frame === t)")
    assert page.evaluate("window.playground.error") == ""
    assert page.errors() == []


def test_bad_input_shows_on_the_page_and_the_server_keeps_serving(browser, real):
    page = browser.open(real + "/?paused")
    page.wait_for("window.playground.session")
    page.evaluate("document.getElementById('sequence').value = 2")
    page.click("#restart")
    message = page.wait_for(
        "!document.getElementById('error').hidden && document.getElementById('error').textContent"
    )
    assert message == "sequence 2 is not a validation sequence (valid: 4..11)"
    page.evaluate("document.getElementById('checkpoint').value = 'nowhere.pt'")
    page.evaluate("document.getElementById('sequence').value = 5")
    page.click("#restart")
    page.wait_for(
        "document.getElementById('error').textContent.startsWith('nowhere.pt: checkpoint not found')"
    )
    page.evaluate("document.getElementById('checkpoint').value = ''")  # back to the server's checkpoint
    page.click("#restart")
    page.wait_for("document.getElementById('error').hidden")
    assert page.evaluate("window.playground.frames.length") == PAST


def test_holding_the_right_arrow_for_five_frames_moves_the_digit_five_steps_right(browser, shifting):
    page = browser.open(shifting + "/?paused")  # frames only when Step is pressed
    page.wait_for("window.playground.session")
    start = page.evaluate(f"window.playground.frames[{PAST - 1}].centre")
    assert start is not None and page.evaluate("window.playground.step") == pytest.approx(2 / SIZE)

    page.key("ArrowRight", down=True)
    for count in range(PAST + 1, PAST + 6):
        page.click("#step")
        frames_arrived(page, count)
    page.key("ArrowRight", down=False)
    page.click("#step")  # no key held: still
    frames_arrived(page, PAST + 6)

    frames = page.evaluate("window.playground.frames")
    assert [frame["action"] for frame in frames[PAST:]] == [[2 / SIZE, 0.0]] * 5 + [[0.0, 0.0]]
    moved = [frame["centre"][0] - start[0] for frame in frames[PAST:]]
    assert moved == pytest.approx([1, 2, 3, 4, 5, 5])  # one pixel per commanded step, then still
    assert all(frame["centre"][1] == pytest.approx(start[1]) for frame in frames[PAST:])
    assert page.errors() == []


def test_the_on_screen_buttons_steer_as_the_keys_do(browser, shifting):
    page = browser.open(shifting + "/?paused")
    page.wait_for("window.playground.session")
    box = page.evaluate(
        "(() => { const r = document.querySelector('#pad .down').getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    page.send(
        "Input.dispatchMouseEvent", {"type": "mousePressed", "x": box[0], "y": box[1], "button": "left"}
    )
    assert page.evaluate("window.playground.held.has('ArrowDown')")
    page.evaluate("window.playground.held.size === 1 && document.getElementById('step').click()")
    frames_arrived(page, PAST + 1)
    page.send(
        "Input.dispatchMouseEvent", {"type": "mouseReleased", "x": box[0], "y": box[1], "button": "left"}
    )
    assert not page.evaluate("window.playground.held.size")
    assert page.evaluate(f"window.playground.frames[{PAST}].action") == [0.0, 2 / SIZE]


def test_showing_the_true_future_plays_the_datasets_actions_beside_the_dream(browser, shifting, stores):
    page = browser.open(shifting + "/?paused")
    page.wait_for("window.playground.session")
    assert page.evaluate("document.getElementById('truth-panel').hidden")
    page.click("#show-truth")
    assert not page.evaluate("document.getElementById('truth-panel').hidden")
    page.key("ArrowLeft", down=True)  # ignored: the dataset's own action is played
    page.click("#step")
    frames_arrived(page, PAST + 1)
    page.key("ArrowLeft", down=False)
    latest = page.evaluate(f"window.playground.frames[{PAST}]")
    data = ValidationData(
        *(stores / f"{name}.zarr" for name in ("tokens", "frames", "actions")), 4, 8, "centre"
    )
    true_action = data.sequence(leftmost_sequence(stores)).actions[PAST]
    assert latest["truth"] is not None and latest["action"] == pytest.approx(true_action.tolist())
    assert page.errors() == []


def test_downloads_are_offered_for_the_run(browser, shifting):
    page = browser.open(shifting + "/?paused")
    session = page.wait_for("window.playground.session")
    gif = page.evaluate("document.getElementById('download-gif').getAttribute('href')")
    actions = page.evaluate("document.getElementById('download-actions').getAttribute('href')")
    assert (gif, actions) == (
        f"/api/recording.gif?session={session}",
        f"/api/recording.json?session={session}",
    )
    fetched = page.evaluate(f"fetch({actions!r}).then(r => r.json()).then(j => [j.format, j.frames.length])")
    assert fetched == ["mnist_world.playground.recording/1", 0]


def test_the_double_moves_a_frame_by_exactly_the_action():
    frame = torch.zeros(6, 6, dtype=torch.long)
    frame[2, 2] = 3
    moved = shift(frame, torch.tensor([2 / 6, -2 / 6]), half=3)  # one pixel right, one up
    assert moved.nonzero().tolist() == [[1, 3]]
