"""make.py, the README's two commands: its set-up of the virtual environment."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make", ROOT / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(module, "STAMP", tmp_path / ".venv" / "bnlab-setup.sha256")
    return module


def test_a_python_without_ensurepip_is_told_the_package_to_install(make, monkeypatch):
    """Debian's and Ubuntu's Python ship ensurepip apart (python3-venv): venv.create then fails
    inside a subprocess, and the user gets the fix, not a traceback."""
    def create(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["python", "-m", "ensurepip", "--upgrade", "--default-pip"])

    monkeypatch.setattr(make.venv, "create", create)
    with pytest.raises(SystemExit, match=r"no ensurepip: on Debian or Ubuntu install python3-venv \(apt install "
                                         r"python3\.\d+-venv\), then run this command again"):
        make.setup()
    assert not make.STAMP.exists()  # (the next run tries again)


def test_the_set_up_runs_once_until_its_inputs_change(make, monkeypatch):
    created, installed = [], []
    monkeypatch.setattr(make.venv, "create", lambda path, **kw: (created.append(kw), path.mkdir(exist_ok=True)))
    monkeypatch.setattr(make.subprocess, "run", lambda cmd, check: installed.append(cmd))
    make.setup()
    make.setup()
    assert created == [{"with_pip": True, "clear": False}] and len(installed) == 1
    assert installed[0][-1] == f"{ROOT}[test,triton]" and str(ROOT / "constraints.txt") in installed[0]
    make.STAMP.write_text("the digest of other pyproject.toml and constraints.txt")
    make.setup()  # (made again from scratch: an old environment may hold what the new pins exclude)
    assert created[1:] == [{"with_pip": True, "clear": True}] and len(installed) == 2


def test_a_failed_install_says_what_it_needs_and_is_redone_next_time(make, monkeypatch):
    monkeypatch.setattr(make.venv, "create", lambda path, **kw: path.mkdir(exist_ok=True))

    def pip(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(make.subprocess, "run", pip)
    with pytest.raises(SystemExit, match=r"installing bnlab into .* failed \(pip exited with 1; its messages are "
                                         r"above\)\. It needs PyPI"):
        make.setup()
    assert not make.STAMP.exists()
