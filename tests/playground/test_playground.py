"""The playground without a browser: its request protocol, the sliding context, sessions that never share
state, the server's answers to bad input, and replay reproducing a recorded GIF. Tiny stores and a tiny
random model, served on a free port of 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import websockets.sync.client
import yaml
from conftest import from_params, params_section, tiny_architecture
from typer.testing import CliRunner

from mnist_world.actions.ego import actions_from_centres, ego_centres
from mnist_world.config import DataConfig, SampleConfig, as_dict
from mnist_world.core.store import create_store, write_sequences
from mnist_world.data.frames import downsample
from mnist_world.data.sources import generate_sequences
from mnist_world.data.tokens import quantize, token_attributes
from mnist_world.model.checkpoint import save_checkpoint
from mnist_world.model.network import Architecture, build_model
from mnist_world.model.sampling import Context, new_generator, predict_future
from mnist_world.playground.cli import app, gif_frames
from mnist_world.playground.dreamer import Dreamer, SamplerSettings
from mnist_world.playground.guard import Limits
from mnist_world.playground.protocol import (
    StepRequest,
    decode_pixels,
    encode_pixels,
    frame_message,
    parse_restart,
    parse_step,
)
from mnist_world.playground.recording import Recording, animation_gif, replay
from mnist_world.playground.server import (
    Playground,
    PlaygroundServer,
    PlaySettings,
    host_names,
    is_loopback,
    make_server,
    static_file,
)
from mnist_world.playground.session import Session
from mnist_world.playground.world import PlaygroundError, ValidationData, load_world

SIZE, FRAMES, LEVELS, PAST = 16, 8, 8, 3
DATA = from_params(DataConfig, num_sequences=10, frames=FRAMES, seed=2, train_sequences=4, val_sequences=6)
SAMPLER = SamplerSettings(steps=3, temperature=1.0, guidance=0.0, choice_temperature=1.0, action_guidance=0.0)
pytestmark = pytest.mark.usefixtures("one_thread")


# --- Helpers shared with the browser test ------------------------------------------------------------------


def action_attributes(size: int, data: DataConfig) -> dict:
    """The action store's attributes the playground reads: the tracker's settings, as the stage has them."""
    tracking = params_section("actions")
    return {
        "frame_size": size,
        "canvas": data.canvas,
        "tracking": {
            "threshold": tracking["threshold"],
            "min_area": tracking["min_area"],
            "size": tracking["tracking_size"],
            "digits": data.digits,
        },
    }


def make_stores(root: Path, data: DataConfig, size: int, levels: int) -> Path:
    """Token, frame and action stores of generated sequences at `size` x `size`, written as the stages do."""
    generated = generate_sequences(data, progress=False)
    frames = downsample(generated.frames, size)
    centres = ego_centres(generated.centers, generated.ink) * (size / data.canvas)
    stores = {
        "frames": (frames, {"frame_size": size, "canvas": data.canvas, "frames": data.frames, "source": "x"}),
        "tokens": (quantize(frames, levels), token_attributes(levels, size, data.frames, "generate")),
        "actions": (actions_from_centres(centres, size), action_attributes(size, data)),
    }
    for name, (array, attributes) in stores.items():
        with create_store(root / f"{name}.zarr", attributes) as group:
            write_sequences(group, name, array, sequences_per_shard=4)
    return root


def tiny_arch(size: int = SIZE, levels: int = LEVELS, frames: int = FRAMES) -> Architecture:
    return tiny_architecture(levels, size, frames)


def make_checkpoint(path: Path, arch: Architecture, past: int = PAST) -> Path:
    torch.manual_seed(0)
    payload = {
        "model": build_model(arch).state_dict(),
        "architecture": dataclasses.asdict(arch),
        "params": {"train": {"past_frames": past, "objectives": {"future": 1.0}}},
    }
    save_checkpoint(path, payload)
    return path


def settings_for(root: Path, data: DataConfig, **overrides) -> PlaySettings:
    values = dict(
        checkpoint=str(root / "best.pt"),
        tokens=str(root / "tokens.zarr"),
        frames=str(root / "frames.zarr"),
        actions=str(root / "actions.zarr"),
        train_sequences=data.train_sequences,
        val_sequences=data.val_sequences,
        decode="centre",  # stores made here carry no measured level means
        sampler=SAMPLER,
        models=None,  # the checkpoint alone, whatever the working directory holds
    )
    return PlaySettings(**{**values, **overrides})


@contextlib.contextmanager
def serving(playground: Playground | None = None, server: PlaygroundServer | None = None):
    """The playground (or a server made of it) served on a free port of 127.0.0.1 for the block: yields its
    base URL."""
    server = server or make_server(playground, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def call(
    base: str, path: str, body: dict | None = None, method: str | None = None, **headers: str
) -> tuple[int, dict | bytes]:
    """(status, JSON payload or raw bytes) of a GET, or of a POST when `body` is given."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers["Content-Type"]
    return status, json.loads(raw) if kind == "application/json" else raw


