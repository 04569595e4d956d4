"""The container-side worker: supervisor, loader and extraction.

Runs inside the sandbox image as its own top-level package (``sandbox_worker``). It imports
only the standard library, torch, numpy and safetensors, and never the host package; the host
imports only :mod:`._protocol` from here. ``tests/unit/test_boundaries.py`` enforces both.
"""
