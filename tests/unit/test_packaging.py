"""Installing imagegate puts one top-level name into site-packages: `imagegate`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_installed_under_the_imagegate_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        f"imagegate.{path.parent.relative_to(ROOT).as_posix().replace('/', '.')}"
        for top in setuptools["package-dir"].values()
        for path in (ROOT / top).rglob("__init__.py")
    }
    assert folders == set(setuptools["packages"])


def test_no_generic_top_level_package_is_importable_outside_the_checkout(tmp_path):
    probe = (
        "import importlib.util as u, sys; "
        "sys.exit([n for n in ('app', 'workers', 'client', 'migrations') if u.find_spec(n)] or 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
