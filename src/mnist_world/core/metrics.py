"""Pixel metrics of predicted frames against the continuous ground truth (per frame), and the trivial
baselines scored beside every model.

Pixel metrics compare frames in [0, 1] of shape (N, F, H, W) and return one value per frame (N, F):
- `mse`: mean squared error over a frame's pixels.
- `mse_sum`: squared error summed over a frame's pixels, as public Moving MNIST tables (OpenSTL) report MSE
  (theirs over 64x64 frames, ours over the token resolution: context, not a target).
- `psnr`: 10 log10(1 / mse) per frame (data_range 1), averaged afterwards as OpenSTL does; an exact frame
  scores 100 dB (mse floored at 1e-10) rather than infinity.
- `ssim`: scikit-image `structural_similarity(data_range=1, win_size=7)` (uniform 7x7 window), mean over
  the valid area. 7 is scikit-image's default: on a 32x32 frame it spans half a digit's 14 px box, local
  enough to judge strokes, and leaves a 26x26 valid area. The original's global SSIM is a different
  quantity and not comparable.
- `iou`: intersection over union of the ink masks (pixels above INK_THRESHOLD) of prediction and truth; 1
  where both are empty. It scores a dream by where its ink is: a fading or blurred digit leaves the mask,
  a crisp digit one pixel off keeps most of it, which MSE ranks the other way round.
- `ink`, `true_ink`: the ink mass (sum of pixel values) of the prediction and of the truth. Their ratio,
  `ink_ratio`, is formed after averaging (a ratio of sums over sequences, see `per_horizon`), so a few
  nearly empty true frames cannot dominate it: 1 keeps the truth's ink, below 1 the dream fades.

INK_THRESHOLD = 0.3 on [0, 1] pixels: the tracker marks ink above 0.2 at 64x64, where strokes are 2-3 px
wide and sharp; area downsampling to the token resolution averages a stroke's edge with the background, so
0.2 would also mark that grey rim (and the haze of a sampler's low levels), widening every mask by a pixel
and flattering a blurred answer. 0.3 keeps the cores of the strokes and still marks a digit one level
above the background at 16 levels (1/16 = 0.06 apart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

SSIM_WINDOW = 7
INK_THRESHOLD = 0.3  # a pixel above this belongs to a digit's ink mask (see the module doc)
PSNR_FLOOR_MSE = 1e-10  # an exact frame scores 10 log10(1e10) = 100 dB

# --- Pixel metrics, one value per frame ------------------------------------------------------------------


def _squared_error(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    difference = prediction.astype(np.float64) - target.astype(np.float64)
    return difference * difference  # (N, F, H, W)


def mse(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): mean squared error over each frame's pixels."""
    return _squared_error(prediction, target).mean(axis=(-2, -1))


def mse_sum(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): squared error summed over each frame's pixels (the OpenSTL convention)."""
    return _squared_error(prediction, target).sum(axis=(-2, -1))


def psnr_from_mse(mse: np.ndarray | float) -> np.ndarray:
    """PSNR in dB of frames in [0, 1] (data_range 1) with this MSE; an exact frame scores 100 dB."""
    return 10.0 * np.log10(1.0 / np.maximum(mse, PSNR_FLOOR_MSE))


def psnr(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): peak signal-to-noise ratio of each frame in dB, data_range 1."""
    return psnr_from_mse(mse(prediction, target))


def ssim(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): scikit-image SSIM of each frame (data_range 1, 7x7 uniform window), mean over the valid area.

    All frames go through one call as the channels of a stack; the full SSIM map then gives each frame's
    mean over the area the window fits in, which is exactly what a per-frame call returns.
    """
    lead = prediction.shape[:-2]
    height, width = prediction.shape[-2:]
    stack = prediction.reshape(-1, height, width).astype(np.float64)  # (M, H, W)
    reference = target.reshape(-1, height, width).astype(np.float64)
    if len(stack) == 1:  # a single channel is not a stack to scikit-image
        _, full = structural_similarity(
            stack[0], reference[0], data_range=1.0, win_size=SSIM_WINDOW, full=True
        )
        full = full[None]
    else:
        _, full = structural_similarity(
            stack, reference, data_range=1.0, win_size=SSIM_WINDOW, channel_axis=0, full=True
        )  # (M, H, W)
    pad = (SSIM_WINDOW - 1) // 2
    return full[:, pad : height - pad, pad : width - pad].mean(axis=(1, 2)).reshape(lead)


def iou(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): intersection over union of the ink masks (pixels > INK_THRESHOLD); 1 where both are empty."""
    # Compared in float64: a float32 pixel of 0.3 (0.30000001) is ink whatever dtype the frames come in.
    predicted = np.asarray(prediction, dtype=np.float64) > INK_THRESHOLD
    true = np.asarray(target, dtype=np.float64) > INK_THRESHOLD
    intersection = (predicted & true).sum(axis=(-2, -1))
    union = (predicted | true).sum(axis=(-2, -1))
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def ink(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): the prediction's ink mass, the sum of its pixel values."""
    return prediction.astype(np.float64).sum(axis=(-2, -1))


def true_ink(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, F): the truth's ink mass, the denominator of `ink_ratio`."""
    return target.astype(np.float64).sum(axis=(-2, -1))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mse": mse,
    "mse_sum": mse_sum,
    "psnr": psnr,
    "ssim": ssim,
    "iou": iou,
    "ink": ink,
    "true_ink": true_ink,
}
# Derived after averaging: name -> (numerator, denominator) metrics, a ratio of their means (= of their sums)
RATIOS = {"ink_ratio": ("ink", "true_ink")}


