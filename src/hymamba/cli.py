"""The ``hymamba`` command. It only parses arguments and calls the library.

Each subcommand registers its parser and a function; :func:`main` dispatches. User errors print
one line (``hymamba: error: ...``) and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["main"]

_COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {}


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def _models(args: argparse.Namespace) -> int:
    import torch

    from hymamba.factory import create_model, list_models
    from hymamba.flops import count_macs
    from hymamba.models.mambavision import VARIANTS

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; run 'hymamba models' to list them all")
    rows = []
    for name in names:
        _, cfg, official, top1 = VARIANTS[name]
        with torch.device("meta"):  # shapes only: counting needs no memory and no compute
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, tuple(cfg["input_size"]))[0] if args.flops else None
        rows.append(dict(name=name, official_name=official or "-", params=params, gmacs=macs and macs / 1e9,
                         input_size=list(cfg["input_size"]), crop_pct=cfg["crop_pct"], top1=top1))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'model':<24}{'official name':<26}{'params (M)':>11}{'GMACs':>9}{'input':>8}{'top-1':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        gmacs = f"{r['gmacs']:.2f}" if r["gmacs"] is not None else "-"
        print(f"{r['name']:<24}{r['official_name']:<26}{r['params'] / 1e6:>11.1f}{gmacs:>9}"
              f"{r['input_size'][-1]:>8}{r['top1'] if r['top1'] else '-':>7}")
    if args.flops:
        print("\nGMACs: multiply-adds of one image at the input size, counted like fvcore (convs, linears, "
              "norms, pooling; the selective scan and attention's softmax(QK^T)V are not counted). "
              "top-1: ImageNet-1K accuracy reported in the paper.")
    return 0


def _image_size(given: Optional[Sequence[int]], model) -> List[int]:
    """``--size H [W]`` as [H, W], defaulting to the model's input size."""
    size = list(given) if given else list(model.pretrained_cfg["input_size"][1:])
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"--size takes H [W], positive numbers; got {' '.join(map(str, given or []))}")
    return size


def _forward(args: argparse.Namespace) -> int:
    import torch

    from hymamba.factory import create_model
    from hymamba.ops import last_scan_impl
    from hymamba.ops.linear import FastLinear, linear_impl_for

    model = create_model(args.model, checkpoint_path=args.checkpoint, scan_impl=args.scan_impl,
                         linear_impl=args.linear_impl).eval()
    size = _image_size(args.size, model)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *size)
    with torch.inference_mode():
        start = time.perf_counter()
        feats, stages = model.forward_intermediates(x)
        logits = model.forward_head(feats)
        seconds = time.perf_counter() - start
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"weights {'from ' + str(args.checkpoint) if args.checkpoint else 'randomly initialised'}")
    print(f"input {tuple(x.shape)} -> logits {tuple(logits.shape)} in {seconds:.3f} s "
          f"({args.batch_size / seconds:.1f} img/s), selective scan: {last_scan_impl()}")
    layers = [m for m in model.modules() if isinstance(m, FastLinear)]
    onednn = sum(linear_impl_for(x.new_empty(1, m.in_features), m.weight, m.impl) == "onednn" for m in layers)
    print(f"linear layers: {onednn} of {len(layers)} through oneDNN (linear_impl={args.linear_impl})")
    for i, s in enumerate(stages):
        print(f"  stage{i + 1}: {tuple(s.shape)}")
    if not torch.isfinite(logits).all():
        raise UserError("the forward pass produced non-finite logits")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import datetime
    import platform
    from pathlib import Path

    import torch

    from hymamba.benchmark import format_table, mambavision_cases, peer_cases, run_benchmark, write_results
    from hymamba.factory import resolve_model_name

    model = resolve_model_name(args.model)
    for name, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--image-size", args.image_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    cases = mambavision_cases(model, args.paths)
    cases += peer_cases(args.peers)
    results = run_benchmark(cases, batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats,
                            warmup=args.warmup, train=args.train, progress=not args.quiet)
    baseline = next((c.name for c in cases if "reference" in c.name), None)
    print(format_table(results, baseline=baseline))
    if args.out:
        meta = dict(model=model, batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats,
                    torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or
                    platform.machine(), date=datetime.date.today().isoformat())
        for path in write_results(results, Path(args.out), meta):
            print(f"wrote {path}")
    return 0


