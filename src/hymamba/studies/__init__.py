"""Studies: a base training recipe x axes x seeds, every run trained through the classification
task, then one report (``hymamba ablate``): ``spec`` (load, check and expand a study; no torch),
``models`` (what a combination builds: fingerprint for aliases, parameters, GMACs, throughput),
``claims`` (one process per run, across processes and machines sharing a folder), ``runner``
(:func:`run_study`; ``worker``: one run in a fresh process) and ``report`` (``results.csv``,
``results.md``, ``results.png``)."""
from hymamba.studies.spec import BUILTIN_SPECS, Run, Study, expand, load_spec

__all__ = ["BUILTIN_SPECS", "Run", "Study", "expand", "load_spec"]
