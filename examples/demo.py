"""The demo behind `make demo`: convert a benign and a hostile checkpoint through the sandbox.

The hostile file's payload is harmless: it tries to create a marker file in ./demo-output and
to connect to a port this script listens on at 127.0.0.1. Loaded with plain torch.load it
would do both. `convert` refuses it on the static scan; `scan` loads it in the sandbox to
record what it tries (the program it starts, the address it dials); neither reaches the host.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path("demo-output")


class Payload:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (self.code,)


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    marker = (OUT / "PWNED").resolve()

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save({"epoch": 5, "state_dict": model.state_dict(), "config": {"hidden": 8}}, OUT / "benign.pt")
    code = (
        f"import os, socket\n"
        f"os.system('touch {marker}')\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        f"except OSError:\n    pass\n"
    )
    torch.save({"state_dict": model.state_dict(), "payload": Payload(code)}, OUT / "hostile.pt")

    worst = 0
    # convert refuses the hostile file on its static scan alone; scan then runs it in the
    # sandbox anyway, to record what it tries to do
    for command, name in (("convert", "benign.pt"), ("convert", "hostile.pt"), ("scan", "hostile.pt")):
        print(f"\n$ model-sandbox {command} {OUT / name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "sandbox", command, str(OUT / name)], check=False)
        worst = max(worst, proc.returncode)

    try:
        conn, _ = listener.accept()
        conn.close()
        reached = True
    except (TimeoutError, OSError):
        reached = False
    print("\nOn the host:")
    print(f"  marker {marker}: {'PRESENT - isolation failed' if marker.exists() else 'absent'}")
    print(f"  listener 127.0.0.1:{port}: {'CONNECTED - isolation failed' if reached else 'no connection'}")
    print(f"  converted: {sorted(p.name for p in OUT.glob('*.safetensors'))}")
    if marker.exists() or reached:
        return 3
    return 0 if worst <= 1 else worst


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