def _none_or(kind: type) -> Callable[[str], object]:
    """argparse type: a value of ``kind``, or None for 'none'/'null'."""
    def parse(text: str) -> object:
        if text.lower() in ("none", "null"):
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def _train(args: argparse.Namespace) -> int:
    import os

    from hymamba.train import INTERRUPTED_EXIT, config_for_resume, train
    from hymamba.train_config import build_config, config_fields
    from hymamba.train_state import load_train_state

    overrides = {k: v for k, v in vars(args).items() if k in config_fields()}
    if args.resume:
        state = load_train_state(args.resume)
        cfg = config_for_resume(state, args.config, overrides)
    else:
        state, cfg = None, build_config(args.config, overrides)
    summary = train(cfg, resume=state)
    if int(os.environ.get("RANK", "0")) != 0:
        return INTERRUPTED_EXIT if summary["interrupted"] else 0
    if summary["interrupted"]:
        print(f"stopped after {summary['epochs']} complete epoch(s); resume with: hymamba train --resume "
              f"{summary['output']}", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"done: val top-1 {summary['final_top1']:.2f}% (best {summary['best_top1']:.2f}% at epoch "
          f"{summary['best_epoch']}) after {summary['epochs']} epochs in {summary['wall_seconds']:.0f} s; "
          f"{summary['skipped_images']} unreadable image(s) skipped; weights: {summary['output']}/model.safetensors")
    return 0


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from hymamba.train_config import TrainConfig, config_fields, field_optional, field_type

    defaults = TrainConfig()
    p = sub.add_parser(
        "train", help="train a model (the official recipe); 'hymamba train' alone trains nano on digits",
        description="Train on an ImageFolder (DATA/train/<class>/..., DATA/val/<class>/...) or, without DATA, "
                    "the built-in digits. Values: defaults (configs/digits_nano.yaml) < --config FILE < flags. "
                    "Runs unchanged under torchrun (DDP). Optional values take 'none'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  hymamba train                          # nano on the built-in digits, about a minute on 2 cores\n"
               "  hymamba train DATA --config configs/finetune.yaml --model mambavision_s\n"
               "  torchrun --nproc_per_node 8 -m hymamba.cli train /imagenet --config configs/mambavision_t_1k.yaml\n"
               "  hymamba train --resume runs/mambavision_nano-20250101-120000")
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS, metavar="DATA",
                   help="ImageFolder root, or 'digits' (default: digits)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML recipe, e.g. configs/mambavision_t_1k.yaml")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run: its output folder or a .pth it wrote (flags given here override)")
    for name, f in config_fields().items():
        if name == "data":
            continue
        kind, length = field_type(f)
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = "none" if default is None else " ".join(map(str, default)) if length else default
        text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif length:
            p.add_argument(flag, type=kind, nargs=length, default=argparse.SUPPRESS, metavar=name.upper(), help=text)
        else:  # 'none'/'null' mean None only where None is allowed (not e.g. attention_pattern none)
            parse = _none_or(kind) if field_optional(f) else kind
            p.add_argument(flag, type=parse, default=argparse.SUPPRESS, metavar=name.upper(), help=text)
    _COMMANDS["train"] = _train


def _validate(args: argparse.Namespace) -> int:
    from hymamba.evaluate import validate

    res = validate(args.model, args.checkpoint, data=args.data, split=args.split, pretrained=args.pretrained,
                   use_ema=args.use_ema, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                   device=args.device, input_size=args.img_size, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
                   interpolation=args.interpolation, max_samples=args.max_samples, scan_impl=args.scan_impl)
    if not args.per_class:
        res.pop("per_class")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} ({res['checkpoint']}) on {res['data']}/{res['split']}: top-1 {res['top1']:.3f}%  "
          f"top-5 {res['top5']:.3f}%  loss {res['loss']:.4f}  ({res['images']} images, "
          f"{res['skipped_images']} unreadable skipped)")
    pp = res["preprocessing"]
    print(f"preprocessing: input {pp['input_size'][-1]}px, crop_pct {pp['crop_pct']}, {pp['crop_mode']}, "
          f"{pp['interpolation']}, mean {tuple(round(m, 4) for m in pp['mean'])}, std "
          f"{tuple(round(s, 4) for s in pp['std'])}")
    if args.per_class:
        width = max(len(r["class"]) for r in res["per_class"])
        print(f"{'class':<{width}}  {'images':>6}  top-1")
        for r in res["per_class"]:
            acc = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
            print(f"{r['class']:<{width}}  {r['images']:>6}  {acc}")
    return 0


