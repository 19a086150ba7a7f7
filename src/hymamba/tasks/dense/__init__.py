"""What the dense tasks (``segmentation``, ``detection``) share: the backbone and data-subset options
of their configurations (``config``, torch-free) and the bookkeeping of their tasks (``task``:
building the backbone, unreadable images over processes, resuming with the same classes).
This package imports nothing; import the submodules themselves."""
