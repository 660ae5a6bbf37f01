"""Tests of the raw-frame sources: the bouncing-MNIST generator, the resumable download and the .npy file."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import from_params, params_section

from mnist_world.config import DataConfig
from mnist_world.core.store import attribute, open_array
from mnist_world.data.download import DownloadError, download
from mnist_world.data.sources import (
    DIGIT_SIZE,
    SourceError,
    bounce_trajectories,
    build_raw_store,
    generate_sequences,
    load_canonical_npy,
    load_mnist_digits,
)

STAGE = Path(__file__).resolve().parents[2] / "stages" / "download.py"
SEQUENCES = 6


def canonical_bytes(shape: tuple[int, ...] = (20, SEQUENCES, 64, 64), dtype: str = "uint8") -> bytes:
    """A small stand-in for mnist_test_seq.npy: random frames, time first."""
    array = np.random.default_rng(7).integers(0, 256, size=shape).astype(dtype)
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tiny_config(**changes) -> DataConfig:
    base = from_params(
        DataConfig, num_sequences=SEQUENCES, train_sequences=4, val_sequences=2, sequences_per_shard=4
    )
    return dataclasses.replace(base, **changes)


# --- the generator -----------------------------------------------------------------------------------------


def test_mnist_digits_are_the_real_5k():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # 0..255 scale, empty corners
    assert np.bincount(labels).tolist() == [500] * 10


def test_generator_is_deterministic_in_its_seed():
    config = tiny_config(num_sequences=8)
    first, second = generate_sequences(config, progress=False), generate_sequences(config, progress=False)
    for field in dataclasses.fields(first):
        assert getattr(first, field.name).tobytes() == getattr(second, field.name).tobytes(), field.name
    other = generate_sequences(dataclasses.replace(config, seed=1), progress=False)
    assert other.frames.tobytes() != first.frames.tobytes()


def test_generator_shapes_and_dtypes():
    config = tiny_config(num_sequences=5, frames=7, digits=3)
    generated = generate_sequences(config, progress=False)
    assert generated.frames.shape == (5, 7, 64, 64) and generated.frames.dtype == np.uint8
    assert generated.centers.shape == (5, 7, 3, 2) and generated.centers.dtype == np.float32
    assert generated.ink.shape == (5, 3) and generated.ink.dtype == np.float32
    assert generated.labels.shape == (5, 3) and generated.labels.dtype == np.uint8


def test_trajectories_move_at_constant_speed_and_bounce():
    rng = np.random.default_rng(3)
    free, step, frames = 36.0, 3.6, 40
    heading = rng.uniform(0, 2 * np.pi, 500)
    path = bounce_trajectories(rng.uniform(0, free, (500, 2)), heading, frames, step, free)  # (M, T, 2)
    assert path.min() >= 0 and path.max() <= free
    clamped = (path == 0) | (path == free)  # (M, T, 2): a wall was hit on this component at this frame
    move = np.diff(path, axis=1)  # (M, T-1, 2): displacement into frames 1..T-1
    free_flight = ~clamped[:, 1:].any(axis=-1)
    # Away from walls each component moves by exactly the heading's share of the step.
    speed_share = step * np.abs(np.stack([np.cos(heading), np.sin(heading)], axis=-1))[:, None]
    np.testing.assert_allclose(
        np.abs(move)[free_flight], np.broadcast_to(speed_share, move.shape)[free_flight]
    )
    np.testing.assert_allclose(np.linalg.norm(move, axis=-1)[free_flight], step)
    # After a wall the component that hit it reverses (the step after the bounce goes the other way).
    hit = clamped[:, 1:-1] & (move[:, :-1] != 0)
    assert hit.sum() > 100
    assert np.all(np.sign(move[:, 1:][hit]) == -np.sign(move[:, :-1][hit]))


def test_driven_ego_digit_turns_where_drawn_and_the_others_bounce_as_before():
    """Driven: the ego digit (most ink) turns to a random heading in about turn_probability of its frames, at
    the same speed; the other digits' paths are those of the bouncing data of the same seed."""
    config = tiny_config(num_sequences=400, ego_motion="driven", turn_probability=0.3)
    driven = generate_sequences(config, progress=False)
    bouncing = generate_sequences(dataclasses.replace(config, ego_motion="bounce"), progress=False)
    rows = np.arange(config.num_sequences)
    ego = np.argmax(driven.ink, axis=1)
    np.testing.assert_array_equal(driven.centers[rows, :, 1 - ego], bouncing.centers[rows, :, 1 - ego])
    assert not np.array_equal(driven.centers[rows, :, ego], bouncing.centers[rows, :, ego])

    free = config.canvas - DIGIT_SIZE
    step = config.speed * free

    def ego_moves(data):  # (N, T - 1, 2) whole pixels, and which start clear of the walls
        centres = data.centers[rows, :, ego].astype(np.float64)  # (N, T, 2)
        clear = (centres > DIGIT_SIZE / 2 + step + 1) & (centres < config.canvas - DIGIT_SIZE / 2 - step - 1)
        return np.diff(centres, axis=1), clear[:, :-1].all(-1)

    moves, clear = ego_moves(driven)
    # Away from the walls a step is the speed, to the flooring of positions (under 1 px per axis).
    assert np.abs(np.linalg.norm(moves, axis=-1)[clear] - step).max() < np.sqrt(2) + 1e-9

    def turn_rate(moves):  # consecutive steps that disagree by far more than flooring explains
        return (np.linalg.norm(np.diff(moves, axis=1), axis=-1) > 2 * np.sqrt(2)).mean()

    # A uniform new heading differs from the old by more than 46 degrees (what the 2.8 px threshold sees at
    # this speed) 74% of the time: 0.3 * 0.74 = 0.22 of the frames turn beyond the bounces.
    assert 0.17 < turn_rate(moves) - turn_rate(ego_moves(bouncing)[0]) < 0.27


