"""The wheel installs into a fresh virtualenv under the single `profilemesh` namespace."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORT_EVERYTHING = """
import importlib, pkgutil, profilemesh
names = [m.name for m in pkgutil.walk_packages(profilemesh.__path__, "profilemesh.")]
for name in names:
    importlib.import_module(name)
print(profilemesh.__file__)
print(len(names))
"""


def test_wheel_installs_in_a_fresh_venv_and_every_module_imports(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(ROOT)],
        check=True,
        timeout=600,
    )
    [wheel] = wheel_dir.glob("profilemesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"profilemesh"}
    assert "profilemesh/ingestion/v1/event.proto" in names
    assert "profilemesh/ingestion/v1/ingestion_service_pb2.pyi" in names
    assert "profilemesh/plugins/README.md" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    # Dependencies come from this test environment's site-packages, appended after the fresh
    # venv's own: a path added by a .pth file has its own .pth files ignored, so this
    # checkout's editable install cannot shadow the wheel.
    fresh_site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    result = subprocess.run(
        [python, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    location, count = result.stdout.split()
    assert Path(location).is_relative_to(venv), location
    assert int(count) > 40

    cli = subprocess.run(
        [venv / "bin" / "profilemesh", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert cli.returncode == 0, cli.stderr
    assert "serve" in cli.stdout and "up" in cli.stdout


def test_no_top_level_services_shared_or_plugins_package_is_importable() -> None:
    for name in ("services", "shared", "plugins"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, cwd="/"
        )
        assert result.returncode != 0, f"`import {name}` works; it must not"
