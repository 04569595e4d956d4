"""Policies shipped with model-sandbox: load policies (TOML) and the seccomp profile (JSON).

Installed as the ``sandbox.policies`` package so that the files travel inside the wheel.
"""
