"""The reference frame of each sequence: the connected components of its frames, grouped into digits, and
the frame where the ego digit (the most ink) stands apart, with its mask and centroid, where tracking starts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

MAX_COMPONENTS = 8  # per frame; a frame of Moving MNIST rarely has more than 3 components


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
