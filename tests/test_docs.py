"""Every code block the README and docs/ show: Python blocks run, YAML blocks parse, relative links resolve.

The Python blocks of a page run in order in one namespace, as a reader runs them, in a temporary directory. A block
whose first line is ``# needs: espeak-ng`` runs where espeak-ng is installed (skipped elsewhere, required under CI
like every ``espeak`` test); ``# needs: N devices`` runs only with N CUDA devices.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
_NEEDS = re.compile(r"^# needs: (.+)$")

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in _FENCE.findall(page.read_text()) if lang == language]


def _page_params(language: str):
    params = []
    for page in PAGES:
        for index, code in enumerate(blocks(page, language)):
            marks = []
            needs = _NEEDS.match(code.splitlines()[0]) if code.strip() else None
            if needs and needs.group(1) == "espeak-ng":
                marks.append(pytest.mark.espeak)
            params.append(pytest.param(page, index, code, marks=marks, id=f"{page.name}-{language}{index}"))
    return params


def test_there_are_docs_pages():
    names = {page.name for page in PAGES}
    assert {"README.md", "lisa.md", "ist.md", "half-finetuning.md", "early-pruning.md", "data.md", "cli.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250, "the README is a front page"


@pytest.mark.parametrize(("page", "index", "code"), _page_params("yaml"))
def test_yaml_blocks_parse(page, index, code):
    assert yaml.safe_load(code) is not None


_NAMESPACES: dict[Path, dict] = {}


def _unmet_need(code: str) -> str | None:
    """Why a block cannot run here (None when it can)."""
    needs = _NEEDS.match(code.splitlines()[0]) if code.strip() else None
    if needs is None:
        return None
    need = needs.group(1)
    if need == "espeak-ng":
        return None if shutil.which("espeak-ng") else "needs espeak-ng"
    wanted = int(need.split()[0])
    return None if torch.cuda.device_count() >= wanted else f"the block needs {wanted} CUDA devices"


@pytest.mark.parametrize(("page", "index", "code"), _page_params("python"))
def test_python_blocks_run(page, index, code, tmp_path_factory, monkeypatch):
    reason = _unmet_need(code)
    if reason is not None and "CUDA" in reason:  # espeak-ng blocks carry the `espeak` marker (conftest.py) instead
        pytest.skip(reason)
    # One namespace and working directory per page: later blocks use what earlier ones defined, so the earlier
    # blocks that can run here run first when this block is selected alone.
    namespace = _NAMESPACES.setdefault(page, {"__name__": f"docs_{page.stem}", "__done__": set()})
    workdir = namespace.setdefault("__workdir__", tmp_path_factory.mktemp(page.stem))
    monkeypatch.chdir(workdir)
    for earlier, earlier_code in enumerate(blocks(page, "python")[: index + 1]):
        if earlier in namespace["__done__"] or (earlier < index and _unmet_need(earlier_code)):
            continue
        exec(compile(earlier_code, f"{page.name}[python block {earlier}]", "exec"), namespace)
        namespace["__done__"].add(earlier)


def test_relative_links_resolve():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
