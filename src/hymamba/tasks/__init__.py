"""Tasks: what the engine trains. Each task is a plug-in (:class:`hymamba.engine.Task`) with its own
configuration (an :class:`hymamba.engine.EngineConfig` subclass), data, losses and metrics.

- ``classification``: image classification (the official ImageNet recipe; the digits job).
"""