def _add_validate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="top-1/top-5/loss of weights on an ImageFolder split or the digits",
                       description="Evaluate with the model's own preprocessing (resize by crop_pct, crop mode, "
                                   "interpolation, mean/std from its config or the model.json beside the weights).")
    p.add_argument("model", help="model name, e.g. mambavision_t")
    p.add_argument("data", nargs="?", default="digits",
                   help="ImageFolder root holding SPLIT/<class>/..., a split folder, or 'digits' (default)")
    p.add_argument("--checkpoint", default=None, help="weights: model.safetensors, a training .pth, an official "
                                                      ".pth.tar or a Hugging Face folder")
    p.add_argument("--pretrained", action="store_true", help="use the official weights (a local file)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a checkpoint")
    p.add_argument("--split", default="val", help="subfolder of DATA to evaluate (default: val)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(8, cores))")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction (default: the model's)")
    p.add_argument("--crop-mode", default=None, help="center, squash or border (default: the model's)")
    p.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only this many images")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--per-class", action="store_true", help="also report the accuracy of each class")
    p.add_argument("--json", action="store_true", help="print JSON")
    _COMMANDS["validate"] = _validate


def _predict(args: argparse.Namespace) -> int:
    from hymamba.evaluate import predict

    results = predict(args.model, args.checkpoint, args.images, topk=args.topk, pretrained=args.pretrained,
                      use_ema=args.use_ema, device=args.device, scan_impl=args.scan_impl)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"hymamba: warning: skipped {r['image']}: {r['error']}", file=sys.stderr)
    if len(failed) == len(results):
        raise UserError(f"none of the {len(results)} image(s) could be read")
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if "top" in r:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"]))
    return 0


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files",
                       description="Classify images with the model's preprocessing; class names come from the "
                                   "model.json (or Hugging Face config.json) beside the weights.")
    p.add_argument("model", help="model name, e.g. mambavision_nano")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", default=None, help="weights (model.safetensors, .pth, official files)")
    p.add_argument("--pretrained", action="store_true", help="use the official weights (a local file)")
    p.add_argument("--use-ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _COMMANDS["predict"] = _predict


def _export(args: argparse.Namespace) -> int:
    import torch

    from hymamba.export import check_onnx, export_onnx
    from hymamba.factory import create_model

    model = create_model(args.model, checkpoint_path=args.checkpoint).eval()
    size = _image_size(args.size, model)
    path = export_onnx(model, args.output, image_size=tuple(size), opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input pixel_values (N, 3, {size[0]}, {size[1]}), "
          f"output logits (N, {model.num_classes}); N is dynamic")
    if args.check:
        torch.manual_seed(0)
        diff = check_onnx(model, path, torch.randn(2, 3, *size))
        print(f"ONNX Runtime vs PyTorch on a random batch of 2: max |difference| {diff:.2e}")
        if not diff <= 1e-3:
            raise UserError(f"the exported model disagrees with PyTorch (max difference {diff:.2e})")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hymamba", description="MambaVision on any device.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the models: parameters, FLOPs, input size, paper top-1")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mambavision_l*'")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting multiply-adds")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _COMMANDS["models"] = _models

    p = sub.add_parser("forward", help="run one forward pass on a random batch and report shapes and speed")
    p.add_argument("model", nargs="?", default="mambavision_t", help="model name (default: mambavision_t)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or Hugging Face folder to load")
    p.add_argument("--batch-size", type=int, default=2, help="images in the batch (default: 2)")
    p.add_argument("--size", type=int, nargs="+", default=None, help="H [W] (default: the model's input size)")
    p.add_argument("--scan-impl", default="auto", help="selective-scan implementation (default: auto)")
    p.add_argument("--linear-impl", default="auto", choices=("auto", "torch", "onednn"),
                   help="linear-layer implementation (default: auto)")
    _COMMANDS["forward"] = _forward

    from hymamba.benchmark import PATHS, PEERS

    p = sub.add_parser("benchmark", help="measure MambaVision paths and timm peers side by side")
    p.add_argument("model", nargs="?", default="mambavision_t", help="model name (default: mambavision_t)")
    p.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS,
                   help=f"MambaVision paths to measure (default: all: {' '.join(PATHS)})")
    p.add_argument("--peers", nargs="*", default=list(PEERS), help="timm models to compare (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="batch for throughput and training (default: 16)")
    p.add_argument("--image-size", type=int, default=224, help="input side (default: 224)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per metric (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step measurement")
    p.add_argument("--out", default=None, help="folder for results.json, results.csv and a PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _COMMANDS["benchmark"] = _benchmark

    p = sub.add_parser("export", help="export to ONNX and check it with ONNX Runtime")
    p.add_argument("model", help="model name")
    p.add_argument("--checkpoint", default=None, help="weights to export (default: random initialisation)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, nargs="+", default=None, help="input H [W] (default: the model's input size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")
    _COMMANDS["export"] = _export

    _add_train_parser(sub)
    _add_validate_parser(sub)
    _add_predict_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hymamba`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    from hymamba.checkpoint import CheckpointError
    from hymamba.train import TrainingError

    try:
        return _COMMANDS[args.command](args)
    except (UserError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"hymamba: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"hymamba: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hymamba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
