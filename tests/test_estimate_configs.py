"""`lightning-peft estimate` on every shipped config and on the 7B and 8B Llama configs: each prints its table, and
every row's byte counts equal the stored expectation (tests/estimate_configs_expected.json, tolerance 0).

The estimate counts bytes of fake tensors, so its numbers are exact and the same on every run of one environment:
a change to the estimator, to a method's trainable set or to a shipped config that moves any of them fails here.
When such a change is intended, regenerate the file with ``LIGHTNING_PEFT_WRITE_EXPECTED=1 pytest
tests/test_estimate_configs.py`` and say in the commit why the numbers moved.

The own-data configs read `data/...` relative to the working directory: the test writes small files of those kinds
there first, as a user's folder would hold them.
"""

import json
import os
from pathlib import Path

import pytest
from own_data import write_audio_folder, write_image_folder

from lightning_peft.cli.estimate import estimate_main as main
from lightning_peft.estimate import MemoryReport

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "benchmarks" / "estimate").glob("*.yaml"))
EXPECTED = Path(__file__).with_name("estimate_configs_expected.json")
# Every byte count of a row (the float growth per sample is left out: it is derived from these).
FIELDS = (
    "params",
    "grads",
    "optimizer_state",
    "saved_activations",
    "weight_copies",
    "recomputed",
    "trainable_params",
    "total_params",
    "total",
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _rows(report: MemoryReport) -> dict[str, dict[str, int]]:
    return {row.method: {field: int(getattr(row, field)) for field in FIELDS} for row in report.rows}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_estimate_runs_on_the_config(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data" / "images")
    write_audio_folder(tmp_path / "data" / "audio")
    rows = [f"a {'wonderful' if i % 2 else 'dull'} film number {i},{'good' if i % 2 else 'bad'}" for i in range(20)]
    (tmp_path / "data" / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")  # the config's columns
    printed: list[MemoryReport] = []
    to_text = MemoryReport.to_text
    monkeypatch.setattr(MemoryReport, "to_text", lambda self, *a, **k: printed.append(self) or to_text(self, *a, **k))
    main(["--config", str(config), "--memory", "80GiB"])
    out = capsys.readouterr().out
    assert "Full FT" in out and "LISA" in out and "Fits in 80.0GiB:" in out, out
    assert "(estimated in " in out
    assert len(printed) == 1, "the command prints one report"
    key = config.relative_to(ROOT).as_posix()
    measured = _rows(printed[0])
    if os.environ.get("LIGHTNING_PEFT_WRITE_EXPECTED"):
        stored = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
        stored[key] = measured
        EXPECTED.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")
    expected = json.loads(EXPECTED.read_text())
    assert key in expected, f"no stored numbers for {key}: regenerate {EXPECTED.name} (see the module docstring)"
    assert measured == expected[key]


def test_every_stored_expectation_belongs_to_a_config():
    stored = json.loads(EXPECTED.read_text())
    assert set(stored) == {c.relative_to(ROOT).as_posix() for c in CONFIGS}
    for rows in stored.values():
        assert "full" in rows and all(row["total"] > 0 for row in rows.values())
