#!/usr/bin/env python3
"""The two commands of a new user, each doing its own set-up (needs nothing but Python >= 3.10).

    python3 make.py run    # the main job: reproduce the BN paper's MNIST experiment (see README)
    python3 make.py test   # the test suite

Set-up: a virtual environment in .venv with bnlab installed in editable mode plus its test and
Triton extras, pinned by constraints.txt. It is redone only when pyproject.toml or
constraints.txt change. Extra arguments go to `bnlab` (run) or pytest (test).
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / "bnlab-setup.sha256"


def setup() -> None:
    digest = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt"))
    ).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    print(f"Setting up {VENV} (once; takes about a minute)...", flush=True)
    try:
        venv.create(VENV, with_pip=True, clear=VENV.exists())
    except subprocess.CalledProcessError as err:  # (pip comes from ensurepip, which some distributions split off)
        sys.exit(f"make.py: could not put pip into {VENV} ({err}). Most often this Python has no ensurepip: on "
                 f"Debian or Ubuntu install python3-venv (apt install python3.{sys.version_info.minor}-venv), then "
                 "run this command again.")
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        subprocess.run(pip + ["-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[test,triton]"], check=True)
    except subprocess.CalledProcessError as err:
        sys.exit(f"make.py: installing bnlab into {VENV} failed (pip exited with {err.returncode}; its messages are "
                 "above). It needs PyPI: check the network or the proxy (PIP_INDEX_URL for a mirror), then run this "
                 "command again; it starts the set-up over.")
    STAMP.write_text(digest)


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("run", [])
    if task not in ("run", "test", "bnlab"):
        print(__doc__)
        return 2
    setup()
    if task == "test":
        cmd = [str(BIN / "python"), "-m", "pytest", "-q", *rest]
    elif task == "bnlab":
        cmd = [str(BIN / "bnlab"), *rest]
    else:
        cmd = [str(BIN / "bnlab"), "reproduce", "bn-mnist", *rest]
    env = dict(os.environ)
    shared = ROOT.parent / "shared" / "data" / "mnist"
    if "BNLAB_DATA" not in env and shared.is_dir():
        env["BNLAB_DATA"] = str(shared)  # the team's copy of MNIST, beside the checkout
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
