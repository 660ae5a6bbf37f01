"""Ego-digit trajectories tracked from frames alone, for sources without ground truth (the canonical file).

A Moving MNIST digit is a fixed image moved by whole pixels, and digits combine by a pixel-wise maximum, so
the thresholded frame is the union of the digits' thresholded masks. The tracker takes the ego digit's mask
from a frame where it stands apart (connected components), then finds it in every frame as the shift of
that mask that lands entirely on ink: exact while the digits overlap, touch or meet a wall.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft

from mnist_world.actions.reference_frame import choose_reference, ink_level

# Pixels searched around the constant-velocity prediction, each window only where the smaller ones found no
# exact fit: the prediction is usually within a pixel; a bounce or a bad prediction needs the far window.
SEARCH_WINDOWS = (0, 1, 2, 4, 8)
MISS_SHARE = 0.05  # the best fit leaves more than this share of the mask off the ink: the digit is lost


@dataclasses.dataclass(frozen=True)
class Track:
    """The ego digit's centre in every frame, and how sure the tracker is of it."""

    centre: np.ndarray  # float64 (N, T, 2): (x, y) in pixels of the tracked frames, pixel i spans [i, i + 1)
    found: np.ndarray  # bool (N, T): the ego's mask fits the frame's ink at `centre`
    ambiguous: np.ndarray  # bool (N, T): it fits as well 2+ pixels away, within the window searched
    reference: np.ndarray  # int (N,): the frame the ego's mask came from, -1 where no frame had it apart

    @property
    def lost(self) -> np.ndarray:
        """bool (N, T): frames whose centre is a guess (not found, or found in more than one place)."""
        return ~self.found | self.ambiguous


def pack_rows(mask: np.ndarray) -> np.ndarray:
    """bool (..., H, W) with W <= 64 -> uint64 (..., H): bit x of a row word is pixel x of that row."""
    width = mask.shape[-1]
    if width > 64:
        raise ValueError(f"the tracker packs a frame row into 64 bits; frames are {width} wide (max 64)")
    packed = np.packbits(mask, axis=-1, bitorder="little")  # (..., H, ceil(W / 8))
    padding = [(0, 0)] * (packed.ndim - 1) + [(0, 8 - packed.shape[-1])]
    return np.ascontiguousarray(np.pad(packed, padding)).view("<u8")[..., 0]


