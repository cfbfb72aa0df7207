"""Differential-privacy mechanisms as plug-ins: one module per ``privacy.mode`` in this package (its
options, its checks, its server and client hooks), found by :mod:`fedlora.privacy.mechanisms.registry`.
Writing one: docs/privacy.md, "Write a mechanism"."""

from fedlora.privacy.mechanisms.base import LocalTraining, Mechanism
from fedlora.privacy.mechanisms.registry import mechanism_for

__all__ = ["LocalTraining", "Mechanism", "mechanism_for"]
