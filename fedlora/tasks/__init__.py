"""Tasks: what a model learns from the examples (classification, causal-lm, ...), one file each.

A task owns everything that differs between tasks: its config rules, the model class it loads (and the
model cache's key), how a split is tokenised (and so its loss and scores), its pre-flight check of the
model folder, its zero-shot round, its per-round metrics and what ``fedlora generate`` does. Every module
of this package is imported once by :mod:`fedlora.tasks.registry`; a class decorated with
:func:`~fedlora.tasks.registry.register` is selectable as ``task`` (see docs/write-a-task.md).
"""