@dataclasses.dataclass(frozen=True)
class _Ego:
    """The ego digits' masks from their reference frames, packed for the search, and their centroids."""

    template: np.ndarray  # (N, R) uint64 rows, see `_template`
    top: np.ndarray  # (N,) the mask's top row in the reference frame
    left: np.ndarray  # (N,) its left column
    pixels: np.ndarray  # (N,) its pixel count
    centre: np.ndarray  # (N, 2) its ink centroid (x, y)

    @classmethod
    def from_mask(cls, mask: np.ndarray, centre: np.ndarray) -> _Ego:
        template, top, left = _template(mask)
        return cls(template, top, left, np.bitwise_count(template).sum(axis=1), centre)

    def find(
        self, active: np.ndarray, frame_rows: np.ndarray, predicted: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sequences `active` (A,) in their frames' packed rows (A, H), searched around the predicted centres
        (A, 2): (centre (A, 2), found (A,), ambiguous (A,))."""
        shift = np.rint(predicted - self.centre[active]).astype(np.int64)  # (A, 2) whole pixels
        placement = self.template[active], self.top[active], self.left[active]
        misses, offset, second = _widening_search(*placement, frame_rows, shift)
        return self.centre[active] + shift + offset, misses <= MISS_SHARE * self.pixels[active], second


def _predict(previous: np.ndarray, velocity: np.ndarray, box: float | None, size: np.ndarray) -> np.ndarray:
    """The constant-velocity prediction (A, 2) from the last centres and moves (A, 2), kept within a pixel of
    where a digit's box touches the walls of frames `size` (width, height)."""
    predicted = previous + velocity
    return predicted if box is None else np.clip(predicted, box / 2 - 1, size - box / 2 + 1)


def track_ego(
    frames: np.ndarray, threshold: float, min_area: int, digits: int, box: float | None = None
) -> Track:
    """Track the ego digit (the most ink) through uint8 frames (N, T, H, W), H and W at most 64.

    Centres are ink centroids in pixels of `frames`. `box`, when given, is the digits' box size in pixels of
    `frames` (DIGIT_SIZE at the raw canvas): a box centre stays box / 2 from the walls, and so, within a
    pixel, does a centred MNIST digit's ink centroid, which bounds the prediction at a bounce. Sequences whose
    digits never stand apart follow the dominant motion of the ink instead (all their frames lost).
    """
    return _track(frames, threshold, min_area, digits, box)[0]


def _track(
    frames: np.ndarray, threshold: float, min_area: int, digits: int, box: float | None
) -> tuple[Track, _Ego]:
    """`track_ego`, and the ego masks it searched for."""
    count, length, height, width = frames.shape
    reference, ego_mask, ego_centre = choose_reference(frames, threshold, min_area, digits)
    rows = pack_rows(frames > ink_level(threshold))  # (N, T, H) uint64
    ego = _Ego.from_mask(ego_mask, ego_centre)

    centre = np.zeros((count, length, 2))
    found = np.zeros((count, length), dtype=bool)
    ambiguous = np.zeros((count, length), dtype=bool)
    has = reference >= 0
    sequences = np.flatnonzero(has)
    centre[sequences, reference[sequences]] = ego_centre[sequences]
    found[sequences, reference[sequences]] = True

    # From the reference frame forward to the end, then backward to the start: each step one frame further
    # for every sequence at once, predicting from the two frames before it.
    for direction in (1, -1):
        for step in range(1, length):
            time = reference + direction * step
            active = np.flatnonzero(has & (time >= 0) & (time < length))
            if active.size == 0:
                continue
            t = time[active]
            previous = centre[active, t - direction]
            before = t - 2 * direction
            known = direction * (before - reference[active]) >= 0
            velocity = np.where(
                known[:, None], previous - centre[active, np.clip(before, 0, length - 1)], 0.0
            )
            # A bounce breaks the prediction by up to two steps: the widest search window covers it.
            predicted = _predict(previous, velocity, box, np.array([width, height]))
            centre[active, t], found[active, t], ambiguous[active, t] = ego.find(
                active, rows[active, t], predicted
            )

    merged = np.flatnonzero(~has)
    if merged.size:
        centre[merged] = dominant_motion(frames[merged], SEARCH_WINDOWS[-1])
    return Track(centre=centre, found=found, ambiguous=ambiguous, reference=reference), ego


@dataclasses.dataclass
class LiveTrack:
    """One sequence's ego digit followed as its frames arrive (a live stream, such as the playground's dream):
    `track_ego` on the first frames, then each new frame searched around the constant-velocity prediction
    from the two frames before it, as `track_ego` steps forward from its reference frame. The reference and
    the ego's mask stay those of the first frames, so one new frame costs one frame's search, not a window's.
    """

    ego: _Ego  # the ego's mask from the reference frame, for one sequence
    reference: int  # the frame it came from
    centres: list[np.ndarray]  # (x, y) in every frame so far
    level: np.uint8  # ink above this is the digits'
    box: float
    size: np.ndarray  # (width, height) of the frames

    @classmethod
    def start(
        cls, frames: np.ndarray, threshold: float, min_area: int, digits: int, box: float
    ) -> LiveTrack | None:
        """The live track of uint8 frames (T, H, W); None when no frame shows the ego digit apart."""
        track, ego = _track(frames[None], threshold, min_area, digits, box)
        if track.reference[0] < 0:
            return None
        size = np.array([frames.shape[2], frames.shape[1]])
        return cls(ego, int(track.reference[0]), list(track.centre[0]), ink_level(threshold), box, size)

    def add(self, frame: np.ndarray) -> np.ndarray:
        """The ego digit's centre (x, y) in the next uint8 frame (H, W)."""
        time = len(self.centres)
        previous = self.centres[-1]
        velocity = previous - self.centres[-2] if time - 2 >= self.reference else np.zeros(2)
        predicted = _predict(previous[None], velocity[None], self.box, self.size)
        centre, _, _ = self.ego.find(
            np.zeros(1, dtype=np.int64), pack_rows(frame > self.level)[None], predicted
        )
        self.centres.append(centre[0])
        return centre[0]


def _widening_search(
    template: np.ndarray, top: np.ndarray, left: np.ndarray, frame_rows: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_search` over SEARCH_WINDOWS, each window only for the sequences that no smaller one fitted exactly:
    an exact fit in a smaller window is the nearest one, which a wider search would pick too."""
    count = len(template)
    misses = np.full(count, np.iinfo(np.int64).max)
    offset = np.zeros((count, 2), dtype=np.int64)
    second = np.zeros(count, dtype=bool)
    for window in SEARCH_WINDOWS:
        retry = np.flatnonzero(misses > 0)
        if retry.size == 0:
            break
        again = (part[retry] for part in (template, top, left, frame_rows, shift))
        result = _search(*again, window)
        improved = result[0] < misses[retry]
        pick = retry[improved]
        misses[pick], offset[pick], second[pick] = (part[improved] for part in result)
    return misses, offset, second


def dominant_motion(frames: np.ndarray, window: int) -> np.ndarray:
    """(M, T, 2) path of the ink's dominant motion through uint8 frames (M, T, H, W), starting at (0, 0).

    Each step is the shift (at most `window` pixels) that best lines up one frame's ink with the next's: the
    peak of their cross-correlation, where the digit with the most ink dominates. A fallback for digits that
    never stand apart; overlapping digits pull the peak, so it is a rough guess.
    """
    count, length, height, width = frames.shape
    ink = frames.astype(np.float32) / 255
    # Zero padding by the window keeps the shifts of interest free of wrap-around.
    rows, columns = scipy.fft.next_fast_len(height + window), scipy.fft.next_fast_len(width + window)
    spectrum = scipy.fft.rfft2(ink, s=(rows, columns), workers=-1)  # (M, T, rows, columns // 2 + 1)
    cross = np.conj(spectrum[:, :-1]) * spectrum[:, 1:]  # transform of sum_p a_t(p) * a_t+1(p + d)
    # Invert at the (2 window + 1)^2 shifts of interest only, as two small matrix products instead of a
    # full inverse transform: a complex inverse DFT down the rows, then a real one (half spectrum) across.
    shifts = np.arange(-window, window + 1)
    down = np.exp(2j * np.pi * np.outer(shifts % rows, np.arange(rows)) / rows)  # (S, rows)
    half = columns // 2 + 1
    weight = np.full(half, 2.0)
    weight[0] = 1.0
    if columns % 2 == 0:
        weight[-1] = 1.0  # the Nyquist term appears once
    across = weight[:, None] * np.exp(2j * np.pi * np.outer(np.arange(half), shifts % columns) / columns)
    # Each product as one large matrix multiplication (stacked small ones would not use BLAS).
    pairs = count * (length - 1)
    stacked = np.moveaxis(cross.reshape(pairs, rows, half), 1, 0).reshape(rows, pairs * half)
    partial = (down.astype(np.complex64) @ stacked).reshape(len(shifts), pairs, half)  # (dy, pairs, half)
    partial = np.moveaxis(partial, 1, 0).reshape(pairs * len(shifts), half)
    near = np.real(partial @ across.astype(np.complex64))  # (pairs * dy, dx)
    near = near.reshape(count, length - 1, len(shifts), len(shifts))  # (M, T-1, dy, dx)
    near = near.reshape(count, length - 1, -1)
    best = np.argmax(near, axis=-1)
    step_y, step_x = np.divmod(best, len(shifts))
    steps = np.stack([shifts[step_x], shifts[step_y]], axis=-1).astype(np.float64)  # (M, T-1, 2)
    flat = near.max(axis=-1) - near.min(axis=-1) <= 1e-6 * np.abs(near).max(axis=-1)  # e.g. blank frames
    steps[flat] = 0.0
    return np.concatenate([np.zeros((count, 1, 2)), np.cumsum(steps, axis=1)], axis=1)


def _template(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ego masks (N, H, W) as packed rows moved to the word's low bits: (N, R) uint64 from the mask's
    top row, with that top row (N,) and left column (N,) to place them back."""
    packed = pack_rows(mask)  # (N, H)
    occupied = packed != 0
    top = np.argmax(occupied, axis=1)
    bottom = mask.shape[1] - 1 - np.argmax(occupied[:, ::-1], axis=1)
    height = int(np.max(np.where(occupied.any(axis=1), bottom - top + 1, 1)))
    index = np.clip(top[:, None] + np.arange(height)[None, :], 0, mask.shape[1] - 1)
    inside = (top[:, None] + np.arange(height)[None, :]) < mask.shape[1]
    template = np.where(inside, np.take_along_axis(packed, index, axis=1), np.uint64(0))
    left = np.argmax(mask.any(axis=1), axis=1)  # (N,)
    return template >> left[:, None].astype(np.uint64), top, left


def _search(
    template: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    frame_rows: np.ndarray,
    shift: np.ndarray,
    window: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best placement of each template within `window` pixels of `shift`.

    template (A, R) uint64 rows (low bits, see `_template`) whose reference placement has its top row at
    `top` (A,) and left column at `left` (A,); frame_rows (A, H) uint64; shift (A, 2) whole pixels (x, y)
    from the reference placement. Returns (misses (A,): mask pixels off the ink at the best placement,
    offset (A, 2) from `shift`, second (A,): another placement 2+ pixels away fits as well). Ties go to the
    placement nearest the prediction.
    """
    count, height = frame_rows.shape
    template_rows = template.shape[1]
    pixels = np.bitwise_count(template).sum(axis=1, dtype=np.int64)
    offsets = np.arange(-window, window + 1)
    # The template sits in the low bits, so bringing the frame under it is a right shift by the placement's
    # left column (a left shift, filling with off-canvas zeros, when that column is negative). Bits pushed out
    # lie where a template at most 28 + 2 * window wide has none, so one per-sequence shift to the first
    # placement, then the same scalar shifts for all sequences, give every placement.
    first = left + shift[:, 0] - window  # (A,) frame column under template bit 0 at the first placement
    amount = np.minimum(np.abs(first), 63).astype(np.uint64)[:, None]
    step = np.arange(len(offsets), dtype=np.uint64)[None, :, None]  # (1, dx, 1)
    misses = np.empty((count, len(offsets), len(offsets)), dtype=np.int64)  # (A, dy, dx)
    for j, dy in enumerate(offsets):
        row = top[:, None] + shift[:, 1:2] + dy + np.arange(template_rows)[None, :]  # (A, R)
        inside = (row >= 0) & (row < height)
        under = np.where(inside, np.take_along_axis(frame_rows, np.clip(row, 0, height - 1), axis=1), 0)
        under = np.where(first[:, None] >= 0, under >> amount, under << amount)
        under = np.where((np.abs(first) >= 64)[:, None], np.uint64(0), under)
        hits = np.bitwise_count(template[:, None, :] & (under[:, None, :] >> step))  # (A, dx, R)
        misses[:, j] = pixels[:, None] - hits.sum(axis=2, dtype=np.int64)
    distance = offsets[:, None] ** 2 + offsets[None, :] ** 2  # (dy, dx)
    # Fewest misses first, then nearest the prediction.
    score = misses * (4 * window * window + 1) + distance[None]
    best = np.argmin(score.reshape(count, -1), axis=1)
    best_y, best_x = np.divmod(best, len(offsets))
    lowest = misses.reshape(count, -1)[np.arange(count), best]
    far_from_best = (offsets[None, :, None] - offsets[best_y][:, None, None]) ** 2 + (
        offsets[None, None, :] - offsets[best_x][:, None, None]
    ) ** 2 >= 4
    second = ((misses <= lowest[:, None, None]) & far_from_best).any(axis=(1, 2))
    return lowest, np.stack([offsets[best_x], offsets[best_y]], axis=1), second