def live(base: str, **options):
    """A WebSocket to the page's live endpoint, as the page opens it."""
    return websockets.sync.client.connect(base.replace("http://", "ws://") + "/api/live", **options)


def received(connection, kind: str) -> dict:
    """The next message of type `kind` from a live connection (iterations and states before it skipped)."""
    while True:
        message = json.loads(connection.recv(timeout=60))
        assert message["type"] in (kind, "iteration", "state"), message
        if message["type"] == kind:
            return message


# --- Fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_stores(tmp_path_factory.mktemp("playground"), DATA, SIZE, LEVELS)
    make_checkpoint(root / "best.pt", tiny_arch())
    return root


@pytest.fixture(scope="module")
def data(root):
    return ValidationData(
        root / "tokens.zarr", root / "frames.zarr", root / "actions.zarr", 4, 6, decode="centre"
    )


@pytest.fixture(scope="module")
def world(root, data):
    return load_world(root / "best.pt", data)


@pytest.fixture(scope="module")
def base(root):
    with serving(Playground(settings_for(root, DATA))) as url:
        yield url


# --- The protocol ------------------------------------------------------------------------------------------


def test_a_step_request_is_parsed_and_checked():
    body = {"session": "s", "frame": 4, "action": [0.25, -1], "temperature": 1, "truth": True}
    assert parse_step(body) == StepRequest("s", 4, (0.25, -1.0), 1.0, True)
    assert parse_step({k: v for k, v in body.items() if k != "truth"}).truth is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"action": [0.1]}, "'action' list should have at least 2 items"),
        ({"action": "right"}, "'action' should be a valid list"),
        ({"action": [0.1, "up"]}, "'action.1' should be a valid number, got 'up'"),
        ({"action": [1.5, 0]}, "'action.0' should be less than or equal to 1, got 1.5"),
        ({"action": [float("nan"), 0]}, "'action.0' should be a finite number"),
        ({"temperature": -0.5}, "'temperature' should be greater than or equal to 0"),
        ({"frame": 2.5}, "'frame' should be a valid integer, got 2.5"),
        ({"frame": True}, "'frame' should be a valid integer, got True"),
        ({"frame": 2**64}, "'frame' should be less than or equal to 1000000"),
        ({"session": None}, "'session' should be a valid string"),
        ({"truth": "yes"}, "'truth' should be a valid boolean"),
        ({"speed": 3}, "unknown field 'speed'"),
    ],
)
def test_a_bad_step_request_is_refused_with_one_line(change, message):
    body = {"session": "s", "frame": 4, "action": [0.1, 0.0], "temperature": 1.0, **change}
    with pytest.raises(PlaygroundError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_step(body)


def test_a_restart_request_defaults_what_it_leaves_out():
    assert parse_restart({}) == parse_restart({"checkpoint": "  "})
    request = parse_restart({"session": "s", "sequence": 5, "seed": 2, "checkpoint": " models/x.pt "})
    assert (request.session, request.sequence, request.seed, request.checkpoint) == ("s", 5, 2, "models/x.pt")
    with pytest.raises(PlaygroundError, match="expected a JSON object"):
        parse_restart([1, 2])
    for seed in (2**64, 1e30, -1, "3"):
        with pytest.raises(PlaygroundError, match="'seed' should be"):
            parse_restart({"seed": seed})


def test_frames_travel_as_uint8_grey_levels_row_by_row():
    frame = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    grey = decode_pixels(encode_pixels(frame), SIZE)
    np.testing.assert_array_equal(grey, np.rint(frame * 255).astype(np.uint8))
    message = frame_message(7, frame, np.array([0.5, -0.25]), np.array([3.0, 4.5]), given=False)
    assert json.loads(json.dumps(message)) == message
    assert (message["frame"], message["action"], message["centre"], message["truth"]) == (
        7,
        [0.5, -0.25],
        [3.0, 4.5],
        None,
    )


# --- The sliding context -----------------------------------------------------------------------------------


def test_the_context_slides_to_the_newest_frames_when_it_fills_the_model(world, data):
    sequence = data.sequence(data.rows.start)
    tokens, actions = torch.from_numpy(sequence.tokens[:PAST]), torch.from_numpy(sequence.actions[:PAST])
    dreamer = Dreamer(world.model, tokens, actions, keep=PAST)
    generator = new_generator(0, "cpu")
    sizes, dreamed = [], [tokens]
    for step in range(2 * FRAMES):  # past the model's frames twice: positions must never overflow
        move = torch.tensor([0.1 * (step % 3 - 1), 0.05])
        frame = dreamer.next_frame(move, SAMPLER, generator)
        assert frame.shape == (SIZE, SIZE) and int(frame.max()) < LEVELS  # no mask left
        sizes.append(dreamer.context_frames)
        dreamed.append(frame[None])
    # Grows to the model's 8 frames, then slides back to the 3 newest and grows again.
    assert sizes[:12] == [4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 5]
    every = torch.cat(dreamed)  # (P + 24, H, W)
    torch.testing.assert_close(dreamer.context.tokens[0], every[-dreamer.context_frames :], rtol=0, atol=0)


def test_after_a_slide_the_cached_context_predicts_what_the_window_alone_does(world, data):
    sequence = data.sequence(data.rows.start + 1)
    tokens, actions = torch.from_numpy(sequence.tokens[:PAST]), torch.from_numpy(sequence.actions[:PAST])
    dreamer = Dreamer(world.model, tokens, actions, keep=PAST)
    generator = new_generator(1, "cpu")
    for _ in range(FRAMES - PAST + 1):  # one slide, then one frame on top
        dreamer.next_frame(torch.tensor([0.1, 0.0]), SAMPLER, generator)
    window, window_actions = dreamer.context.tokens, dreamer.context.actions  # (1, 4, H, W), (1, 4, 2)
    following = torch.cat([window_actions, torch.tensor([[[0.0, 0.1]]])], dim=1)
    blank = torch.full((1, 1, SIZE, SIZE), LEVELS)
    with torch.no_grad():
        cached = dataclasses.replace(dreamer.context, actions=following).logits(world.model, blank)
        reference = Context.encode(world.model, window, following, cached=False).logits(world.model, blank)
    assert window.shape[1] == PAST + 1  # the window restarted at time 0 with the 3 newest frames
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)


