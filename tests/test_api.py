"""The one import name and the public Python API: the README's example runs as written."""

from __future__ import annotations

import re
import site
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _readme_example()], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "student.safetensors").exists() and (tmp_path / "emb" / "manifest.json").exists()
    assert "patch_cosine" in result.stdout


def test_every_package_folder_is_installed() -> None:
    """A non-editable install ships only the packages pyproject lists: every folder with an ``__init__.py`` below a
    mapped folder is listed (the public package's own folder, mapped apart, aside)."""
    import tomllib

    root = README.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    homes = {(root / folder).resolve(): name for name, folder in setup["package-dir"].items()}
    found = set()
    for home, name in homes.items():
        for folder in (init.parent.resolve() for init in home.rglob("__init__.py")):
            if folder == home or folder not in homes:
                found.add(".".join((name, *folder.relative_to(home).parts)))
    assert found == set(setup["packages"])


def test_one_import_name() -> None:
    import apmpipe

    assert set(apmpipe.__all__) == {
        "extract",
        "train",
        "evaluate",
        "FeatureCache",
        "CacheStream",
        "CacheIterableDataset",
        "CacheMapDataset",
        "embed",
    }
    assert apmpipe.FeatureCache.__module__ == "apmpipe.storage.cache"
    site_packages = [*site.getsitepackages(), site.getusersitepackages()]
    for name in ("pipeline", "stages", "storage"):  # nothing installed top-level under the folders' own names
        assert PathFinder.find_spec(name, site_packages) is None, name
