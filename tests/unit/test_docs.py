"""The docs stay true: the config reference matches the dataclasses, every config key is described, the site
builds with no warning or broken link, and the README stays a door (under 10 KB)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current() -> None:
    ref = _reference()
    assert ref.PAGE.read_text() == ref.render(), (
        "docs/reference/config.md is out of date with fedpeft_edge/config.py; regenerate it: "
        "PYTHONPATH=$PWD .venv/bin/python scripts/config_reference.py"
    )


def test_every_config_key_is_described() -> None:
    missing = _reference().undescribed()
    assert not missing, f"give these fields a trailing comment in fedpeft_edge/config.py: {missing}"


def test_reference_lists_every_section_key_type_and_default() -> None:
    text = _reference().render()
    assert "### `peft_args.lora`" in text and "### `lab_args.outages[]`" in text
    assert "| `model_kwargs` | `Mapping[str, Any]` | `{}` | Passed to timm.create_model |" in text
    assert "| `encoding` | one of `fp32`, `fp16`, `bf16`, `int8`, `int8_row` | `\"fp32\"` |" in text
    assert "| `name` | `str` | required |" in text  # a study's name has no default


def test_field_docs_read_docstrings_trailing_and_block_comments(tmp_path: Path) -> None:
    ref = _reference()
    source = tmp_path / "_docs_probe.py"
    source.write_text(
        "import dataclasses\n\n\n@dataclasses.dataclass\nclass Probe:\n"
        "    a: int = 1  # trailing one\n"
        "    # A block above.\n    # Second sentence here. Not this one.\n    b: int = 2\n"
        "    c: int = 3\n    \"\"\"An attribute docstring.\"\"\"\n"
        "    d: int = 4\n"
    )
    try:
        spec = importlib.util.spec_from_file_location("_docs_probe", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_docs_probe"] = module
        spec.loader.exec_module(module)
        docs = ref.field_docs(module.Probe)
    finally:
        sys.modules.pop("_docs_probe", None)
    assert docs == {"a": "Trailing one", "b": "A block above", "c": "An attribute docstring"}


def test_readme_is_a_door() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size < 10_000, f"README.md is {size} bytes; keep it under 10 KB and move the detail into docs/"


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (pip install '.[docs]')")
def test_docs_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


@pytest.mark.parametrize("page", ["README.md", "docs/architecture.md"])
def test_layout_names_every_top_level_directory(page: str) -> None:
    text = (ROOT / page).read_text()
    layout = text.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top = {line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line}
    missing = sorted(d for d in top if f"{d}/" not in layout)
    assert not missing, f"the Layout of {page} does not name {missing}"
