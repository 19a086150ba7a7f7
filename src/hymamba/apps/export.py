"""ONNX export of a MambaVision model (classifier, backbone or segmenter), checked with ONNX Runtime.

Under export, whatever ``scan_impl``, the selective scan runs as its sequential reference made of
standard ops (the compiled kernels are not ONNX operators): unrolled over the window's tokens in a
fixed-size file, one ONNX ``Scan`` loop in an any-size file.

Two kinds of file (:func:`export_onnx`):

* **fixed size** (the default): the TorchScript exporter traces the model at one H x W; every size
  taken from a shape (window padding, window counts) is baked in as a constant, so the file runs at
  that size only. The batch is dynamic. Needs only ``onnx``.
* **any size** (``dynamic_size=True``): ``torch.export`` traces the model with symbolic N, H and W
  and the dynamo exporter (``onnxscript``) writes one graph in which the window padding, the window
  counts, the PPM's pooling bins and every resize are computed from the input's shape: one file
  serves every H x W. The model code keeps this possible: under export the levels pad (by 0 where
  nothing is missing) and crop unconditionally, and the export runs with ``backed_size_oblivious``
  so that no size (a single window, say) is specialised on. The scan is one ONNX ``Scan`` per mixer
  (:func:`hymamba.ops.scan_onnx.scan_loop`) instead of an unrolled chain, which keeps the export
  fast (MambaVision-T: about 30 s; unrolled, torch.export had not finished after 28 minutes).

Valid input sizes: any H, W >= 1. The stem and the downsamples are 3x3 stride-2 convolutions with
padding 1 (each halves a side, rounding up), and levels 2-3 pad their maps up to whole windows, so no
side needs to be a multiple of 32 (or of anything); the stride-32 map has ceil(H/32) x ceil(W/32)
cells. Tested from 32 x 32 and 33 x 47 up to 256 x 320.

Which to choose: measured on MambaVision-T (``benchmarks/bench_onnx_sizes.py``, README's ONNX
section) the any-size file runs as fast as a fixed one at each size and is no larger, so choose it
whenever sizes vary. The fixed file stays the default because it needs neither onnxscript nor
torch.export's private switches (``backed_size_oblivious``, the ``scan`` higher-order op), is a
plain graph of standard operators without a loop, and is what existing files, scripts and the int8
path were written for.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hymamba.errors import ConfigError
from hymamba.utils.io import atomic_write

__all__ = ["DEFAULT_OPSET", "check_onnx", "check_sizes", "compare_onnx", "export_onnx", "onnx_output_names"]


#: the opsets the fixed-size export supports: attention needs 14; the TorchScript exporter stops at 20
MIN_OPSET, MAX_OPSET = 14, 20
#: the any-size export's opsets: the dynamo exporter writes 18 and newer
MIN_DYNAMIC_OPSET, MAX_DYNAMIC_OPSET = 18, 23
#: the default opset of each kind of file (fixed size, any size)
DEFAULT_OPSET = {False: 17, True: 18}


def onnx_output_names(model: nn.Module, n_outputs: int) -> List[str]:
    """The exported outputs' names: ``logits`` (a classifier or segmenter), ``stage1..stage4`` for a
    backbone's maps (level i's map is ``stage{i+1}``, as in the official fixtures), else ``output{k}``."""
    if n_outputs == 1:
        return ["logits"]
    indices = getattr(model, "out_indices", None)
    if indices is not None and len(indices) == n_outputs:
        return [f"stage{i + 1}" for i in indices]
    return [f"output{k}" for k in range(n_outputs)]


def _check_image_size(image_size: Any, dynamic_size: bool) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
        ok = (h, w) == tuple(image_size)
    except (TypeError, ValueError):
        ok = False
    smallest = 2 if dynamic_size else 1
    if not ok or min(h, w) < smallest:
        why = (" (the any-size export traces with this example; torch.export fixes a side of 1 as a constant)"
               if dynamic_size else "")
        raise ConfigError(f"image_size must be two whole numbers (H, W) of at least {smallest}{why}, got "
                          f"{image_size!r}; pass e.g. (224, 224)")
    return h, w


def _check_opset(opset: int, dynamic_size: bool) -> None:
    low, high = (MIN_DYNAMIC_OPSET, MAX_DYNAMIC_OPSET) if dynamic_size else (MIN_OPSET, MAX_OPSET)
    if not low <= opset <= high:
        if dynamic_size:
            raise ConfigError(f"the any-size export writes opsets {low} to {high} (the dynamo exporter), got "
                              f"{opset}; the default {DEFAULT_OPSET[True]} suits ONNX Runtime")
        raise ConfigError(f"opset must be between {low} (scaled dot-product attention) and {high} "
                          f"(the TorchScript exporter's newest), got {opset}; the default "
                          f"{DEFAULT_OPSET[False]} suits ONNX Runtime (or export any-size for opset 18+)")


@contextlib.contextmanager
def _size_oblivious() -> Iterator[None]:
    """torch.export without specialising on sizes that happen to be 1 in the example (a level with a
    single window): decisions such as "is this dimension 1?" are taken as for a general size."""
    config = torch.fx.experimental._config
    if not hasattr(config, "backed_size_oblivious"):
        raise ConfigError(f"the any-size export needs torch.export's backed_size_oblivious switch, which torch "
                          f"{torch.__version__} lacks (tested with torch 2.14); upgrade torch or export a fixed size")
    with config.patch(backed_size_oblivious=True):
        yield


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: Optional[Tuple[int, int]] = None,
    opset: Optional[int] = None,
    dynamic_size: bool = False,
) -> Path:
    """Export ``model`` (eval mode) to an ONNX file, written atomically.

    Args:
        model: a hymamba classifier, backbone or segmenter (or any image model).
        path: the ``.onnx`` file to write.
        image_size: (H, W) of the input (with ``dynamic_size``: of the example the export traces);
            default: the model's ``pretrained_cfg`` input size.
        opset: ONNX opset version; default :data:`DEFAULT_OPSET` (17 fixed, 18 any-size).
        dynamic_size: write one file for every H x W (see the module docstring for which to choose).
    Returns:
        The written path. Input ``pixel_values`` (N, 3, H, W); outputs named by
        :func:`onnx_output_names`. N is dynamic, and with ``dynamic_size`` H and W too.
    """
    opset = DEFAULT_OPSET[bool(dynamic_size)] if opset is None else opset
    _check_opset(opset, dynamic_size)
    if image_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise ConfigError("image_size is required for a model without pretrained_cfg['input_size']")
        image_size = tuple(cfg["input_size"][1:])
    h, w = _check_image_size(image_size, dynamic_size)
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    param = next(model.parameters())
    # batch 2: a batch of 1 would make torch.export fix the batch at 1
    x = torch.randn(2 if dynamic_size else 1, in_chans, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
        names = onnx_output_names(model, 1 if isinstance(out, torch.Tensor) else len(out))
        write = _dynamic_writer(model, x, names, opset) if dynamic_size else _fixed_writer(model, x, names, opset)
        return atomic_write(path, write)
    finally:
        model.train(was_training)


def _fixed_writer(model: nn.Module, x: torch.Tensor, names: List[str], opset: int):
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # tracing warns about every Python int taken from a shape; they are intended constants.
            # The TorchScript exporter needs no onnxscript and traces the standard-op scan, so its
            # deprecation notice is noise for our users.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["pixel_values"], output_names=names,
                dynamic_axes={name: {0: "batch"} for name in ["pixel_values", *names]},
            )
    return write


def _dynamic_writer(model: nn.Module, x: torch.Tensor, names: List[str], opset: int):
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise ConfigError("the any-size ONNX export needs onnxscript: pip install 'hymamba[onnx]'") from None
    from torch.export import Dim

    shapes = ({0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)},)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), _size_oblivious(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # torch.export / onnxscript notices about their own internals
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                input_names=["pixel_values"], output_names=names, external_data=False, optimize=True,
            )
    return write


def compare_onnx(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """Run the ONNX file in ONNX Runtime on ``x`` and compare each output with ``model(x)``.

    Returns, per output name, ``max_abs_diff`` and ``relative`` (that difference over the largest
    |value| of PyTorch's output).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("checking an ONNX export needs onnxruntime: pip install 'hymamba[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        model.train(was_training)
    refs: Sequence[torch.Tensor] = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    if len(refs) != len(got):
        raise ConfigError(f"{path} has {len(got)} outputs but the model returns {len(refs)}: is it this model's file?")
    out: Dict[str, Dict[str, float]] = {}
    for meta, g, r in zip(session.get_outputs(), got, refs):
        r = r.detach().float().cpu()
        if tuple(g.shape) != tuple(r.shape):
            raise ConfigError(f"{path}: output {meta.name!r} has shape {tuple(g.shape)}, PyTorch's {tuple(r.shape)}; "
                              "a fixed-size file runs only at the size it was exported for")
        diff = float((torch.from_numpy(g) - r).abs().max())
        out[meta.name] = {"max_abs_diff": diff, "relative": diff / max(float(r.abs().max()), 1e-30)}
    return out


def check_sizes(size: Sequence[int], dynamic_size: bool) -> List[Tuple[int, int]]:
    """The sizes an exported file is checked at in ONNX Runtime: ``size``; for an any-size file also a
    second one (a quarter larger, in steps of 8: other window counts and paddings)."""
    h, w = (int(v) for v in size)
    second = (h + max(8, h // 32 * 8), w + max(8, w // 32 * 8))
    return [(h, w), second] if dynamic_size else [(h, w)]


def check_onnx(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Run the ONNX file in ONNX Runtime on ``x`` and return the max |difference| to ``model(x)``
    over all outputs."""
    return max(c["max_abs_diff"] for c in compare_onnx(model, path, x).values())
