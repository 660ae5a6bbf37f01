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
from scipy import ndimage

MAX_COMPONENTS = 8  # per frame; a frame of Moving MNIST rarely has more than 3 components
# Pixels searched around the constant-velocity prediction, each window only where the smaller ones found no
# exact fit: the prediction is usually within a pixel; a bounce or a bad prediction needs the far window.
SEARCH_WINDOWS = (0, 1, 2, 4, 8)
MISS_SHARE = 0.05  # the best fit leaves more than this share of the mask off the ink: the digit is lost


@dataclasses.dataclass(frozen=True)
class Components:
    """Connected components of a stack of frames, largest (most ink) first, padded to K per frame."""

    mass: np.ndarray  # float64 (M, K): ink of the component (sum of its pixel values / 255), 0 if absent
    centre: np.ndarray  # float64 (M, K, 2): ink centroid (x, y), pixel i spanning [i, i + 1)
    label: np.ndarray  # int64 (M, K): the component's id in `labels`
    present: np.ndarray  # bool (M, K)
    labels: np.ndarray  # int32 (M, H, W): component id of every pixel, 0 for background

    @property
    def count(self) -> np.ndarray:
        """int (M,): components per frame."""
        return self.present.sum(axis=-1)


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


def frame_components(frames: np.ndarray, threshold: float, min_area: int) -> Components:
    """Label the pixels above `threshold` (x / 255) of every frame (8-connected) and measure each component.

    `frames` is uint8 (M, H, W). One `ndimage.label` call labels the whole stack (no connectivity across
    frames), and the statistics come from one pass over the foreground pixels only (a few % of the frame).
    Components smaller than `min_area` pixels are dropped as noise.
    """
    count, height, width = frames.shape
    mask = frames > ink_level(threshold)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within a frame, nothing across frames
    labels, total = ndimage.label(mask, structure=structure)

    foreground = np.flatnonzero(mask)  # indices into (M, H, W)
    label = labels.ravel()[foreground]
    ink = frames.ravel()[foreground].astype(np.float64) / 255
    size = total + 1  # label 0 is the background
    area = np.bincount(label, minlength=size)
    mass = np.bincount(label, weights=ink, minlength=size)
    moment_x = np.bincount(label, weights=ink * (foreground % width + 0.5), minlength=size)
    moment_y = np.bincount(label, weights=ink * ((foreground // width) % height + 0.5), minlength=size)
    frame_of = np.zeros(size, dtype=np.int64)
    frame_of[label] = foreground // (height * width)

    keep = np.flatnonzero(area >= min_area)
    keep = keep[keep > 0]
    # Rank the components of each frame by ink, largest first, and scatter them into (M, K).
    order = keep[np.lexsort((-mass[keep], frame_of[keep]))]
    frame_of = frame_of[order]
    rank = np.arange(len(order)) - np.searchsorted(frame_of, frame_of, side="left")
    fits = rank < MAX_COMPONENTS
    order, frame_of, rank = order[fits], frame_of[fits], rank[fits]

    padded_mass = np.zeros((count, MAX_COMPONENTS))
    padded_centre = np.zeros((count, MAX_COMPONENTS, 2))
    padded_label = np.zeros((count, MAX_COMPONENTS), dtype=np.int64)
    present = np.zeros((count, MAX_COMPONENTS), dtype=bool)
    padded_mass[frame_of, rank] = mass[order]
    padded_centre[frame_of, rank] = np.stack([moment_x[order], moment_y[order]], axis=-1) / mass[order, None]
    padded_label[frame_of, rank] = order
    present[frame_of, rank] = True
    return Components(padded_mass, padded_centre, padded_label, present, labels)


def ink_level(threshold: float) -> np.uint8:
    """The uint8 value a pixel must exceed to count as ink at `threshold` (a share of 255)."""
    return np.uint8(min(255, int(np.floor(threshold * 255))))


def pack_rows(mask: np.ndarray) -> np.ndarray:
    """bool (..., H, W) with W <= 64 -> uint64 (..., H): bit x of a row word is pixel x of that row."""
    width = mask.shape[-1]
    if width > 64:
        raise ValueError(f"the tracker packs a frame row into 64 bits; frames are {width} wide (max 64)")
    packed = np.packbits(mask, axis=-1, bitorder="little")  # (..., H, ceil(W / 8))
    padding = [(0, 0)] * (packed.ndim - 1) + [(0, 8 - packed.shape[-1])]
    return np.ascontiguousarray(np.pad(packed, padding)).view("<u8")[..., 0]


# --- The reference frame: where the ego digit stands apart ------------------------------------------------


def choose_reference(
    frames: np.ndarray, threshold: float, min_area: int, digits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence, a frame where all digits stand apart, and the ego digit's mask and centroid in it.

    Returns (reference frame (N,), -1 where the digits never stand apart; ego mask bool (N, H, W); ego
    centroid (N, 2)). A frame qualifies when it has at least `digits` components; the one with the most
    components (a digit with a broken stroke then has its pieces apart from the other digits too), then with
    the digits furthest apart, is taken. Pieces are grouped into `digits` digits by proximity, and the ego is
    the digit with the most ink, its faint edge (below the threshold, within a pixel) included, as the
    ground truth counts ink. A few frames are labelled first, the rest only where none of those qualifies.
    """
    count, length, height, width = frames.shape
    reference = np.full(count, -1)
    quality = np.full(count, -np.inf)
    ego_mask = np.zeros((count, height, width), dtype=bool)
    ego_centre = np.zeros((count, 2))
    for times in _reference_rounds(length):
        sequences = np.flatnonzero(reference < 0)
        if sequences.size == 0:
            break
        stack = frames[sequences[:, None], times[None, :]].reshape(-1, height, width)
        components = frame_components(stack, threshold, min_area)
        group, _, group_centre, alive = group_pieces(components, digits)
        distance = np.linalg.norm(group_centre[:, :, None] - group_centre[:, None, :], axis=-1)  # (F, K, K)
        apart = alive[:, :, None] & alive[:, None, :] & ~np.eye(MAX_COMPONENTS, dtype=bool)
        separation = np.where(apart, distance, np.inf).min(axis=(1, 2))
        separation = np.where(np.isfinite(separation), separation, 0.0)  # a single digit
        # More pieces apart first, then further apart (a frame is at most ~90 pixels across).
        score = np.where(components.count >= digits, components.count * 1000.0 + separation, -np.inf)
        score = score.reshape(len(sequences), len(times))
        best = np.argmax(score, axis=1)
        better = np.flatnonzero(score[np.arange(len(sequences)), best] > quality[sequences])
        if better.size == 0:
            continue
        picked = sequences[better]
        rows = better * len(times) + best[better]
        reference[picked] = times[best[better]]
        quality[picked] = score[better, best[better]]
        ego = _most_ink(stack[rows], components, rows, group[rows], alive[rows])  # (P,) group slot
        members = (group[rows] == ego[:, None]) & components.present[rows]  # (P, K)
        is_ego = np.zeros(components.labels.max() + 1, dtype=bool)
        is_ego[components.label[rows][members]] = True
        is_ego[0] = False
        ego_mask[picked] = is_ego[components.labels[rows]]
        ego_centre[picked] = group_centre[rows, ego]
    return reference, ego_mask, ego_centre


def _reference_rounds(length: int) -> list[np.ndarray]:
    """Frames to label, round by round: the ends and the middle, then the quarters, then the rest.

    Each round labels only sequences that no earlier round served; three frames serve nine sequences in ten.
    """
    rounds, seen = [], set()
    for times in ((0, (length - 1) // 2, length - 1), (length // 4, (3 * length) // 4), tuple(range(length))):
        fresh = sorted(set(times) - seen)
        seen.update(fresh)
        if fresh:
            rounds.append(np.array(fresh))
    return rounds


def group_pieces(components: Components, digits: int) -> tuple[np.ndarray, ...]:
    """Group each frame's components into at most `digits` digits: the lightest joins the nearest, repeatedly.

    Returns (group (F, K): the slot of the group each slot belongs to, group mass (F, K), group centroid
    (F, K, 2), alive (F, K): slot heads a group), all indexed by the head slot.
    """
    frames = len(components.mass)
    group = np.broadcast_to(np.arange(MAX_COMPONENTS), (frames, MAX_COMPONENTS)).copy()
    mass = components.mass.copy()
    centre = components.centre.copy()
    alive = components.present.copy()
    for _ in range(MAX_COMPONENTS):
        merge = np.flatnonzero(alive.sum(axis=1) > digits)
        if merge.size == 0:
            break
        lightest = np.argmin(np.where(alive[merge], mass[merge], np.inf), axis=1)
        distance = np.linalg.norm(centre[merge] - centre[merge, lightest][:, None], axis=-1)
        distance[~alive[merge]] = np.inf
        distance[np.arange(merge.size), lightest] = np.inf
        nearest = np.argmin(distance, axis=1)
        total = mass[merge, nearest] + mass[merge, lightest]
        centre[merge, nearest] = (
            centre[merge, nearest] * mass[merge, nearest, None]
            + centre[merge, lightest] * mass[merge, lightest, None]
        ) / total[:, None]
        mass[merge, nearest] = total
        alive[merge, lightest] = False
        moved = group[merge] == lightest[:, None]
        group[merge] = np.where(moved, nearest[:, None], group[merge])
    return group, mass, centre, alive


def _most_ink(
    frames: np.ndarray, components: Components, rows: np.ndarray, group: np.ndarray, alive: np.ndarray
) -> np.ndarray:
    """The head slot of the group with the most ink in each of `frames` (F, H, W), faint edges included."""
    labels = components.labels[rows]  # (F, H, W)
    # Grow each component by a pixel over the background, so the faint edge pixels count as its ink.
    grown = labels.copy()
    for axis in (1, 2):
        ahead, behind = [slice(None)] * 3, [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        source = grown.copy()
        np.maximum(grown[tuple(ahead)], source[tuple(behind)], out=grown[tuple(ahead)])
        np.maximum(grown[tuple(behind)], source[tuple(ahead)], out=grown[tuple(behind)])
    inked = np.flatnonzero(frames)
    owner = np.where(labels.ravel()[inked] > 0, labels.ravel()[inked], grown.ravel()[inked])
    ink = np.bincount(owner, weights=frames.ravel()[inked], minlength=labels.max() + 1)
    slot_ink = np.where(components.present[rows], ink[components.label[rows]], 0.0)  # (F, K)
    group_ink = np.zeros_like(slot_ink)
    np.add.at(group_ink, (np.arange(len(rows))[:, None].repeat(MAX_COMPONENTS, 1), group), slot_ink)
    return np.argmax(np.where(alive, group_ink, -np.inf), axis=1)


# --- Following the ego's mask through the frames ------------------------------------------------------------


def track_ego(
    frames: np.ndarray, threshold: float, min_area: int, digits: int, box: float | None = None
) -> Track:
    """Track the ego digit (the most ink) through uint8 frames (N, T, H, W), H and W at most 64.

    Centres are ink centroids in pixels of `frames`. `box`, when given, is the digits' box size in pixels of
    `frames` (DIGIT_SIZE at the raw canvas): a box centre stays box / 2 from the walls, and so, within a
    pixel, does a centred MNIST digit's ink centroid, which bounds the prediction at a bounce. Sequences whose
    digits never stand apart follow the dominant motion of the ink instead (all their frames lost).
    """
    count, length, height, width = frames.shape
    reference, ego_mask, ego_centre = choose_reference(frames, threshold, min_area, digits)
    rows = pack_rows(frames > ink_level(threshold))  # (N, T, H) uint64
    template, top, left = _template(ego_mask)  # (N, R) uint64, (N,), (N,)
    pixels = np.bitwise_count(template).sum(axis=1)  # (N,)

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
            predicted = previous + velocity
            if box is not None:
                predicted = np.clip(predicted, box / 2 - 1, np.array([width, height]) - box / 2 + 1)
            shift = np.rint(predicted - ego_centre[active]).astype(np.int64)  # (A, 2) whole pixels
            frame_rows = rows[active, t]  # (A, H)
            placement = template[active], top[active], left[active]
            misses = np.full(active.size, np.iinfo(np.int64).max)
            offset = np.zeros((active.size, 2), dtype=np.int64)
            second = np.zeros(active.size, dtype=bool)
            # Widen the search only where no exact fit turned up yet: an exact fit in a smaller window is
            # the nearest one, which a wider search would pick too.
            for window in SEARCH_WINDOWS:
                retry = np.flatnonzero(misses > 0)
                if retry.size == 0:
                    break
                again = [part[retry] for part in placement]
                result = _search(*again, frame_rows[retry], shift[retry], window)
                improved = result[0] < misses[retry]
                pick = retry[improved]
                misses[pick], offset[pick], second[pick] = (part[improved] for part in result)
            centre[active, t] = ego_centre[active] + shift + offset
            found[active, t] = misses <= MISS_SHARE * pixels[active]
            ambiguous[active, t] = second

    merged = np.flatnonzero(~has)
    if merged.size:
        centre[merged] = dominant_motion(frames[merged], SEARCH_WINDOWS[-1])
    return Track(centre=centre, found=found, ambiguous=ambiguous, reference=reference)


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
