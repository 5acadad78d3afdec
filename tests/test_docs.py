"""Every code block the README and docs/ show: Python blocks run, YAML blocks build, relative links resolve.

The Python blocks of a page run in order in one namespace, as a reader runs them, in a temporary directory. A block
whose first line is ``# needs: espeak-ng`` runs where espeak-ng is installed (skipped elsewhere, required under CI
like every ``espeak`` test); ``# needs: N devices`` runs only with N CUDA devices.
"""

import ast
import importlib
import inspect
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


# Where LightningCLI finds a `class_path` given by its short name, in this order.
_CLASS_HOMES = (
    "lightning_peft.callbacks",
    "lightning_peft.modules",
    "lightning_peft.data",
    "lightning_peft.plugins",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.strategies",
    "torch.optim",
    "torch.optim.lr_scheduler",
)
# Built for real from the block's arguments (cheap, and their __init__ checks the values); the other classes (models
# and DataModules, which load weights or read files) have their argument names checked against their signature.
_INSTANTIATED = ("lightning_peft.callbacks", "lightning.pytorch.callbacks", "lightning.pytorch.strategies")


def _resolve(class_path: str) -> type:
    if "." in class_path:
        module, name = class_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)
    for home in _CLASS_HOMES:
        found = getattr(importlib.import_module(home), class_path, None)
        if isinstance(found, type):
            return found
    raise AssertionError(f"`class_path: {class_path}` names no class of {_CLASS_HOMES}")


def _argument_names(cls: type) -> tuple[set[str], bool]:
    """The keyword arguments ``cls(...)`` takes, and whether it takes any (``**kwargs``)."""
    names, open_ended = set(), False
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names, open_ended
        open_ended = True  # **kwargs are passed on to the parent: its names count too
    return names, open_ended


def _class_nodes(node, where="config"):
    """Every ``{class_path, init_args}`` of a parsed YAML block, with where it sits."""
    if isinstance(node, dict):
        if "class_path" in node:
            yield where, node
        for key, value in node.items():
            yield from _class_nodes(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _class_nodes(value, f"{where}[{index}]")


def check_config_block(config: dict) -> list[str]:
    """The classes a docs YAML block builds, checked as `lightning-peft fit --config` would meet them.

    Top-level sections are the CLI's; `trainer:` keys are `Trainer` arguments; every `class_path` names a class whose
    `init_args` are its arguments (callbacks and strategies are built from them, a model's `peft:` dict becomes a
    `PeftConfig`). Returns the class names checked; raises AssertionError naming what does not fit.
    """
    import lightning.pytorch as pl

    from lightning_peft.modules._peft import build_peft_config

    assert isinstance(config, dict), f"a config block is a mapping, got {type(config).__name__}"
    unknown = set(config) - {"trainer", "model", "data", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path"}
    assert not unknown, f"sections the CLI does not have: {sorted(unknown)}"
    trainer_names, _ = _argument_names(pl.Trainer)
    assert set(config.get("trainer") or {}) <= trainer_names, set(config["trainer"]) - trainer_names
    checked = []
    for where, node in _class_nodes(config):
        cls = _resolve(node["class_path"])
        init_args = node.get("init_args") or {}
        names, open_ended = _argument_names(cls)
        assert open_ended or set(init_args) <= names, f"{where}: {cls.__name__} takes no {set(init_args) - names}"
        if cls.__module__.startswith(_INSTANTIATED):
            assert isinstance(cls(**init_args), cls)
        if "peft" in init_args:
            assert build_peft_config(init_args["peft"]) is not None
        checked.append(cls.__name__)
    return checked


@pytest.mark.parametrize(("page", "index", "code"), _page_params("yaml"))
def test_yaml_blocks_build_the_classes_they_name(page, index, code):
    config = yaml.safe_load(code)
    checked = check_config_block(config)
    assert checked or set(config.get("trainer") or {}), "a docs YAML block configures something"


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ("trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {layers: 2, n_layer: 2}", "takes no"),
        ("trainer:\n  callbacks:\n    - class_path: LISA\n      init_args: {n_layers: 0}", "`n_layers` must be"),
        ("trainer:\n  callbacks:\n    - class_path: NoSuchCallback", "names no class"),
        ("trainer:\n  max_step: 10", "max_step"),
        ("model:\n  class_path: ImageClassifier\n  init_args: {model: vit_tiny_patch16_224}", "takes no"),
        ("model:\n  class_path: TextClassifier\n  init_args: {peft: {r: 8}}", "peft_type"),
        ("trainr: {max_steps: 1}", "sections the CLI does not have"),
    ],
)
def test_a_wrong_yaml_block_is_caught(block, match):
    with pytest.raises((AssertionError, ValueError), match=match):
        check_config_block(yaml.safe_load(block))


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
    assert index in namespace["__done__"]
    missing = sorted(_top_level_names(code) - set(namespace))
    assert not missing, f"the block ran but did not define {missing}"


def _top_level_names(code: str) -> set[str]:
    """Names a block binds at its top level (assignments, imports, defs): present after it ran to its end."""
    names = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*"}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_relative_links_resolve():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
