"""Pictures of predictions for people: PNG strips (rows of frames over time) and animated GIFs.

Frames are enlarged by an integer factor with nearest-neighbour, so each token stays a crisp square; past
(given) and future (predicted) frames are told apart by a coloured rule in strips and a coloured border in
animations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 24)
TEXT = (230, 230, 230)
PAST_COLOUR = (70, 170, 90)  # green: frames given to the model
FUTURE_COLOUR = (230, 140, 40)  # orange: frames the model produced
GAP = 2  # pixels between frames
RULE = 6  # width of the rule between past and future
LABEL_WIDTH = 120
HEADER = 18

Row = tuple[str, np.ndarray]  # (label, frames (T, H, W) in [0, 1])


def to_pixels(frames: np.ndarray, scale: int) -> np.ndarray:
    """Frames (..., H, W) in [0, 1] -> uint8 (..., H * scale, W * scale), nearest-neighbour enlarged."""
    pixels = np.rint(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)
    return pixels.repeat(scale, axis=-2).repeat(scale, axis=-1)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def strip(rows: Sequence[Row], past: int, scale: int = 4) -> Image.Image:
    """One row per (label, frames (T, H, W)), frames left to right in time; a rule after the `past` frames.

    A header numbers the frames and names the two parts; `past` = 0 draws no rule (generated sequences).
    """
    frames, height, width = rows[0][1].shape
    cell_width, cell_height = width * scale, height * scale
    rule = RULE if 0 < past < frames else 0
    canvas_width = LABEL_WIDTH + frames * (cell_width + GAP) + rule
    canvas_height = HEADER + len(rows) * (cell_height + GAP)
    image = Image.new("RGB", (canvas_width, canvas_height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()

    def left_of(t: int) -> int:
        return LABEL_WIDTH + t * (cell_width + GAP) + (rule if t >= past > 0 else 0)

    for t in range(frames):
        colour = PAST_COLOUR if t < past else FUTURE_COLOUR if past > 0 else TEXT
        draw.text((left_of(t) + 3, 3), f"t={t}", fill=colour, font=font)
    if rule:
        draw.rectangle(
            [left_of(past) - rule - GAP // 2, 0, left_of(past) - GAP // 2 - 1, canvas_height], FUTURE_COLOUR
        )
    for index, (label, sequence) in enumerate(rows):
        top = HEADER + index * (cell_height + GAP)
        draw.text((6, top + cell_height // 2 - 6), label, fill=TEXT, font=font)
        pixels = to_pixels(sequence, scale)  # (T, h, w)
        for t in range(frames):
            image.paste(Image.fromarray(pixels[t]).convert("RGB"), (left_of(t), top))
    return image


def animation(panels: Sequence[Row], past: int, scale: int = 4) -> list[Image.Image]:
    """One image per time step with the panels (label, frames (T, H, W)) side by side; the border of each
    panel is green while the frame is given (t < past) and orange once it is predicted."""
    frames, height, width = panels[0][1].shape
    border = 4
    cell_width, cell_height = width * scale + 2 * border, height * scale + 2 * border
    font = _font()
    pixels = [to_pixels(sequence, scale) for _, sequence in panels]
    images = []
    for t in range(frames):
        image = Image.new(
            "RGB", (len(panels) * (cell_width + GAP) + GAP, cell_height + 2 * HEADER), BACKGROUND
        )
        draw = ImageDraw.Draw(image)
        colour = PAST_COLOUR if t < past else FUTURE_COLOUR
        for index, (label, _) in enumerate(panels):
            left = GAP + index * (cell_width + GAP)
            draw.text((left + 2, 3), label, fill=TEXT, font=font)
            draw.rectangle([left, HEADER, left + cell_width - 1, HEADER + cell_height - 1], fill=colour)
            image.paste(Image.fromarray(pixels[index][t]).convert("RGB"), (left + border, HEADER + border))
        state = "given" if t < past else "predicted" if past > 0 else "generated"
        draw.text((GAP + 2, HEADER + cell_height + 3), f"t={t} {state}", fill=colour, font=font)
        images.append(image)
    return images


def save_png(image: Image.Image, path: str | Path) -> None:
    image.save(path, format="PNG", optimize=True)


def save_gif(images: Sequence[Image.Image], path: str | Path, frame_ms: int = 250) -> None:
    """An endlessly looping GIF; the last frame is held a little longer, so the loop's end shows."""
    durations = [frame_ms] * (len(images) - 1) + [frame_ms * 4]
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=list(images[1:]),
        duration=durations,
        loop=0,
        disposal=1,
    )
