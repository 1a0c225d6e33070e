"""Triton reads TRITON_INTERPRET when it is first imported: set it before any test imports it."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
