"""Fake-tensor and autograd rules for the C++ ops (each family in its own module)."""

from . import additive, attention, flows, linear, lstm  # noqa: F401
