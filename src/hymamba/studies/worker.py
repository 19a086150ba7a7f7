"""One run of a study in a fresh process: ``python -m hymamba.studies.worker CONFIG.yaml``.

The runner starts every run in its own process so that a run's result does not depend on which
runs the same process trained before (a process's first training differs in the last bits from
later ones in the same process: one-time initialisations), and therefore not on how runs were spread
over processes and machines; it also keeps one run's crash or memory from reaching the others.
CONFIG is the run's full :class:`~hymamba.tasks.classification.ClassificationConfig` (its
``output`` the run folder); a ``last.pth`` there is resumed as ``hymamba train --resume`` does.
Exit status: 0 finished, 130 interrupted (checkpoint kept), 2 bad input, 1 failed.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m hymamba.studies.worker CONFIG.yaml", file=sys.stderr)
        return 2
    from hymamba.engine import INTERRUPTED_EXIT, load_train_state
    from hymamba.errors import USAGE_ERRORS, HymambaError
    from hymamba.tasks.classification import ClassificationConfig, train

    try:
        cfg = ClassificationConfig.build(args[0])
        out = Path(cfg.output)
        state = load_train_state(out) if (out / "last.pth").exists() else None
        summary = train(cfg, resume=state)
    except HymambaError as e:
        print(f"hymamba: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1
    return INTERRUPTED_EXIT if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
