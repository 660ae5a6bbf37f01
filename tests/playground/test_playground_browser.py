"""The playground page in a real browser: Playwright driving Debian's headless Chromium (its own browser
download is never used). The page loads, frames stream in, restart, reset, pause and step work, bad input
shows on the page, the arrow keys (real key presses) steer, the belief view and the step-by-step unmasking
show what the model believed, and pages of another origin or a foreign Host are refused. Skipped only where
no Chromium exists; the README's test command and CI install Debian's `chromium` first.

Steering and the belief view are checked with a model double that moves the frame by exactly the commanded
action, with certainty: the one place a double is right, since what is tested is the page and its protocol,
not what a model has learned.
"""

from __future__ import annotations

import base64
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import from_params
from playwright.sync_api import Page, sync_playwright
from test_playground import (
    PAST,
    SAMPLER,
    make_checkpoint,
    make_stores,
    serving,
    settings_for,
    tiny_arch,
)

from mnist_world.config import DataConfig
from mnist_world.model.network import Architecture
from mnist_world.model.sampling import masked_count
from mnist_world.playground.server import Playground
from mnist_world.playground.session import overlay_centres
from mnist_world.playground.world import ValidationData, World


def find_chromium() -> str | None:
    """Debian's chromium ($CHROMIUM when set), or None."""
    names = (os.environ.get("CHROMIUM"), "chromium", "chromium-browser")
    return next((path for name in names if name and (path := shutil.which(name))), None)


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium)"),
    pytest.mark.usefixtures("one_thread"),
]
FOREIGN = "evil.example"  # a name the browser resolves to 127.0.0.1: what DNS rebinding would do

# One digit, so that moving the whole frame moves the ego digit and nothing else.
SIZE, FRAMES, LEVELS = 32, 8, 8
# Bouncing data, which these exact-pixel steering checks were written on: with the driven data of the same
# seed the tracked centre after the held arrow and the still frame read 4.48 px, not 5.
ONE_DIGIT = from_params(
    DataConfig,
    num_sequences=12,
    frames=FRAMES,
    seed=3,
    digits=1,
    train_sequences=4,
    val_sequences=8,
    ego_motion="bounce",
)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", f"--host-resolver-rules=MAP {FOREIGN} 127.0.0.1"],  # CI runs as root
        )
        yield chromium
        chromium.close()


class Tab:
    """A page of the browser and the errors it logged."""

    def __init__(self, browser, url: str) -> None:
        self.page: Page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)

    def __getattr__(self, name: str):
        return getattr(self.page, name)

    def evaluate(self, expression: str):
        return self.page.evaluate(expression)

    def wait_for(self, expression: str, timeout: float = 60):
        return self.page.wait_for_function(expression, timeout=timeout * 1000).json_value()

    def frames_arrived(self, count: int) -> None:
        self.wait_for(f"window.playground.frames.length >= {count}")


@pytest.fixture
def open_tab(browser):
    tabs = []

    def open_tab(url: str) -> Tab:
        tabs.append(Tab(browser, url))
        return tabs[-1]

    yield open_tab
    for tab in tabs:
        tab.page.close()


