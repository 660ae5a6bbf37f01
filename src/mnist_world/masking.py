"""Training objectives as token masks and temporal attention masks.

Temporal masks are boolean (T_query, T_key) matrices, True where a frame may attend to another; the model
takes them as given. Token masks are boolean (B, T, H, W), True where the input token is hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(frames: int, past: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(frames, past + frames): frame i (at time past + i) sees every frame up to and including itself."""
    query_time = torch.arange(past, past + frames, device=device)[:, None]
    key_time = torch.arange(past + frames, device=device)[None, :]
    return key_time <= query_time


def identity_mask(frames: int, device: torch.device | str | None = None) -> Tensor:
    """(frames, frames): each frame sees only itself."""
    return torch.eye(frames, dtype=torch.bool, device=device)


def full_mask(frames: int, past: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(frames, past + frames): bidirectional attention across all frames."""
    return torch.ones(frames, past + frames, dtype=torch.bool, device=device)