def frame_metrics(
    prediction: np.ndarray, target: np.ndarray, names: Iterable[str] = tuple(METRICS)
) -> dict[str, np.ndarray]:
    """The named metrics of every frame: {name: (N, F)}. Unknown names fail before anything is computed."""
    names = list(names)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric '{unknown[0]}' (known: {', '.join(METRICS)})")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    return {name: METRICS[name](prediction, target) for name in names}


# --- Baselines --------------------------------------------------------------------------------------------


def baselines(
    past_frames: np.ndarray,
    future_tokens: np.ndarray,
    decode: Callable[[np.ndarray], np.ndarray],
    blur_scale: float | None = None,
) -> dict[str, np.ndarray]:
    """The trivial answers, each (N, F, H, W) in [0, 1], scored like the model.

    quantization: the true future tokens decoded by `decode` (the floor of any token model); copy_last: the
    last past frame (continuous) held still; blank: an empty frame; blurred_last (with a `blur_scale`, see
    `fit_blur_scale`): the last past frame blurred more at every horizon, the best a motion-blind answer
    does in MSE.
    """
    count, frames = future_tokens.shape[:2]
    last = past_frames[:, -1:].astype(np.float32)  # (N, 1, H, W)
    answers = {
        "quantization": decode(future_tokens),
        "copy_last": np.broadcast_to(last, (count, frames, *last.shape[2:])),
        "blank": np.zeros(future_tokens.shape, dtype=np.float32),
    }
    if blur_scale is not None:
        answers["blurred_last"] = blurred_last(past_frames, frames, blur_scale)
    return answers


def blurred_last(past_frames: np.ndarray, frames: int, scale: float) -> np.ndarray:
    """(N, F, H, W): the last past frame under a Gaussian blur of sigma = scale * h pixels at horizon h (zero
    outside the frame): the answer of a forecaster that knows where the ink is now and grows unsure of it."""
    last = past_frames[:, -1].astype(np.float64)  # (N, H, W)
    blurred = [
        gaussian_filter(last, sigma=(0.0, scale * h, scale * h), mode="constant")
        for h in range(1, frames + 1)
    ]
    return np.stack(blurred, axis=1).astype(np.float32)


BLUR_SCALES = np.round(np.arange(0.0, 1.51, 0.05), 2)  # sigma per horizon step, pixels of the frames


def fit_blur_scale(frames: np.ndarray, past: int, scales: Iterable[float] = BLUR_SCALES) -> float:
    """The scale of `blurred_last` with the least MSE over the future of frames (N, T, H, W): fitted once on
    validation sequences, so the baseline scored on the test split is tuned on neither it nor the model."""
    scales = list(scales)
    errors = [
        float(mse(blurred_last(frames[:, :past], frames.shape[1] - past, s), frames[:, past:]).mean())
        for s in scales
    ]
    return float(scales[int(np.argmin(errors))])


def frame_table(scores: Mapping[str, Mapping[str, np.ndarray]], first_sequence: int = 0) -> pd.DataFrame:
    """Per-frame values {method: {metric: (N, F)}} -> a long table, one row per (method, sequence, horizon)
    with a column per metric; horizon counts future frames from 1."""
    tables = []
    for method, metrics in scores.items():
        count, frames = next(iter(metrics.values())).shape
        index = pd.MultiIndex.from_product(
            [[method], range(first_sequence, first_sequence + count), range(1, frames + 1)],
            names=["method", "sequence", "horizon"],
        )
        columns = {name: values.reshape(-1) for name, values in metrics.items()}  # (N * F,) each
        tables.append(pd.DataFrame(columns, index=index))
    return pd.concat(tables).reset_index()


def _with_ratios(means: pd.DataFrame) -> pd.DataFrame:
    """Means with each RATIOS entry formed from its two columns, which are then dropped (a ratio of means
    over the same rows is the ratio of sums)."""
    for name, (numerator, denominator) in RATIOS.items():
        if numerator in means and denominator in means:
            means = means.assign(**{name: means[numerator] / means[denominator]})
            means = means.drop(columns=[numerator, denominator])
    return means


def per_horizon(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of every metric per horizon and method: columns `horizon` and `<method>_<metric>`, grouped by
    metric, methods in the order they first appear. `ink_ratio` is the ratio of the ink sums over sequences
    (predicted / true) at that horizon."""
    metrics = [column for column in table.columns if column not in ("method", "sequence", "horizon")]
    methods = list(dict.fromkeys(table["method"]))
    means = _with_ratios(table.groupby(["horizon", "method"], sort=False)[metrics].mean())
    means = means.unstack("method")
    names = list(dict.fromkeys(name for name, _ in means.columns))
    columns = {
        f"{method}_{name}": means[(name, method)]
        for name in names
        for method in methods
        if (name, method) in means
    }
    return pd.DataFrame(columns).rename_axis("horizon").reset_index()


def overall(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Mean of every metric per method over all sequences and horizons: {method: {metric: value}};
    `ink_ratio` is the ratio of the ink sums over every sequence and horizon."""
    metrics = [column for column in table.columns if column not in ("method", "sequence", "horizon")]
    means = _with_ratios(table.groupby("method", sort=False)[metrics].mean())
    return {method: {name: float(value) for name, value in row.items()} for method, row in means.iterrows()}