def test_driven_with_no_turns_is_the_bouncing_data():
    config = tiny_config(num_sequences=50, ego_motion="driven", turn_probability=0.0)
    driven = generate_sequences(config, progress=False)
    bouncing = generate_sequences(dataclasses.replace(config, ego_motion="bounce"), progress=False)
    np.testing.assert_array_equal(driven.frames, bouncing.frames)


def test_generated_centres_follow_the_trajectory():
    generated = generate_sequences(tiny_config(num_sequences=50), progress=False)
    corner = generated.centers - DIGIT_SIZE / 2  # (N, T, D, 2) integer top-left positions
    assert np.array_equal(corner, np.round(corner)) and corner.min() >= 0 and corner.max() <= 36
    # Where no wall was touched the centre moves 3.6 px, up to the flooring of both components.
    inside = ((corner >= 1) & (corner <= 35)).all(axis=-1)
    away = inside[:, 1:] & inside[:, :-1]
    distance = np.linalg.norm(np.diff(corner, axis=1), axis=-1)[away]
    assert away.sum() > 500
    assert np.all(np.abs(distance - 3.6) < np.sqrt(2)) and abs(distance.mean() - 3.6) < 0.2


def test_frames_are_the_pixelwise_maximum_of_the_placed_digits():
    generated = generate_sequences(tiny_config(num_sequences=4), progress=False)
    images, labels = load_mnist_digits()
    corner = (generated.centers - DIGIT_SIZE / 2).astype(int)
    for n in range(4):
        redrawn = np.zeros((20, 64, 64), dtype=np.uint8)
        for t in range(20):
            for d in range(2):
                x, y = corner[n, t, d]
                patch = redrawn[t, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE]
                np.maximum(patch, images[generated.digit_index[n, d]], out=patch)
        assert np.array_equal(redrawn, generated.frames[n])
    assert np.array_equal(generated.labels, labels[generated.digit_index])
    expected_ink = images[generated.digit_index].sum(axis=(-2, -1)) / 255
    assert np.all(generated.ink > 0)
    np.testing.assert_allclose(generated.ink, expected_ink, rtol=1e-6)


