"""Run every method on every architecture of the model zoo and write the support matrix.

    python -m benchmarks.support_matrix                  # all models; rewrites the README's support section
    python -m benchmarks.support_matrix hf_t5 timm_swin  # some models; prints only
    python -m benchmarks.support_matrix --render         # rewrite the markdown and README from the JSON

Each cell is :func:`lightning_peft.support.check_support` on a tiny random model of ``tests/zoo_models.py``: it
checks what the method promises (see that module), not only that nothing crashed. The columns are the methods of the
registry (:mod:`lightning_peft.methods`) that the support check knows, headed by their labels: a method registered
before this runs gets its own column. Results:
``benchmarks/results/support_matrix.json`` and ``.md``; the markdown table replaces the part of README.md between
the ``support-matrix`` markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from lightning_peft.methods import get_method
from lightning_peft.support import check_support, supported_methods

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
SYMBOL = {"ok": "OK", "partial": "OK*", "refused": "refused", "fail": "FAIL"}


def label(method: str) -> str:
    """The registry's label of ``method`` (its name, for a result whose method is not registered here)."""
    try:
        return get_method(method).label
    except KeyError:
        return method


def columns(rows: list[dict]) -> list[str]:
    """The methods of the rows' cells, in the order they were checked (the registry's)."""
    return list(rows[0]["cells"]) if rows else list(supported_methods())


def load_zoo() -> dict:
    spec = importlib.util.spec_from_file_location("zoo_models", ROOT / "tests" / "zoo_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_models"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.ZOO


def run(names: list[str]) -> list[dict]:
    zoo = load_zoo()
    unknown = [n for n in names if n not in zoo]
    if unknown:
        raise SystemExit(f"unknown zoo entries {unknown}; known: {sorted(zoo)}")
    rows = []
    methods = supported_methods()
    for name in names or sorted(zoo, key=lambda n: (zoo[n].family, zoo[n].kind, n)):
        entry = zoo[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = check_support(entry.build, entry.inputs(2), entry.output, entry.causal_lm)
        cells = {r.method: {"status": r.status, "detail": r.detail, "seconds": round(r.seconds, 2)} for r in results}
        rows.append({"model": name, "family": entry.family, "kind": entry.kind, "cells": cells})
        print(f"{name:22s} " + "  ".join(f"{label(m)}={cells[m]['status']}" for m in methods), flush=True)
        for method in methods:
            if cells[method]["status"] in ("fail", "refused", "partial"):
                print(f"    {method}: {cells[method]['detail'][:240]}", flush=True)
    return rows


def _reason(method: str, cell: dict) -> str:
    """The part of a cell's detail that explains it, without the model's own module paths."""
    detail = cell["detail"]
    if cell["status"] == "partial" and "left out: " in detail:
        entries = re.sub(r" \(\+\d+ more\)$", "", detail.split("left out: ", 1)[1]).split("; ")
        reasons = []
        for entry in entries:
            reason = entry.split(": ", 1)[1] if ": " in entry else entry
            reason = re.sub(r" \((RuntimeError|ValueError|IndexError): .*", "", reason)
            if reason not in reasons:
                reasons.append(reason)
        return f"{label(method)} leaves out: " + "; ".join(reasons)
    if cell["status"] == "refused":
        detail = re.sub(r" \(at '[^']*'\)", "", detail.split(" HINT:", 1)[0])
    return f"{label(method)}: {detail}"


def markdown(rows: list[dict], notes_at: str | None = None) -> str:
    """The table; the numbered reasons follow it, or, with ``notes_at``, one line linking to where they are."""
    methods = columns(rows)
    clean = [r for r in rows if all(r["cells"][m]["status"] == "ok" for m in methods)]
    header = "| model | family | layout | " + " | ".join(label(m) for m in methods) + " |"
    lines = [
        f"OK for all {len(methods)} methods ({len(clean)} models): " + ", ".join(f"`{r['model']}`" for r in clean),
        "",
        header,
        "|" + "---|" * (3 + len(methods)),
    ]
    notes: dict[str, int] = {}
    for row in rows:
        if row in clean:
            continue
        cells = []
        for method in methods:
            cell = row["cells"][method]
            text = SYMBOL[cell["status"]]
            if cell["status"] in ("partial", "refused", "fail"):
                number = notes.setdefault(_reason(method, cell), len(notes) + 1)
                text += f" [{number}]"
            cells.append(text)
        lines.append(f"| `{row['model']}` | {row['family']} | {row['kind']} | " + " | ".join(cells) + " |")
    counts = {s: sum(r["cells"][m]["status"] == s for r in rows for m in methods) for s in SYMBOL}
    lines += [
        "",
        f"{len(rows)} models x {len(methods)} methods: {counts['ok']} OK, {counts['partial']} OK with parts left out"
        f" (OK*), {counts['refused']} refused with a reason, {counts['fail']} failures.",
        "",
    ]
    if notes_at is None:
        lines += [f"{number}. {note.replace('|', '/')}" for note, number in notes.items()]
    else:
        lines.append(f"What each numbered cell leaves out or why it is refused: [{notes_at}]({notes_at}).")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], meta: dict) -> None:
    """Write the JSON and markdown results and the README's support-matrix section."""
    table = markdown(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "support_matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / "support_matrix.md").write_text(table)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        short = markdown(rows, notes_at=str((RESULTS / "support_matrix.md").relative_to(ROOT)))
        readme.write_text(f"{head}{START}\n{short}{END}{tail}")
        print(f"README.md support matrix rewritten ({len(rows)} models)")
    else:
        print(f"README.md has no {START} / {END} markers: table only in {RESULTS / 'support_matrix.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="zoo entries to run (default: all, and rewrite the README)")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown and README from the JSON only")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "support_matrix.json").read_text())
        write(saved["rows"], saved["meta"])
        return
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation
    rows = run(args.models)
    if args.models:
        return
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python -m benchmarks.support_matrix",
    }
    write(rows, meta)


if __name__ == "__main__":
    main()
