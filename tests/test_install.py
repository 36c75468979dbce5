"""The README's install commands, run as written: wheels for an air-gapped host, a virtual environment beside
the file, and the server working from it. Needs PyPI (skipped without it; CI has it)."""
from __future__ import annotations

import json
import platform as host
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import INIT, ROOT, line, replies, require, server_env

README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands_after(marker: str) -> list:
    """The shell commands of the first bash block after marker, continuation lines joined, comments dropped."""
    block = README.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(command) for command in block.replace("\\\n", " ").splitlines()
            if command.strip() and not command.lstrip().startswith("#")]


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """The README's `pip download` for an air-gapped host, aimed at this machine's platform and Python."""
    require(pypi_reachable(), "PyPI (the README's pip download)")
    download, _, _ = commands_after("**Air-gapped hosts.**")
    assert download[:4] == ["python3", "-m", "pip", "download"] and "--only-binary=:all:" in download
    target = {"--platform": "manylinux2014_%s" % host.machine(), "--dest": str(tmp_path_factory.mktemp("wheels")),
              "--python-version": "%d.%d" % sys.version_info[:2]}
    command = [sys.executable] + download[1:]
    for option, value in target.items():  # the README names x86_64 and 3.11 as its example
        command[command.index(option) + 1] = value
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(target["--dest"])


def test_the_air_gapped_download_fetches_only_binary_wheels_for_the_host(wheels):
    files = sorted(path.name for path in wheels.iterdir())
    assert files and all(name.endswith(".whl") for name in files), files
    assert {re.split(r"-\d", name)[0].lower() for name in files} >= {"requests", "jsonschema", "urllib3", "certifi"}
    # jsonschema 4.18+ needs the compiled rpds-py: a wheel for this platform, not the downloading machine's guess.
    compiled = [name for name in files if name.startswith("rpds_py")]
    assert not compiled or all(host.machine() in name and "cp%d%d" % sys.version_info[:2] in name
                               for name in compiled), compiled


def test_the_wheels_install_offline_into_a_venv_beside_the_file_and_the_server_runs_from_it(wheels, tmp_path, platform):
    _, make_venv, install = commands_after("**Air-gapped hosts.**")
    assert make_venv[:3] == ["python3", "-m", "venv"] and "--no-index" in install
    opt = tmp_path / "opt" / "kvmfleet"
    opt.mkdir(parents=True)
    shutil.copy(ROOT / "kvmfleet_mcp.py", opt)
    venv = opt / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip")] + install[1:]
    pip[pip.index("--find-links") + 1] = str(wheels)
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}),
             line({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "list_devices", "arguments": {"count_by": "status"}}})]
    proc = subprocess.run([str(venv / "bin" / "python3"), str(opt / "kvmfleet_mcp.py")], input=b"".join(calls),
                          capture_output=True, env=server_env(platform.url, "kvmf_demo_viewer"), timeout=60)
    count = json.loads(replies(proc.stdout)[1]["result"]["content"][0]["text"])
    assert count["complete"] and count["total"] == len(platform.devices)


def test_the_host_install_uses_a_venv_not_pip_into_the_system_python():
    # Debian 12 and Ubuntu 24.04 refuse `pip install` into their Python (PEP 668): the README must not tell anyone to.
    assert not re.search(r"pip install --user|python3 -m pip install", README)
    make_venv, install = commands_after("2. **A virtual environment beside the file**")
    assert make_venv == ["sudo", "python3", "-m", "venv", "/opt/kvmfleet/venv"]
    assert install[:3] == ["sudo", "/opt/kvmfleet/venv/bin/pip", "install"]
    assert "pip install kvmfleet-mcp" not in README  # not published on PyPI
