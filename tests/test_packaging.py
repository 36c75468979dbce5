"""What we ship: the sdist holds the whole test suite, the wheel only the module, and the build warns of nothing.

Both are built once, offline (`python -m build --no-isolation`, with the running interpreter's setuptools),
from a copy of the files git tracks or would (not those it ignores), with a test run's caches planted in it:
they must not reach the sdist. Building a copy keeps the repository free of build/, dist/ and *.egg-info,
and keeps a stale egg-info's SOURCES.txt (setuptools reads it back) from hiding what MANIFEST.in misses.
"""
from __future__ import annotations

import configparser
import email.message
import email.parser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, NamedTuple, Optional

import pytest

from conftest import ROOT, require

REPOSITORY = "https://github.com/kvmfleet/kvmfleet-mcp"
PROJECT_URLS = [
    "Homepage, " + REPOSITORY,
    "Source, " + REPOSITORY,
    "Issues, " + REPOSITORY + "/issues",
    "Changelog, " + REPOSITORY + "#changelog",
]
PYTHONS = ["3", "3 :: Only", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14"]
TOP_LEVEL = ["LICENSE", "README.md", "kvmfleet_mcp.py", "pyproject.toml"]
# What a test run leaves behind (in tests/ and beside the module): none of it may be shipped.
PLANTED = ["tests/__pycache__/conftest.cpython-311-pytest-9.0.3.pyc", "tests/.hypothesis/examples/0a1b/2c3d",
           "tests/.coverage", "__pycache__/kvmfleet_mcp.cpython-311.pyc"]


def major(distribution: str) -> int:
    """The installed distribution's major version; 0 when it is not installed."""
    try:
        found = re.match(r"\d+", importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return 0
    return int(found.group()) if found else 0


def git_files() -> Optional[List[str]]:
    """What git sees here: the files it tracks (that exist) and new ones it does not ignore (a new test, not yet
    added, ships too); None outside a git checkout (an unpacked sdist)."""
    if shutil.which("git") is None:
        return None
    top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        return None
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True)
    return sorted(name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file())


def tree_files() -> List[str]:
    """Without git: the files here, less caches (hidden entries, __pycache__, bytecode) and build output."""
    names = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in ("__pycache__", "build", "dist")
                                           or d.endswith(".egg-info"))]
        names += [Path(folder, f).relative_to(ROOT).as_posix() for f in files
                  if not f.startswith(".") and not f.endswith((".pyc", ".pyo"))]
    return sorted(names)


class Built(NamedTuple):
    output: str
    source: List[str]
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require(major("build") >= 1, "build (pip install build)")
    require(major("setuptools") >= 77, "setuptools>=77 (pip install -U setuptools)")
    source = git_files() or tree_files()
    copy = tmp_path_factory.mktemp("source")
    for name in source + PLANTED:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        if name in PLANTED:
            (copy / name).write_bytes(b"cache")
        else:
            shutil.copy2(ROOT / name, copy / name)
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ)
    # Under it distutils warns "byte-compiling is disabled" at each step: the environment's, not ours.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(copy)],
                          cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail("python -m build failed:\n" + proc.stdout)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, (sorted(os.listdir(out)), proc.stdout)
    return Built(proc.stdout, source, sdists[0], wheels[0])


def sdist_files(built: Built) -> List[str]:
    with tarfile.open(built.sdist) as archive:
        # Every member sits under name-version/; the path inside the project is the rest.
        return sorted(str(PurePosixPath(*PurePosixPath(m.name).parts[1:])) for m in archive.getmembers() if m.isfile())


def wheel_files(built: Built) -> List[str]:
    with zipfile.ZipFile(built.wheel) as archive:
        return sorted(archive.namelist())


def metadata(text: str) -> email.message.Message:
    return email.parser.Parser().parsestr(text)


def sdist_metadata(built: Built) -> email.message.Message:
    with tarfile.open(built.sdist) as archive:
        top = PurePosixPath(archive.getmembers()[0].name).parts[0]
        member = archive.extractfile(top + "/PKG-INFO")
        assert member is not None
        return metadata(member.read().decode("utf-8"))


def wheel_read(built: Built, name: str) -> bytes:
    with zipfile.ZipFile(built.wheel) as archive:
        (path,) = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/" + re.escape(name), n)]
        return archive.read(path)


def test_the_build_warns_of_nothing(built):
    warned = [line for line in built.output.splitlines() if re.search("warning|deprecat", line, re.I)]
    assert not warned, "\n".join(warned) + "\n\nThe whole build output:\n" + built.output


def test_the_sdist_holds_the_whole_test_suite_and_no_cache(built):
    shipped = sdist_files(built)
    expected = [name for name in built.source if name.startswith("tests/")]
    assert {"tests/conftest.py", "tests/demo_platform.py", "tests/demo.py", "tests/benchmark.py"} <= set(expected)
    tests = [name for name in shipped if name.startswith("tests/")]
    missing, extra = sorted(set(expected) - set(tests)), sorted(set(tests) - set(expected))
    assert not missing and not extra, "missing from the sdist: %s; not to ship: %s" % (missing, extra)
    assert set(TOP_LEVEL) <= set(shipped), shipped
    assert not [name for name in shipped if "__pycache__" in name or name.endswith(".pyc") or "/." in "/" + name]


def test_the_wheel_holds_the_module_its_license_and_its_console_script_only(built):
    names = wheel_files(built)
    dist_info = [name for name in names if re.match(r"kvmfleet_mcp-[^/]+\.dist-info/", name)]
    assert sorted(set(names) - set(dist_info)) == ["kvmfleet_mcp.py"], names
    assert wheel_read(built, "licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel_read(built, "entry_points.txt").decode("utf-8"))
    assert dict(entry_points["console_scripts"]) == {"kvmfleet-mcp": "kvmfleet_mcp:main"}
    with zipfile.ZipFile(built.wheel) as archive:
        assert archive.read("kvmfleet_mcp.py") == (ROOT / "kvmfleet_mcp.py").read_bytes()


@pytest.mark.parametrize("where", ["wheel", "sdist"])
def test_the_metadata_has_a_license_expression_the_project_urls_and_the_pythons(built, where):
    meta = metadata(wheel_read(built, "METADATA").decode("utf-8")) if where == "wheel" else sdist_metadata(built)
    assert tuple(int(part) for part in meta["Metadata-Version"].split(".")) >= (2, 4)
    fields: Dict[str, List[str]] = {key: meta.get_all(key) or [] for key in set(meta.keys())}
    assert fields["License-Expression"] == ["MIT"]
    assert fields["License-File"] == ["LICENSE"]
    assert "License" not in fields  # the old free-text field, superseded by the expression
    assert fields["Project-URL"] == PROJECT_URLS
    assert fields["Requires-Python"] == [">=3.9"]
    classifiers = fields["Classifier"]
    assert [c for c in classifiers if c.startswith("Programming Language :: Python :: ")] == \
        ["Programming Language :: Python :: " + version for version in PYTHONS]
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639: not beside an expression