def test_guided_by_the_actions_the_dreamer_dreams_what_the_sampler_does(world, data):
    """Frame by frame under the true actions, with action guidance (the context held twice, once without
    actions), the playground's frames are the evaluation sampler's; guidance switched on mid-run keeps
    every frame of the context."""
    sequence = data.sequence(data.rows.start + 2)
    tokens, actions = torch.from_numpy(sequence.tokens).long(), torch.from_numpy(sequence.actions)
    settings = dataclasses.replace(SAMPLER, action_guidance=2.0, choice_temperature=1000.0)
    dreamer = Dreamer(world.model, tokens[:PAST], actions[:PAST], keep=PAST)
    generator = new_generator(3, "cpu")
    dreamed = [dreamer.next_frame(actions[frame], settings, generator) for frame in range(PAST, FRAMES)]
    sampler = {"steps": 3, "temperature": 1.0, "choice_temperature": 1000.0, "guidance": 0.0}
    config = from_params(SampleConfig, mode="autoregressive", action_guidance=2.0, **sampler)
    expected = predict_future(
        world.model, tokens[None, :PAST], actions[None, :FRAMES], config, mask_id=LEVELS,
        generator=new_generator(3, "cpu"),
    )  # fmt: skip
    assert torch.equal(torch.stack(dreamed), expected[0])

    plain = Dreamer(world.model, tokens[:PAST], actions[:PAST], keep=PAST)
    plain.next_frame(actions[PAST], SAMPLER, generator)
    plain.next_frame(actions[PAST + 1], settings, generator)
    assert plain.context_frames == PAST + 2 and plain.context.twinned


def test_keep_must_leave_room_for_a_new_frame(world, data):
    sequence = data.sequence(data.rows.start)
    tokens, actions = torch.from_numpy(sequence.tokens[:PAST]), torch.from_numpy(sequence.actions[:PAST])
    for keep in (0, FRAMES):
        with pytest.raises(ValueError, match="keep must be in"):
            Dreamer(world.model, tokens, actions, keep=keep)


# --- Sessions ----------------------------------------------------------------------------------------------


def steps_of(session: Session, moves, temperature=1.0, truth=False):
    for move in moves:
        session.step(StepRequest("s", len(session.frames), move, temperature, truth))
    return np.stack(session.frames)


MOVES = [(0.1, 0.0), (0.0, 0.0), (-0.1, 0.05), (0.1, 0.0), (0.0, -0.1), (0.05, 0.05), (0.1, 0.1)]


def test_a_session_refuses_a_stale_frame_and_an_unknown_sequence(world):
    session = Session(world, DATA.train_sequences, seed=0, settings=SAMPLER)
    with pytest.raises(PlaygroundError, match="frame 2 asked, but the run is at frame 3"):
        session.step(StepRequest("s", 2, (0.0, 0.0), 1.0, False))
    with pytest.raises(PlaygroundError, match=r"sequence 2 is not a validation sequence \(valid: 4..9\)"):
        Session(world, 2, seed=0, settings=SAMPLER)


def test_the_true_future_replays_the_datasets_actions_until_the_sequence_ends(world):
    session = Session(world, 5, seed=0, settings=SAMPLER)
    messages = [session.step(StepRequest("s", t, (0.0, 0.0), 1.0, True)) for t in range(PAST, DATA.frames)]
    np.testing.assert_allclose([m["action"] for m in messages], session.sequence.actions[PAST:], rtol=1e-6)
    assert all(m["truth"] is not None for m in messages) and messages[-1]["truth_left"] == 0
    with pytest.raises(PlaygroundError, match="has no true frame 8"):
        session.step(StepRequest("s", DATA.frames, (0.0, 0.0), 1.0, True))
    session.step(StepRequest("s", DATA.frames, (0.1, 0.0), 1.0, False))  # steering goes on


