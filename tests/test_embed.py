"""``hymamba embed``: embeddings and stage maps of real image files, computed by hand for comparison,
through the Python API and the command line (real subprocesses), with bad files and bad requests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from imagefolder import make_image_folder, run_cli
from PIL import Image

from hymamba import create_model
from hymamba.apps.embed import embed, sidecar_path
from hymamba.errors import ConfigError, DataError
from hymamba.weights.io import save_safetensors

MODEL = "test_mambavision"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple:
    """(folder of 6 good images in 3 class folders + 2 corrupt files, weights file)."""
    root = tmp_path_factory.mktemp("embed")
    folder = make_image_folder(root / "images", {"apple": 2, "banana": 2, "cherry": 2}, size=48)
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=3)
    weights = save_safetensors(model.state_dict(), root / "model.safetensors")
    return folder, Path(weights)


def _by_hand(weights: Path, files: list) -> tuple:
    """Embeddings and pooled stage maps computed here, with torchvision's own resize/crop/normalise."""
    from safetensors.torch import load_file
    from torchvision import transforms as T

    model = create_model(MODEL, num_classes=3)
    model.load_state_dict(load_file(weights))
    model.eval()
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    tf = T.Compose([T.Resize(int(size / cfg["crop_pct"]), interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(size), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        feats = model.forward_features(x)
        emb = F.adaptive_avg_pool2d(feats, 1).flatten(1)
        maps = model.forward_intermediates(x, intermediates_only=True)
    return emb, maps


def test_embeddings_and_stage_maps_match_the_model(setup, tmp_path: Path) -> None:
    folder, weights = setup
    info = embed(MODEL, weights, [folder], tmp_path / "emb.safetensors", stages="pooled", batch_size=4)
    files = info["files"]
    assert len(files) == 6 and len(info["skipped"]) == 2  # the not-an-image and the truncated PNG
    assert all("zz_" in s["image"] and s["error"] for s in info["skipped"])
    from safetensors import safe_open

    with safe_open(tmp_path / "emb.safetensors", "pt") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["hymamba"])
    assert meta["files"] == files and set(arrays) == {"embeddings", "stage1", "stage2", "stage3", "stage4"}
    emb, maps = _by_hand(weights, files)
    assert arrays["embeddings"].shape == (6, 128) and arrays["embeddings"].dtype == torch.float32
    torch.testing.assert_close(arrays["embeddings"], emb, atol=1e-4, rtol=1e-4)
    for i, m in enumerate(maps):
        torch.testing.assert_close(arrays[f"stage{i + 1}"], m.mean((2, 3)), atol=1e-4, rtol=1e-4)
    side = json.loads(sidecar_path(tmp_path / "emb.safetensors").read_text())
    assert side["files"] == files and side["arrays"]["stage4"] == [6, 128] and side["stages"] == "pooled"
    assert side["preprocessing"]["input_size"] == [3, 64, 64]
    # whole maps, one batch at a time: the same numbers
    info = embed(MODEL, weights, files[:3], tmp_path / "maps.safetensors", stages="maps", batch_size=1)
    with safe_open(tmp_path / "maps.safetensors", "pt") as f:
        whole = [f.get_tensor(f"stage{i + 1}") for i in range(4)]
    assert [list(w.shape) for w in whole] == [[3, 16, 16, 16], [3, 32, 8, 8], [3, 64, 4, 4], [3, 128, 2, 2]]
    for w, m in zip(whole, maps):
        torch.testing.assert_close(w, m[:3], atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_cli_writes_npy_with_the_file_list(setup, tmp_path: Path) -> None:
    folder, weights = setup
    out = tmp_path / "vectors.npy"
    res = run_cli("embed", MODEL, str(folder / "banana"), str(folder / "apple" / "000.png"),
                  "--checkpoint", str(weights), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "3 images embedded (0 unreadable skipped)" in res.stdout and "embeddings (3, 128)" in res.stdout
    vectors = np.load(out, allow_pickle=False)
    side = json.loads((tmp_path / "vectors.json").read_text())
    assert vectors.shape == (3, 128) and side["files"][-1].endswith("apple/000.png")
    emb, _ = _by_hand(weights, side["files"])
    np.testing.assert_allclose(vectors, emb.numpy(), atol=1e-4, rtol=1e-4)
    # a folder with bad files: skipped, counted and named on stderr; the run goes on
    res = run_cli("embed", MODEL, str(folder), "--checkpoint", str(weights), "--out", str(tmp_path / "all.npy"))
    assert res.returncode == 0 and "6 images embedded (2 unreadable skipped)" in res.stdout
    assert res.stderr.count("hymamba: warning: skipped") == 2 and "zz_truncated.png" in res.stderr


def test_bad_requests_are_clear_and_write_nothing(setup, tmp_path: Path) -> None:
    folder, weights = setup
    with pytest.raises(ConfigError, match=r"holds one array.*\.safetensors"):
        embed(MODEL, weights, [folder], tmp_path / "x.npy", stages="maps")
    with pytest.raises(ConfigError, match="must end in .safetensors or .npy"):
        embed(MODEL, weights, [folder], tmp_path / "x.pt")
    with pytest.raises(DataError, match="none of the 2 image"):
        embed(MODEL, weights, [folder / "apple" / "zz_truncated.png", folder / "apple" / "zz_not_an_image.jpg"],
              tmp_path / "bad.npy")
    with pytest.raises(ConfigError, match="no weights"):
        embed(MODEL, None, [folder], tmp_path / "x.npy")
    assert list(tmp_path.iterdir()) == []
    res = run_cli("embed", MODEL, str(tmp_path / "missing"), "--checkpoint", str(weights), "--out",
                  str(tmp_path / "y.npy"))
    assert res.returncode == 2 and res.stderr.startswith("hymamba: error: not found")
