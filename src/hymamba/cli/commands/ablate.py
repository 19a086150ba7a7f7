"""``hymamba ablate``: run a study (a base recipe x axes x seeds) and write its report.

``mixer`` and ``pattern`` are the paper's two ablations (built-in specs); any YAML spec works too
(see :mod:`hymamba.studies.spec`). Several processes or machines sharing ``--out`` split the runs.
"""
from __future__ import annotations

import argparse
import sys

HELP = "run an ablation study (recipe x axes x seeds) and write its report"
PARSER_KWARGS = dict(
    description="Train every run of a study (each combination of the axes' values, once per seed) through the "
                "classification training and write results.csv, results.md and results.png into --out. Finished "
                "runs are skipped, interrupted ones resumed; start the same command in several processes or on "
                "several machines sharing --out to split the runs. Config flags (--epochs, --model, ...) change "
                "the study's base recipe.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="examples:\n"
           "  hymamba ablate mixer --out studies/mixer --dry-run     # the runs and aliases, nothing trained\n"
           "  hymamba ablate pattern --out studies/pattern --epochs 5 --seeds 0 1\n"
           "  hymamba ablate my_study.yaml --out /shared/my_study --stale-after 3600   # on each machine\n"
           "  hymamba ablate mixer --out studies/mixer --report-only")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hymamba.cli.commands._common import non_negative_int
    from hymamba.cli.commands.train import add_config_flags
    from hymamba.tasks.classification.config import ClassificationConfig

    p.add_argument("spec", metavar="SPEC", help="a built-in study (mixer, pattern) or a YAML spec file")
    p.add_argument("--out", required=True, metavar="DIR", help="the study folder (shared by every process)")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the report from the runs so far")
    p.add_argument("--dry-run", action="store_true", help="print the runs and aliases; train and write nothing")
    p.add_argument("--stale-after", type=float, default=None, metavar="SECONDS",
                   help="take over runs claimed by another machine whose claim has not been refreshed for this "
                        "long (default: never; claims on this machine are taken over once their process is gone)")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, metavar="SEED",
                   help="the seeds (default: the spec's)")
    p.add_argument("--in-process", action="store_true",
                   help="train the runs in this process, not one fresh process each (starts faster; the engine "
                        "re-seeds every run, but anything else a run leaves in the process is shared)")
    p.add_argument("--no-throughput", dest="throughput", action="store_false",
                   help="do not measure inference throughput for the report")
    add_config_flags(p, ClassificationConfig, skip=("seed", "output"))


def run(args: argparse.Namespace) -> int:
    from hymamba.errors import ConfigError
    from hymamba.studies.spec import load_spec, with_overrides
    from hymamba.tasks.classification.config import ClassificationConfig

    if args.stale_after is not None and args.stale_after <= 60:
        raise ConfigError(f"--stale-after must be more than 60 seconds (claims are refreshed every 30 s), got "
                          f"{args.stale_after:g}")
    overrides = {k: v for k, v in vars(args).items() if k in ClassificationConfig.fields()}
    study = load_spec(args.spec)
    if overrides or args.seeds is not None:
        study = with_overrides(study, overrides, args.seeds)
    if args.dry_run:
        return _dry_run(study, args.out, args.stale_after)
    from hymamba.studies.report import write_report

    result = None
    if not args.report_only:
        from hymamba.studies.runner import run_study

        result = run_study(study, args.out, stale_after=args.stale_after, isolate=not args.in_process)
    paths = write_report(study, args.out, throughput=args.throughput)
    print(f"report: {paths['md']} ({paths['csv'].name}, {paths['png'].name})")
    if result is None:
        return 0
    print(f"study {study.name}: {len(result.trained)} trained, {len(result.resumed)} resumed, "
          f"{len(result.skipped_finished)} already finished, {len(result.skipped_claimed)} claimed by other "
          f"processes, {len(result.failed)} failed")
    if result.interrupted:
        from hymamba.engine import INTERRUPTED_EXIT

        print(f"interrupted; run the same command again to resume: hymamba ablate {args.spec} --out {args.out}",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    if result.failed:
        print(f"hymamba: error: {len(result.failed)} run(s) failed: {', '.join(result.failed)} (see failed.json in "
              "their folders and results.md); run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def _dry_run(study, out: str, stale_after) -> int:
    from pathlib import Path

    from hymamba.studies.models import describe_aliases
    from hymamba.studies.runner import plan, run_state

    runs, aliases = plan(study, out)
    combos = list(dict.fromkeys(c for c in (r.combo for r in runs)))
    print(f"study {study.name}: {len(runs)} run(s) to train ({len(combos)} combination(s) x {len(study.seeds)} "
          f"seed(s)), {len(aliases)} alias(es); base: {study.to_dict()['base']}")
    for r in runs:
        print(f"  {r.id:<50} {run_state(Path(out) / r.folder, stale_after):<9} {Path(out) / r.folder}")
    for line in describe_aliases(aliases, list(aliases)):
        print(f"  alias: {line}")
    return 0