def test_generated_store(tmp_path):
    config = tiny_config()
    build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    generated = generate_sequences(config, progress=False)
    store = tmp_path / "raw.zarr"
    assert np.array_equal(open_array(store, "frames", ndim=4, dtype=np.uint8)[:], generated.frames)
    assert np.array_equal(open_array(store, "centers", dtype=np.float32)[:], generated.centers)
    assert np.array_equal(open_array(store, "ink", dtype=np.float32)[:], generated.ink)
    assert np.array_equal(open_array(store, "labels", dtype=np.uint8)[:], generated.labels)
    assert attribute(store, "source") == "generate" and attribute(store, "has_ground_truth") is True
    assert (attribute(store, "seed"), attribute(store, "speed"), attribute(store, "digits")) == (0, 0.1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.zarr"]  # no temporaries left


# --- the url source, against a real local HTTP server -----------------------------------------------------


@dataclasses.dataclass
class Served:
    """What the test server sends, how it misbehaves, and what it was asked."""

    url: str
    payload: bytes = b""
    mode: str = "ok"  # ok | cut-once | short | missing | ignore-range
    ranges: list[str | None] = dataclasses.field(default_factory=list)
    cut_done: bool = False


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        served: Served = self.server.served  # type: ignore[attr-defined]
        requested = self.headers.get("Range")
        served.ranges.append(requested)
        if served.mode == "missing":
            self.send_error(404, "Not Found")
            return
        body = served.payload[:-1000] if served.mode == "short" else served.payload
        start = 0
        if requested and served.mode != "ignore-range":
            start = int(requested.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if served.mode == "cut-once" and not served.cut_done:
            served.cut_done = True
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.close_connection = True  # announce the whole body, then hang up half-way
            return
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Served]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served = Served(
        url=f"http://127.0.0.1:{httpd.server_address[1]}/mnist_test_seq.npy", payload=canonical_bytes()
    )
    httpd.served = served  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def url_config(served: Served, tmp_path: Path, **changes) -> DataConfig:
    return tiny_config(
        source="url",
        url=served.url,
        sha256=hashlib.sha256(served.payload).hexdigest(),
        size_bytes=len(served.payload),
        path=str(tmp_path / "cache" / "mnist_test_seq.npy"),
        **changes,
    )


def stored_frames(path: Path) -> np.ndarray:
    return open_array(path, "frames", ndim=4, dtype=np.uint8)[:]


def test_url_happy_path_is_sequence_first_and_not_downloaded_twice(server, tmp_path):
    config = url_config(server, tmp_path)
    build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    expected = np.load(io.BytesIO(server.payload)).transpose(1, 0, 2, 3)
    assert np.array_equal(stored_frames(tmp_path / "raw.zarr"), expected)
    assert attribute(tmp_path / "raw.zarr", "source") == "url"
    assert attribute(tmp_path / "raw.zarr", "sha256") == config.sha256
    assert attribute(tmp_path / "raw.zarr", "has_ground_truth") is False
    assert server.ranges == [None]
    build_raw_store(config, tmp_path / "again.zarr", progress=False)
    assert server.ranges == [None]  # the verified file was reused


def test_url_resumes_after_a_cut_connection(server, tmp_path):
    server.mode = "cut-once"
    config = url_config(server, tmp_path)
    partial = Path(config.path + ".partial")
    with pytest.raises(DownloadError, match="connection lost.*resume"):
        build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    assert partial.stat().st_size == len(server.payload) // 2
    assert not Path(config.path).exists() and not (tmp_path / "raw.zarr").exists()

    build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    assert server.ranges == [None, f"bytes={len(server.payload) // 2}-"]
    assert not partial.exists() and Path(config.path).read_bytes() == server.payload
    expected = np.load(io.BytesIO(server.payload)).transpose(1, 0, 2, 3)
    assert np.array_equal(stored_frames(tmp_path / "raw.zarr"), expected)


def test_url_starts_over_when_the_server_ignores_range(server, tmp_path):
    server.mode = "cut-once"
    config = url_config(server, tmp_path)
    with pytest.raises(DownloadError, match="connection lost"):
        download(config.url, config.path, config.sha256, config.size_bytes, progress=False)
    server.mode = "ignore-range"
    download(config.url, config.path, config.sha256, config.size_bytes, progress=False)
    assert server.ranges[-1] is not None and Path(config.path).read_bytes() == server.payload


def test_url_checksum_mismatch_leaves_nothing(server, tmp_path):
    config = dataclasses.replace(url_config(server, tmp_path), sha256="0" * 64)
    with pytest.raises(DownloadError, match=f"{server.url}: checksum mismatch, expected sha256 0+"):
        build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cache"]  # no file, no partial, no store


def test_url_truncated_body_is_an_error(server, tmp_path):
    server.mode = "short"
    config = url_config(server, tmp_path)
    with pytest.raises(DownloadError, match=f"truncated download, got {len(server.payload) - 1000} bytes"):
        build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cache"]


def test_url_http_error_names_the_status(server, tmp_path):
    server.mode = "missing"
    with pytest.raises(DownloadError, match="HTTP 404"):
        build_raw_store(url_config(server, tmp_path), tmp_path / "raw.zarr", progress=False)
    assert not (tmp_path / "raw.zarr").exists()


def test_a_corrupt_partial_prefix_fails_the_checksum(server, tmp_path):
    config = url_config(server, tmp_path)
    partial = Path(config.path + ".partial")
    partial.parent.mkdir()
    partial.write_bytes(b"x" * 1000)  # resumable-looking, but not the server's bytes
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(config.url, config.path, config.sha256, config.size_bytes, progress=False)
    assert server.ranges == ["bytes=1000-"]
    assert not partial.exists() and not Path(config.path).exists()


def test_a_wrong_existing_download_is_replaced(server, tmp_path):
    config = url_config(server, tmp_path)
    Path(config.path).parent.mkdir()
    Path(config.path).write_bytes(b"x" * len(server.payload))  # right size, wrong bytes
    download(config.url, config.path, config.sha256, config.size_bytes, progress=False)
    assert Path(config.path).read_bytes() == server.payload


# --- the file source --------------------------------------------------------------------------------------


def test_file_source_takes_the_first_sequences(tmp_path):
    path = tmp_path / "canonical.npy"
    path.write_bytes(canonical_bytes())
    config = tiny_config(source="file", path=str(path), num_sequences=4)
    build_raw_store(config, tmp_path / "raw.zarr", progress=False)
    expected = np.load(path)[:, :4].transpose(1, 0, 2, 3)
    assert np.array_equal(stored_frames(tmp_path / "raw.zarr"), expected)
    assert attribute(tmp_path / "raw.zarr", "path") == str(path)
    with pytest.raises(SourceError, match="num_sequences is 7 but the file holds only 6"):
        build_raw_store(dataclasses.replace(config, num_sequences=7), tmp_path / "more.zarr", progress=False)


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((20, 3, 64, 64), "float32", "expected dtype uint8, found float32"),
        ((20, 3, 64), "uint8", r"expected 4 dimensions \(time, sequence, H, W\), found shape \(20, 3, 64\)"),
        ((20, 3, 32, 32), "uint8", "expected 64x64 frames, found 32x32"),
        ((10, 3, 64, 64), "uint8", "expected 20 frames per sequence"),
    ],
)
def test_file_source_rejects_the_wrong_layout(tmp_path, shape, dtype, message):
    path = tmp_path / "bad.npy"
    path.write_bytes(canonical_bytes(shape, dtype))
    with pytest.raises(SourceError, match=f"{path}: {message}"):
        load_canonical_npy(path, frames=20)