@pytest.mark.parametrize("workers", [1, 2])
def test_two_tabs_playing_at_once_do_not_disturb_each_other(root, data, workers):
    world = load_world(root / "best.pt", data, workers=workers)  # 2: the tabs dream side by side
    alone = steps_of(Session(world, 6, seed=3, settings=SAMPLER), MOVES)
    first, second = (Session(world, 6, seed=3, settings=SAMPLER) for _ in range(2))
    other = Session(world, 7, seed=9, settings=SAMPLER)

    def play(session, moves):
        for move in moves:
            with session.lock:
                session.step(StepRequest("s", len(session.frames), move, 1.0, False))

    threads = [
        threading.Thread(target=play, args=(session, moves))
        for session, moves in ((first, MOVES), (other, MOVES[::-1]), (second, MOVES))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(np.stack(first.frames), alone)
    np.testing.assert_array_equal(np.stack(second.frames), alone)


def test_the_ego_digits_centre_is_tracked_for_the_overlay(world):
    session = Session(world, 4, seed=0, settings=SAMPLER, overlay=True)
    start = session.start_message()
    centres = [frame["centre"] for frame in start["frames"]]
    assert all(centre is not None and min(centre) >= 0 and max(centre) <= SIZE for centre in centres)
    assert [frame["given"] for frame in start["frames"]] == [True] * PAST
    assert (start["window"], start["keep"], start["frame_size"], start["truth_left"]) == (8, 3, 16, 5)


# --- Recording and replay ----------------------------------------------------------------------------------


def write_params(path: Path, data: DataConfig) -> Path:
    params = {
        "data": as_dict(data),
        "tokens": params_section("tokens", frame_size=SIZE, levels=LEVELS, decode="centre"),
        "actions": params_section("actions"),
        "sample": params_section("sample", steps=SAMPLER.steps),
    }
    path.write_text(yaml.safe_dump(params))
    return path


def test_replaying_the_downloaded_actions_gives_the_downloaded_gifs_frames(root, base, tmp_path):
    status, start = call(base, "/api/restart", {"sequence": 7, "seed": 5})
    assert status == 200
    session = start["session"]
    plan = [((0.1, 0.0), 1.0, True), ((0.1, 0.0), 0.5, True), ((0.0, 0.0), 1.0, False)]
    plan += [((-0.1, 0.1), 1.5, False), ((0.0, 0.0), 0.0, False)] * 4  # slides twice over 8 frames
    for index, (move, temperature, truth) in enumerate(plan):
        body = {"session": session, "frame": PAST + index, "action": list(move), "temperature": temperature}
        status, message = call(base, "/api/step", {**body, "truth": truth})
        assert status == 200, message
    status, gif = call(base, f"/api/recording.gif?session={session}")
    status_json, actions = call(base, f"/api/recording.json?session={session}")
    assert (status, status_json) == (200, 200)
    (tmp_path / "played.gif").write_bytes(gif)
    (tmp_path / "played.json").write_text(json.dumps(actions))
    assert len(actions["frames"]) == len(plan) and actions["seed"] == 5 and actions["sequence"] == 7

    recorded = gif_frames(tmp_path / "played.gif")
    assert len(recorded) == PAST + len(plan)  # every frame kept, still ones included
    arguments = ["replay", str(tmp_path / "played.json"), "--output", str(tmp_path / "replayed.gif")]
    arguments += [*stores_arguments(root), "--params", str(write_params(tmp_path / "params.yaml", DATA))]
    result = CliRunner().invoke(app, [*arguments, "--compare", str(tmp_path / "played.gif")])
    assert result.exit_code == 0, result.output
    assert "same frames as" in result.output
    np.testing.assert_array_equal(gif_frames(tmp_path / "replayed.gif"), recorded)

    # The comparison can fail: another seed dreams other frames.
    actions["seed"] = 6
    (tmp_path / "reseeded.json").write_text(json.dumps(actions))
    arguments[1] = str(tmp_path / "reseeded.json")
    result = CliRunner().invoke(app, [*arguments, "--compare", str(tmp_path / "played.gif")])
    assert result.exit_code == 1 and "frames differ from" in result.output


def stores_arguments(root: Path) -> list[str]:
    return [f"--{name}={root / name}.zarr" for name in ("tokens", "frames", "actions")]


def test_replay_reproduces_a_sessions_frames_and_its_gif(world):
    # A choice temperature and action guidance other than the defaults change the frames: the recording
    # must carry them.
    settings = dataclasses.replace(SAMPLER, choice_temperature=4.5, action_guidance=1.5)
    session = Session(world, 8, seed=4, settings=settings)
    steps_of(session, MOVES, temperature=0.8)
    payload = json.loads(json.dumps(Recording.of(session).to_json()))
    assert payload["action_guidance"] == 1.5
    again = replay(Recording.from_json(payload), world)
    np.testing.assert_array_equal(np.stack(again.frames), np.stack(session.frames))
    assert animation_gif(again) == animation_gif(session)
    del payload["choice_temperature"]  # a recording made before the setting existed: MaskGIT's 1
    del payload["action_guidance"]  # ... or before action guidance: none
    older = Recording.from_json(payload)
    assert (older.choice_temperature, older.action_guidance) == (1.0, 0.0)


def test_a_recording_in_another_format_is_refused():
    with pytest.raises(PlaygroundError, match="not a playground recording"):
        Recording.from_json({"format": "something else"})
    with pytest.raises(PlaygroundError, match="damaged playground recording"):
        Recording.from_json({"format": "mnist_world.playground.recording/1", "frames": []})


# --- The server --------------------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_and_nothing_else(base):
    status, page = call(base, "/")
    assert status == 200 and b'<canvas id="dream"' in page and b"/static/playground.js" in page
    for name in ("playground.js", "playground.css"):
        assert call(base, f"/static/{name}")[0] == 200
    for path in ("/static/../world.py", "/static/world.py", "/static/missing.js", "/elsewhere"):
        assert call(base, path)[0] == 404
    assert static_file("index.html") is not None


def test_config_names_the_defaults_without_loading_anything(base, root):
    status, config = call(base, "/api/config")
    assert status == 200
    assert config == {
        "checkpoint": str(root / "best.pt"),
        "checkpoints": [str(root / "best.pt")],
        "sequence": 4,
        "sequences": [4, 9],
        "seed": 0,
        "steps": SAMPLER.steps,
        "temperature": 1.0,
        "guidance": 0.0,
        "action_guidance": 0.0,
    }


def foreign_checkpoint(path: Path) -> Path:
    torch.save({"weights": torch.zeros(3)}, path)  # a valid torch file that is not ours
    return path


def test_bad_input_gets_a_clear_message_and_the_server_keeps_running(root, tmp_path, caplog):
    wrong_size = make_checkpoint(tmp_path / "wrong_size.pt", tiny_arch(size=2 * SIZE))
    offered = (
        str(tmp_path / "missing.pt"),
        str(foreign_checkpoint(tmp_path / "foreign.pt")),
        str(wrong_size),
    )
    cases = [
        ({"sequence": 2}, "sequence 2 is not a validation sequence (valid: 4..9)"),
        ({"checkpoint": offered[0]}, "missing.pt: checkpoint not found"),
        ({"checkpoint": offered[1]}, "not a checkpoint of this project"),
        ({"checkpoint": offered[2]}, "the model takes 8 levels of 32x32 tokens, but"),
        ({"checkpoint": str(root / "tokens.zarr")}, "is not offered: choose one of the server's"),
        ({"checkpoint": "../../../etc/passwd"}, "is not offered"),
    ]
    playground = Playground(settings_for(root, DATA, checkpoints=offered))
    with serving(playground) as base, caplog.at_level(logging.WARNING, logger="mnist_world.playground"):
        assert call(base, "/api/config")[1]["checkpoints"] == [str(root / "best.pt"), *offered]
        for body, message in cases:
            status, payload = call(base, "/api/restart", body)
            assert status == 400 and message in payload["error"]
            assert message in caplog.text
        status, payload = call(base, "/api/step", {"session": "nobody", "frame": 3, "action": [0, 0]})
        assert status == 400 and "'temperature' is missing" in payload["error"]
        body = {"session": "nobody", "frame": 3, "action": [0, 0], "temperature": 1.0}
        status, payload = call(base, "/api/step", body)
        assert status == 404 and "unknown session" in payload["error"]
        status, start = call(base, "/api/restart", {})  # still serving, and playing
        assert status == 200 and start["sequence"] == 4
        body = {"session": start["session"], "frame": PAST, "action": [0.0, 0.0], "temperature": 1.0}
        assert call(base, "/api/step", body)[0] == 200


def test_checkpoints_in_the_models_folder_are_offered(root, tmp_path):
    (tmp_path / "models").mkdir()
    other = make_checkpoint(tmp_path / "models" / "other.pt", tiny_arch())
    with serving(Playground(settings_for(root, DATA, models=str(tmp_path / "models")))) as base:
        assert call(base, "/api/config")[1]["checkpoints"] == [str(root / "best.pt"), str(other)]
        status, start = call(base, "/api/restart", {"checkpoint": str(other)})
        assert status == 200 and start["checkpoint"] == str(other)


# --- Malformed and foreign requests, in sequence against one server ----------------------------------------


def exchange(port: int, raw: bytes, pause: float = 0.0, rest: bytes = b"") -> list[tuple[int, bytes]]:
    """Every answer to `raw` sent on one connection (then `rest` after `pause` seconds), read until the
    server closes it: [(status, body)]."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(raw)
        if pause:
            time.sleep(pause)
            with contextlib.suppress(OSError):  # the server may have answered and closed meanwhile
                connection.sendall(rest)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
    answers = []
    for part in re.split(rb"(?=HTTP/1\.1 \d{3} )", received)[1:]:
        head, _, body = part.partition(b"\r\n\r\n")
        answers.append((int(head.split()[1]), body))
    return answers


def post(path: str, body: bytes, length: int | str | None = None, **headers: str) -> bytes:
    """A raw POST with `body`, declaring `length` (default: the body's own) and JSON unless told otherwise."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines[2] = f"Content-Type: {headers.pop('content_type', 'application/json')}"
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(path: str, **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1:{port}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def step_body(**change) -> bytes:
    body = {"session": "nobody", "frame": 3, "action": [0.0, 0.0], "temperature": 1.0, **change}
    return json.dumps(body).encode()


BAD_REQUESTS = {
    # name: (request, status, a piece of the one-line JSON error; None: the HTTP parser's own plain 400)
    "non-numeric Content-Length": (post("/api/step", b"{}", "abc"), 400, None),
    "negative Content-Length": (post("/api/step", b"{}", -1), 400, None),
    "two Content-Lengths": (post("/api/step", b"{}", "2", Content_Length="3"), 400, None),
    "huge Content-Length": (post("/api/step", b"{}", 10**12), 413, "too large"),
    "a body over the limit": (post("/api/step", b"[" * 20_000 + b"]" * 20_000), 413, "too large"),
    "not JSON": (post("/api/step", b"session=1&frame=2"), 400, "not JSON"),
    "not UTF-8": (post("/api/step", b"\xff\xfe{}"), 400, "not JSON"),
    "a JSON array": (post("/api/restart", b"[1, 2]"), 400, "expected a JSON object, got list"),
    "JSON null": (post("/api/restart", b"null"), 400, "expected a JSON object, got NoneType"),
    "deep nesting": (post("/api/restart", b'{"seed": ' + b"[" * 60 + b"]" * 60 + b"}"), 400, "nests 61"),
    "NaN": (post("/api/step", step_body().replace(b"1.0", b"NaN")), 400, "NaN is not a JSON number"),
    "Infinity": (post("/api/step", step_body().replace(b"1.0", b"-Infinity")), 400, "not a JSON number"),
    "1e400": (post("/api/step", step_body().replace(b"1.0", b"1e400")), 400, "should be a finite number"),
    "seed 2^64": (post("/api/restart", b'{"seed": 18446744073709551616}'), 400, "'seed' should be less"),
    "seed 1e30": (post("/api/restart", b'{"seed": 1e30}'), 400, "'seed' should be a valid integer"),
    "a 5000-digit number": (post("/api/restart", b'{"seed": ' + b"9" * 5000 + b"}"), 400, "not JSON"),
    "sequence as text": (post("/api/restart", b'{"sequence": "5"}'), 400, "'sequence' should be a valid"),
    "an unknown field": (post("/api/restart", b'{"sead": 1}'), 400, "unknown field 'sead'"),
    "text/plain": (post("/api/restart", b"{}", content_type="text/plain"), 415, "must be application/json"),
    "form": (post("/api/restart", b"a=1", content_type="application/x-www-form-urlencoded"), 415, "json"),
    "an unknown session": (post("/api/step", step_body()), 404, "unknown session 'nobody'"),
    "an unknown path": (post("/api/nowhere", b"{}"), 404, "Not Found"),
    "a wrong method": (get("/api/step"), 405, "Method Not Allowed"),
    "a recording without session": (get("/api/recording.json"), 400, "'session' field required"),
    "a recording of nobody": (get("/api/recording.gif?session=nobody"), 404, "unknown session"),
    "traversal ..": (get("/static/../world.py"), 404, "Not Found"),
    "traversal %2e%2e%2f": (get("/static/%2e%2e%2fworld.py"), 404, "Not Found"),
    "traversal %2F": (get("/static/..%2Fserver.py"), 404, "Not Found"),
    "a hidden file": (get("/static/.gitignore"), 404, "no file"),
    "a module beside the page": (get("/static/world.py"), 404, "no file"),
    "a foreign Origin": (
        get("/api/config", Origin="http://evil.example"),
        403,
        "Origin 'http://evil.example'",
    ),
    "Origin null": (post("/api/restart", b"{}", Origin="null"), 403, "Origin 'null'"),
    "a cross-site text/plain POST": (
        post("/api/restart", b"{}", content_type="text/plain", Origin="http://evil.example"),
        403,
        "is not this server's page",
    ),
    "a foreign Host": (get("/").replace(b"127.0.0.1:{port}", b"evil.example"), 403, "Host 'evil.example'"),
    "the right port on another name": (
        get("/api/config").replace(b"127.0.0.1:", b"evil.example:"),
        403,
        "Host 'evil.example:",
    ),
    "no Host (HTTP/1.0)": (b"GET /api/config HTTP/1.0\r\n\r\n", 403, "without a Host header"),
    "a foreign-origin WebSocket handshake": (
        get(
            "/api/live",
            Upgrade="websocket",
            Connection="Upgrade",
            Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ==",
            Sec_WebSocket_Version="13",
            Origin="http://evil.example",
        ),
        403,
        "is not this server's page",
    ),
}


def test_every_malformed_or_foreign_request_gets_one_4xx_and_the_server_keeps_serving(root, caplog):
    limits = Limits(read_s=0.5)
    playground = Playground(settings_for(root, DATA), max_sessions=3)
    server = make_server(playground, "127.0.0.1", 0, limits=limits)
    port = server.port
    with serving(server=server) as base, caplog.at_level(logging.WARNING, logger="mnist_world.playground"):
        for name, (raw, status, message) in BAD_REQUESTS.items():
            answers = exchange(port, raw.replace(b"{port}", str(port).encode()))
            assert [answer[0] for answer in answers] == [status], name
            body = answers[0][1]
            if message is None:  # refused by the HTTP parser, before the application
                assert body == b"Invalid HTTP request received.", name
            else:
                assert b"\n" not in body and message in json.loads(body)["error"], (name, body)

        # A body shorter than declared: answered once its time is up, not waited for forever.
        started = time.perf_counter()
        answers = exchange(port, post("/api/step", b'{"session"', 100).replace(b"{port}", str(port).encode()))
        assert [status for status, _ in answers] == [408] and time.perf_counter() - started < 5
        # A body longer than declared: the declared part is the request; the rest is never read as another.
        raw = post("/api/restart", b'{"seed": 1}', 5).replace(b"{port}", str(port).encode())
        answers = exchange(port, raw + b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
        assert [status for status, _ in answers] == [400], answers  # '{"see' is not JSON; then closed
        # A body sent in two parts, the second too late.
        raw = post("/api/restart", b"{}", 2).replace(b"{port}", str(port).encode())
        answers = exchange(port, raw[:-2], pause=1.0, rest=raw[-2:])
        assert [status for status, _ in answers] == [408]

        # More sessions than the limit: refused while every slot is in use.
        sessions = [call(base, "/api/restart", {})[1]["session"] for _ in range(3)]
        status, payload = call(base, "/api/restart", {})
        assert status == 429 and "3 sessions are in use" in payload["error"]
        assert call(base, "/api/restart", {"session": sessions[0], "seed": 4})[0] == 200  # its own slot
        assert call(base, f"/api/session/{sessions[1]}", method="DELETE")[0] == 200
        assert call(base, "/api/restart", {})[0] == 200  # the freed slot
        assert "Origin 'http://evil.example'" in caplog.text  # every refusal is logged

        # Still serving the page, its files, the API and live frames.
        assert call(base, "/")[0] == 200 and call(base, "/static/playground.js")[0] == 200
        body = {"session": sessions[0], "frame": PAST, "action": [0.1, 0.0], "temperature": 1.0}
        assert call(base, "/api/step", body)[0] == 200
        assert call(base, "/api/step", {**body, "frame": PAST + 1}, Origin=base)[0] == 200  # its own page
        for session in (sessions[0], sessions[2]):
            call(base, f"/api/session/{session}", method="DELETE")
        with live(base) as connection:
            connection.send(json.dumps({"op": "restart", "sequence": 6}))
            assert json.loads(connection.recv(timeout=30))["type"] == "start"
            connection.send(json.dumps({"op": "step"}))
            assert received(connection, "frame")["frame"] == PAST


class Gate:
    """A function, except that its first call once armed waits for the gate: a frame held up mid-dream for
    as long as the test needs."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.armed, self.gate, self.waiting = threading.Event(), threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            first = self.armed.is_set() and not self.waiting.is_set()
            if first:
                self.waiting.set()
        if first:
            self.gate.wait(timeout=30)
        return self.function(*args, **kwargs)


def test_a_frame_being_dreamed_holds_up_neither_the_page_nor_another_tab(root, world, monkeypatch):
    # The first tab watches its frame being unmasked; decoding its first iteration's tokens waits at the
    # gate, so its frame stays half dreamed while it holds none of the model calls the tabs share.
    gated = Gate(world.data.to_pixels)
    monkeypatch.setattr(world.data, "to_pixels", gated)
    playground = Playground(settings_for(root, DATA), load=lambda _: world)
    with serving(playground) as url:
        first, second = (call(url, "/api/restart", {})[1]["session"] for _ in range(2))
        body = {"frame": PAST, "action": [0.0, 0.0], "temperature": 1.0}
        answers = {}

        def dream_first() -> None:
            answers["first"] = call(url, "/api/step", {**body, "session": first, "unmasking": True})

        gated.armed.set()
        worker = threading.Thread(target=dream_first)
        worker.start()
        assert gated.waiting.wait(timeout=30)  # the first tab's frame is being dreamed, and stays so
        try:
            assert call(url, "/")[0] == 200 and call(url, "/api/config")[0] == 200
            assert call(url, "/api/step", {**body, "session": second})[0] == 200  # not queued behind it
            assert worker.is_alive() and "first" not in answers
        finally:
            gated.gate.set()
        worker.join(timeout=30)
        assert answers["first"][0] == 200


def test_mnist_world_play_prints_its_address_and_serves(root, tmp_path):
    script = Path(sys.executable).with_name("mnist-world")
    assert script.exists(), "the console script is declared in pyproject.toml: pip install -e ."
    params = write_params(tmp_path / "params.yaml", DATA)
    command = [str(script), "play", f"--checkpoint={root / 'best.pt'}", *stores_arguments(root)]
    process = subprocess.Popen(
        [*command, f"--params={params}", "--port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("mnist-world playground on http://127.0.0.1:"), line
        url = line.split()[3].rstrip("/")
        status, start = call(url, "/api/restart", {"sequence": 9})
        assert status == 200 and start["sequence"] == 9 and start["steps"] == SAMPLER.steps
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- Replay's input and the command line -------------------------------------------------------------------


def replay_of(path: Path, payload: dict, root: Path, tmp_path: Path, *options: str):
    path.write_text(json.dumps(payload) if isinstance(payload, dict) else payload)
    arguments = ["replay", str(path), "--output", str(tmp_path / "out.gif"), *stores_arguments(root)]
    arguments += ["--params", str(write_params(tmp_path / "params.yaml", DATA)), *options]
    return CliRunner().invoke(app, arguments)


RECORDING = {
    "format": "mnist_world.playground.recording/1",
    "sequence": 5,
    "seed": 0,
    "steps": 3,
    "guidance": 0.0,
    "keep": 3,
    "frames": [{"action": [0.1, 0.0], "temperature": 1.0, "truth": False}],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 2**64}, "'seed' should be less than or equal to 9223372036854775807"),
        ({"seed": "1e400"}, "'seed' should be a valid integer"),
        ({"sequence": 5.5}, "'sequence' should be a valid integer, got 5.5"),
        ({"steps": 0}, "'steps' should be greater than or equal to 1"),
        ({"keep": True}, "'keep' should be a valid integer, got True"),
        ({"frames": [{"action": [0.1, "x"], "temperature": 1}]}, "'frames.0.action.1' should be a valid"),
        ({"frames": [{"action": [0, 0], "temperature": 0}] * 100_001}, "'frames' list should have at most"),
        ({"checkpoint": ["a.pt"]}, "'checkpoint' should be a valid string"),
    ],
)
def test_replay_refuses_a_damaged_recording_naming_the_file_and_field(root, tmp_path, change, message):
    payload = {**RECORDING, "checkpoint": str(root / "best.pt"), **change}
    text = json.dumps(payload).replace('"1e400"', "1e400")  # a number JSON allows and a float cannot hold
    result = replay_of(tmp_path / "played.json", text, root, tmp_path)
    where = f"{tmp_path / 'played.json'}: a damaged playground recording"
    assert result.exit_code == 1 and where in result.output
    assert message in result.output and "Traceback" not in result.output


def test_replay_shows_the_checkpoint_it_plays_and_refuses_one_that_is_not_there(root, tmp_path):
    path = tmp_path / "played.json"
    result = replay_of(path, {**RECORDING, "checkpoint": "elsewhere/best.pt"}, root, tmp_path)
    assert result.exit_code == 1
    assert "checkpoint: elsewhere/best.pt (named by the recording)" in result.output
    assert "the checkpoint elsewhere/best.pt does not exist (pass --checkpoint where it is)" in result.output
    result = replay_of(path, {**RECORDING, "checkpoint": "elsewhere/best.pt"}, root, tmp_path,
                       f"--checkpoint={root / 'best.pt'}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {root / 'best.pt'} (--checkpoint)" in result.output
    for text, message in [("[1, 2]", "not a playground recording"), ("{", "not JSON"), ("NaN", "NaN is not")]:
        result = replay_of(path, text, root, tmp_path)
        assert result.exit_code == 1 and message in result.output, result.output


def test_the_server_answers_its_own_names_and_warns_off_loopback(root, tmp_path):
    assert host_names("127.0.0.1", 8000) == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    assert host_names("192.0.2.1", 80, ("lab.local",)) == {"192.0.2.1:80", "lab.local:80"}
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    params = write_params(tmp_path / "params.yaml", DATA)
    arguments = ["play", f"--checkpoint={root / 'best.pt'}", *stores_arguments(root), f"--params={params}"]
    result = CliRunner().invoke(app, [*arguments, "--host=192.0.2.1"])  # not this machine's: cannot bind
    assert "warning: listening on 192.0.2.1, not loopback" in result.output
    assert result.exit_code == 1 and "cannot listen on 192.0.2.1:0" in result.output