class ShiftModel(torch.nn.Module):
    """A deterministic double of the world model: the next frame is the last one moved by exactly the action
    (action x W / 2 pixels, as the action store defines it), with background coming in at the edge."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch

    def forward(self, tokens, actions, temporal_mask=None, cache=None, start_frame=None):
        # Its "cache" keeps the frames themselves, (B, 1, C, H W) ids, where a real model keeps keys and
        # values (frames on the third axis); like the model, it returns those of these frames, for the caller
        # to append to its cache.
        past = None if cache is None else cache[0][0][:, 0].unflatten(-1, tokens.shape[2:])  # (B, C, H, W)
        history = tokens if past is None else torch.cat([past, tokens], dim=1)
        previous = history[:, -tokens.shape[1] - 1 : -1] if cache is not None else tokens
        half = self.arch.frame_size / 2
        moved = torch.stack(
            [
                torch.stack([shift(frame, action, half) for frame, action in zip(frames, moves, strict=True)])
                for frames, moves in zip(previous, actions, strict=True)
            ]
        )
        logits = 1e4 * F.one_hot(moved.clamp(max=self.arch.levels - 1), self.arch.levels).float()
        frames = tokens.flatten(2)[:, None]  # (B, 1, T, H W)
        return logits, [(frames, frames)]


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
def real_playground(stores):
    return Playground(settings_for(stores, ONE_DIGIT))


@pytest.fixture(scope="module")
def real(real_playground):
    """The page served with a tiny random model from a checkpoint."""
    with serving(real_playground) as url:
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
    world = World(ShiftModel(arch), data, PAST, str(stores / "best.pt"), torch.device("cpu"))
    settings = settings_for(stores, ONE_DIGIT, step_px=1.0, sequence=leftmost_sequence(stores))
    with serving(Playground(settings, load=lambda _: world)) as url:
        yield url


def grey(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(SIZE, SIZE)


def strip_frame(tab: Tab, index_from_end: int = 1) -> np.ndarray:
    """A frame as the page drew it in its film strip (no overlay there): the grey level at each token's
    centre, read back from the canvas."""
    cells = tab.evaluate(
        f"""(() => {{
        const canvas = document.getElementById("strip"), size = window.playground.size, cell = size * 3;
        const count = Math.floor((canvas.width + 4) / (cell + 6 + 4));
        const shown = Math.min(count, window.playground.frames.length);
        const left = (shown - {index_from_end}) * (cell + 6 + 4) + 3;
        const data = canvas.getContext("2d").getImageData(left, 19, cell, cell).data, out = [];
        for (let i = 0; i < size; i++)
          for (let j = 0; j < size; j++) out.push(data[4 * ((3 * i + 1) * cell + 3 * j + 1)]);
        return out; }})()"""
    )
    return np.array(cells, dtype=np.uint8).reshape(SIZE, SIZE)


def test_the_page_loads_dreams_and_restarts_without_console_errors(open_tab, real):
    tab = open_tab(real + "/")
    tab.frames_arrived(PAST + 3)  # it plays by itself: frames stream in
    assert tab.evaluate("window.playground.frames.slice(0, 3).every(f => f.given)")
    assert tab.evaluate(f"window.playground.frames.slice({PAST}).every(f => !f.given)")
    assert tab.evaluate("document.getElementById('dream').width") == 384

    tab.fill("#sequence", "9")
    tab.click("#restart")
    tab.wait_for("window.playground.sequence === 9")
    tab.frames_arrived(PAST + 1)  # restarted, and dreaming again
    assert tab.evaluate("window.playground.frames.every((f, t) => f.frame === t)")
    tab.click("#play")  # pause
    tab.wait_for("!window.playground.playing")
    frames = tab.evaluate("window.playground.frames")
    np.testing.assert_array_equal(strip_frame(tab), grey(frames[-1]["pixels"]))  # what the page drew
    assert tab.evaluate("window.playground.error") == ""
    assert tab.errors == []


def test_pause_step_and_reset_replay_the_same_run(open_tab, real):
    tab = open_tab(real + "/?paused")
    tab.wait_for("window.playground.session")
    tab.click("#step")
    tab.frames_arrived(PAST + 1)
    tab.click("#step")
    tab.frames_arrived(PAST + 2)
    first = tab.evaluate("window.playground.frames.map(f => f.pixels)")
    tab.page.wait_for_timeout(300)
    assert tab.evaluate("window.playground.frames.length") == PAST + 2  # paused: nothing more came
    tab.fill("#seed", "7")  # the form changes; Reset replays the run as it was started
    tab.click("#reset")
    tab.wait_for(f"window.playground.frames.length === {PAST}")
    tab.click("#step")
    tab.frames_arrived(PAST + 1)
    tab.click("#step")
    tab.frames_arrived(PAST + 2)
    assert tab.evaluate("window.playground.frames.map(f => f.pixels)") == first  # same seed, same frames
    assert tab.evaluate("window.playground.seed") == 0
    assert tab.errors == []


def test_bad_input_shows_on_the_page_and_the_server_keeps_serving(open_tab, real, stores):
    tab = open_tab(real + "/?paused")
    tab.wait_for("window.playground.session")
    tab.fill("#sequence", "2")
    tab.click("#restart")
    message = tab.wait_for(
        "!document.getElementById('error').hidden && document.getElementById('error').textContent"
    )
    assert message == "sequence 2 is not a validation sequence (valid: 4..11)"
    # The page chooses among the server's checkpoints; no other path is ever opened for it.
    options = tab.evaluate("[...document.getElementById('checkpoint').options].map(o => o.value)")
    assert options == [str(stores / "best.pt")]
    refused = tab.evaluate(
        """fetch("/api/restart", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({checkpoint: "/etc/passwd"})})
        .then(r => r.json().then(j => [r.status, j.error]))"""
    )
    assert refused[0] == 400 and "is not offered" in refused[1]
    tab.fill("#sequence", "5")
    tab.click("#restart")
    tab.wait_for("document.getElementById('error').hidden && window.playground.sequence === 5")
    assert tab.evaluate("window.playground.frames.length") == PAST


def test_holding_the_right_arrow_for_five_frames_moves_the_digit_five_steps_right(open_tab, shifting):
    tab = open_tab(shifting + "/?paused")  # frames only when Step is pressed
    tab.wait_for("window.playground.session")
    start = tab.evaluate(f"window.playground.frames[{PAST - 1}].centre")
    assert start is not None and tab.evaluate("window.playground.step") == pytest.approx(2 / SIZE)

    tab.keyboard.down("ArrowRight")  # a real key press, held
    for count in range(PAST + 1, PAST + 6):
        tab.click("#step")
        tab.frames_arrived(count)
    tab.keyboard.up("ArrowRight")
    tab.click("#step")  # no key held: still
    tab.frames_arrived(PAST + 6)

    frames = tab.evaluate("window.playground.frames")
    assert [frame["action"] for frame in frames[PAST:]] == [[2 / SIZE, 0.0]] * 5 + [[0.0, 0.0]]
    moved = [frame["centre"][0] - start[0] for frame in frames[PAST:]]
    assert moved == pytest.approx([1, 2, 3, 4, 5, 5])  # one pixel per commanded step, then still
    assert all(frame["centre"][1] == pytest.approx(start[1]) for frame in frames[PAST:])
    # The frame the page drew is the last given frame moved five pixels right.
    drawn = strip_frame(tab)
    np.testing.assert_array_equal(drawn[:, 5:], grey(frames[PAST - 1]["pixels"])[:, :-5])
    assert tab.errors == []


def test_the_on_screen_buttons_steer_as_the_keys_do(open_tab, shifting):
    tab = open_tab(shifting + "/?paused")
    tab.wait_for("window.playground.session")
    tab.hover("#pad .down")
    tab.mouse.down()
    assert tab.evaluate("window.playground.held.has('ArrowDown')")
    tab.evaluate("window.playground.held.size === 1 && document.getElementById('step').click()")
    tab.frames_arrived(PAST + 1)
    tab.mouse.up()
    assert not tab.evaluate("window.playground.held.size")
    assert tab.evaluate(f"window.playground.frames[{PAST}].action") == [0.0, 2 / SIZE]


def test_showing_the_true_future_plays_the_datasets_actions_beside_the_dream(open_tab, shifting, stores):
    tab = open_tab(shifting + "/?paused")
    tab.wait_for("window.playground.session")
    assert tab.evaluate("document.getElementById('truth-panel').hidden")
    tab.check("#show-truth")
    assert not tab.evaluate("document.getElementById('truth-panel').hidden")
    tab.keyboard.down("ArrowLeft")  # ignored: the dataset's own action is played
    tab.click("#step")
    tab.frames_arrived(PAST + 1)
    tab.keyboard.up("ArrowLeft")
    latest = tab.evaluate(f"window.playground.frames[{PAST}]")
    data = ValidationData(
        *(stores / f"{name}.zarr" for name in ("tokens", "frames", "actions")), 4, 8, "centre"
    )
    true_action = data.sequence(leftmost_sequence(stores)).actions[PAST]
    assert latest["truth"] is not None and latest["action"] == pytest.approx(true_action.tolist())
    assert tab.errors == []


def test_the_belief_view_and_the_unmasking_show_what_the_model_believed(open_tab, shifting):
    tab = open_tab(shifting + "/?paused")
    tab.wait_for("window.playground.session")
    hidden = "id => document.getElementById(id).hidden"
    assert tab.evaluate(f"['belief-panel', 'unmasking-panel'].map({hidden})") == [True, True]
    for box in ("#show-expected", "#show-confidence", "#show-unmasking"):
        tab.check(box)
    tab.keyboard.down("ArrowRight")
    tab.click("#step")
    tab.frames_arrived(PAST + 1)
    tab.keyboard.up("ArrowRight")
    tab.wait_for(f"window.playground.iterations.length === {SAMPLER.steps}")
    assert tab.evaluate(f"['belief-panel', 'unmasking-panel'].map({hidden})") == [False, False]

    frame = tab.evaluate(f"window.playground.frames[{PAST}]")
    # The double is certain of every token: its expected image is the frame, its confidence 1 everywhere.
    assert frame["belief"]["expected"] == frame["pixels"]
    assert (grey(frame["belief"]["confidence"]) == 255).all()
    iterations = tab.evaluate("window.playground.iterations")
    still_hidden = [int((grey(step["hidden"]) > 127).sum()) for step in iterations]
    expected = [masked_count(k, SAMPLER.steps, SIZE * SIZE) for k in range(1, SAMPLER.steps + 1)]
    assert still_hidden == expected and still_hidden[-1] == 0  # the cosine schedule, iteration by iteration
    assert iterations[-1]["pixels"] == frame["pixels"]
    # The slider picks an iteration; the view draws it (the hidden tokens in blue).
    tab.fill("#iteration", "1")
    assert tab.evaluate("document.getElementById('iteration-value').textContent") == f"1 of {SAMPLER.steps}"
    blue = tab.evaluate(
        """(() => { const d = document.getElementById("iteration-kept").getContext("2d")
        .getImageData(0, 0, 186, 186).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) n += d[i] === 40 && d[i + 1] === 70 && d[i + 2] === 190;
        return n / (d.length / 4); })()"""
    )
    assert blue == pytest.approx(expected[0] / SIZE**2, abs=0.05)
    assert tab.errors == []


def test_pages_of_another_origin_and_a_foreign_host_are_refused(open_tab, real, real_playground, shifting):
    before = real_playground.sessions
    foreign = open_tab(shifting + "/?paused")  # a page of another origin (another port)
    foreign.wait_for("window.playground.session")
    outcome = foreign.evaluate(
        f"""(async () => {{
        const posted = await fetch("{real}/api/restart", {{method: "POST", mode: "no-cors",
            headers: {{"Content-Type": "text/plain"}}, body: "{{}}"}}).then(() => "sent", () => "failed");
        const read = await fetch("{real}/api/config").then(() => "read", () => "blocked");
        const socket = await new Promise(resolve => {{
            const ws = new WebSocket("{real.replace("http", "ws")}/api/live");
            ws.onopen = () => resolve("opened");
            ws.onclose = () => resolve("refused");
        }});
        return [posted, read, socket]; }})()"""
    )
    assert outcome == ["sent", "blocked", "refused"]
    assert real_playground.sessions == before  # the cross-site POST and the socket created no session

    port = real.rsplit(":", 1)[1]
    rebound = foreign.page.goto(f"http://{FOREIGN}:{port}/")  # the server's address under a foreign name
    assert rebound.status == 403 and f"Host '{FOREIGN}:{port}'" in rebound.json()["error"]

    own = open_tab(real + "/?paused")  # the server's own page works
    own.wait_for("window.playground.session")
    assert real_playground.sessions == before + 1 and own.errors == []


def test_downloads_are_offered_for_the_run(open_tab, shifting):
    tab = open_tab(shifting + "/?paused")
    session = tab.wait_for("window.playground.session")
    gif = tab.evaluate("document.getElementById('download-gif').getAttribute('href')")
    actions = tab.evaluate("document.getElementById('download-actions').getAttribute('href')")
    assert (gif, actions) == (
        f"/api/recording.gif?session={session}",
        f"/api/recording.json?session={session}",
    )
    fetched = tab.evaluate(f"fetch({actions!r}).then(r => r.json()).then(j => [j.format, j.frames.length])")
    assert fetched == ["mnist_world.playground.recording/1", 0]


def test_the_double_moves_a_frame_by_exactly_the_action():
    frame = torch.zeros(6, 6, dtype=torch.long)
    frame[2, 2] = 3
    moved = shift(frame, torch.tensor([2 / 6, -2 / 6]), half=3)  # one pixel right, one up
    assert moved.nonzero().tolist() == [[1, 3]]