def test_file_source_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(SourceError, match="file not found"):
        load_canonical_npy(tmp_path / "absent.npy")
    (tmp_path / "text.npy").write_text("not an array\n")
    with pytest.raises(SourceError, match="expected a .npy file"):
        load_canonical_npy(tmp_path / "text.npy")


def run_stage(tmp_path: Path, **data: object) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": params_section("data", **data)}))
    command = [
        sys.executable,
        str(STAGE),
        "--params",
        "params.yaml",
        "--output",
        "out/raw.zarr",
        "--no-progress",
    ]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_stage_fails_with_one_line_and_no_output(tmp_path):
    result = run_stage(tmp_path, source="file", path="absent.npy", num_sequences=6)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: absent.npy: file not found (data.path)"
    assert not (tmp_path / "out").exists()


def test_stage_writes_the_store(tmp_path):
    (tmp_path / "canonical.npy").write_bytes(canonical_bytes())
    result = run_stage(tmp_path, source="file", path="canonical.npy", num_sequences=6)
    assert result.returncode == 0, result.stderr
    assert "6 sequences of 20 frames 64x64 from 'file'" in result.stdout
    assert stored_frames(tmp_path / "out" / "raw.zarr").shape == (6, 20, 64, 64)


def test_errors_say_what_to_do(server, tmp_path):
    server.mode = "missing"
    with pytest.raises(DownloadError, match=r"HTTP 404 Not Found; check data\.url$"):
        build_raw_store(url_config(server, tmp_path), tmp_path / "raw.zarr", progress=False)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{probe.getsockname()[1]}/x.npy"
    with pytest.raises(DownloadError, match=r"cannot connect \(.*\); check data\.url and the network"):
        download(refused, tmp_path / "x.npy", "0" * 64, 10, progress=False)


def test_a_download_that_cannot_be_written_is_named_and_resumable(server, tmp_path):
    config = url_config(server, tmp_path)
    partial = Path(config.path + ".partial")
    partial.mkdir(parents=True)  # the partial file cannot be opened for writing: a directory stands there
    with pytest.raises(
        DownloadError, match=rf"^{partial}: cannot write the download \(.*\); free some space or fix"
    ):
        download(config.url, config.path, config.sha256, config.size_bytes, progress=False)
    partial.rmdir()
    download(config.url, config.path, config.sha256, config.size_bytes, progress=False)
    assert Path(config.path).read_bytes() == server.payload
