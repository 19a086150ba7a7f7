"""``hymamba train``: train a classifier with the engine (the official recipe; digits by default).

Every field of :class:`hymamba.tasks.classification.ClassificationConfig` is a flag
(``--batch-size``, ``--no-amp``, ...); values: defaults < ``--config FILE`` < flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Tuple

from hymamba.cli.commands._common import none_or

HELP = "train a model (the official recipe); 'hymamba train' alone trains nano on digits"
PARSER_KWARGS = dict(
    description="Train on an ImageFolder (DATA/train/<class>/..., DATA/val/<class>/...) or, without DATA, "
                "the built-in digits. Values: defaults (configs/digits_nano.yaml) < --config FILE < flags. "
                "Runs unchanged under torchrun (DDP). Optional values take 'none'.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="examples:\n"
           "  hymamba train                          # nano on the built-in digits, about 1.5 minutes on 2 cores\n"
           "  hymamba train DATA --config configs/finetune.yaml --model mambavision_s\n"
           "  torchrun --nproc_per_node 8 -m hymamba.cli train /imagenet --config configs/mambavision_t_1k.yaml\n"
           "  hymamba train --resume runs/mambavision_nano-20250101-120000")


def add_config_flags(p: argparse.ArgumentParser, config_cls: type, skip: tuple = ()) -> None:
    """One flag per field of a :class:`hymamba.engine.config.Config` (booleans get --no-...): the
    task's own options first, then the training loop's (:class:`~hymamba.engine.config.EngineConfig`)."""
    import dataclasses

    from hymamba.engine.config import EngineConfig

    engine = {f.name for f in dataclasses.fields(EngineConfig)}
    groups = {False: p.add_argument_group("task (data, model, augmentation)")}
    groups[True] = p.add_argument_group("training loop (schedule, optimiser, EMA, precision, system)")
    defaults = config_cls()
    fields = config_cls.fields()
    for name in sorted(fields, key=lambda n: n in engine):  # stable: the task's fields first
        if name in skip:
            continue
        f = fields[name]
        group = groups[name in engine]
        kind, length = config_cls.field_type(f)
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = "none" if default is None else " ".join(map(str, default)) if length else default
        text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif length:
            group.add_argument(flag, type=kind, nargs=length, default=argparse.SUPPRESS, metavar=name.upper(),
                               help=text)
        else:  # 'none'/'null' mean None only where None is allowed (not e.g. attention_pattern none)
            parse = none_or(kind) if config_cls.field_optional(f) else kind
            group.add_argument(flag, type=parse, default=argparse.SUPPRESS, metavar=name.upper(), help=text)


def add_training_arguments(p: argparse.ArgumentParser, config_cls: type, data_help: str, config_help: str) -> None:
    """DATA, --config, --resume and one flag per config field: the arguments of every training command."""
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS, metavar="DATA", help=data_help)
    p.add_argument("--config", default=None, metavar="FILE", help=config_help)
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue a run: its output folder or a .pth it wrote (flags given here override)")
    add_config_flags(p, config_cls, skip=("data",))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hymamba.tasks.classification.config import ClassificationConfig

    add_training_arguments(p, ClassificationConfig, "ImageFolder root, or 'digits' (default: digits)",
                           "YAML recipe, e.g. configs/mambavision_t_1k.yaml")


def run_training(args: argparse.Namespace, config_cls: type, config_for_resume: Callable, train: Callable,
                 command: str) -> Tuple[Optional[dict], int]:
    """Build the config (defaults < --config < flags, or the resumed run's with flags on top), train,
    and report an interrupted run. Returns ``(summary, exit status)``; the summary only on the main
    process of a finished run (the caller prints it), else None."""
    from hymamba.engine import INTERRUPTED_EXIT, load_train_state

    overrides = {k: v for k, v in vars(args).items() if k in config_cls.fields()}
    if args.resume:
        state = load_train_state(args.resume)
        cfg = config_for_resume(state, args.config, overrides)
    else:
        state, cfg = None, config_cls.build(args.config, overrides)
    summary = train(cfg, resume=state)
    status = INTERRUPTED_EXIT if summary["interrupted"] else 0
    if int(os.environ.get("RANK", "0")) != 0:
        return None, status
    if summary["interrupted"]:
        print(f"stopped after {summary['epochs']} complete epoch(s); resume with: hymamba {command} --resume "
              f"{summary['output']}", file=sys.stderr)
        return None, status
    return summary, status


def run(args: argparse.Namespace) -> int:
    from hymamba.tasks.classification import ClassificationConfig, config_for_resume, train

    summary, status = run_training(args, ClassificationConfig, config_for_resume, train, "train")
    if summary is None:
        return status
    print(f"done: val top-1 {summary['final_top1']:.2f}% (best {summary['best_top1']:.2f}% at epoch "
          f"{summary['best_epoch']}) after {summary['epochs']} epochs in {summary['wall_seconds']:.0f} s; "
          f"{summary['skipped_images']} unreadable image(s) skipped; weights: {summary['output']}/model.safetensors")
    return 0
