"""Helpers shared by rankest's tests (the pattern of pyg-lib's ``testing.py``)."""

from __future__ import annotations

import torch


def devices() -> list[str]:
    """Every device the tests run on: ``cpu``, plus ``cuda`` when a GPU is visible."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    """A seeded generator, so each test draws fresh inputs without touching global RNG state."""
    return torch.Generator(device=device).manual_seed(seed)
