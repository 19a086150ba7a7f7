"""Shared test helpers: where the official fixtures live, and small models."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """The official fixtures: ``$HYMAMBA_FIXTURES`` or ``../shared/fixtures/official`` beside the repo."""
    env = os.environ.get("HYMAMBA_FIXTURES")
    path = Path(env) if env else REPO.parent / "shared" / "fixtures" / "official"
    if not (path / "variants.json").is_file():
        raise FileNotFoundError(
            f"official fixtures not found at {path}: set HYMAMBA_FIXTURES to the folder holding "
            "tiny_a.json, tiny_b.json and variants.json"
        )
    return path


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return fixtures_dir()


@pytest.fixture(scope="session")
def variants_json(fixtures: Path) -> Dict[str, Any]:
    with open(fixtures / "variants.json") as f:
        return json.load(f)


def load_case(name: str) -> Dict[str, Any]:
    """A fixture case: its JSON, checkpoint path and expected tensors."""
    from safetensors.torch import load_file

    folder = fixtures_dir()
    with open(folder / f"{name}.json") as f:
        case = json.load(f)
    case["checkpoint_path"] = folder / case["checkpoint"]
    case["tensors"] = load_file(str(folder / case["expected"]))
    return case


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def tiny_case_backbone(fixtures, monkeypatch):
    """The recorded official dense case (``upernet_tiny_a``): its backbone registered as the variant
    ``_tiny_case`` for the length of a test. Returns the case's spec (its JSON)."""
    import json

    from hymamba.models.variants import VARIANTS, Variant

    spec = json.loads((fixtures / "upernet_tiny_a.json").read_text())
    bb = {k: v for k, v in spec["backbone"].items() if k not in ("note", "out_indices")}
    bb["window_size"] = tuple(bb["window_size"])
    monkeypatch.setitem(VARIANTS, "_tiny_case", Variant("_tiny_case", bb,
                                                        dict(VARIANTS["test_mambavision"].pretrained_cfg)))
    return spec
