"""The causal-LM benchmark of LISA's embeddings / head choices runs every row on a tiny model, and each row trains
what its choice says: the same blocks in every LISA run of a seed, the embeddings and head in the steps it allows."""

import json
import math

import pytest

from benchmarks import lisa_choices

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_reports_every_choice_and_trains_what_it_says(tmp_path):
    lisa_choices.main(["--tiny", "--seeds", "0", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "lisa_choices_causal_tiny.json").read_text())
    runs = {name: rows[0] for name, rows in results["runs"].items()}
    assert list(runs) == list(lisa_choices.RUNS)
    assert math.isfinite(results["pretraining"]["val_ppl"])
    assert all(math.isfinite(row["final_ppl"]) for row in runs.values())
    steps = lisa_choices.TINY["steps"]
    expected = {  # (embeddings steps, head steps) of the choices that decide alone
        "lora": (0, 0),
        "lisa": (steps, steps),
        "embeddings_frozen": (0, steps),
        "head_frozen": (steps, 0),
        "both_frozen": (0, 0),
    }
    for name, trained in expected.items():
        assert (runs[name]["embeddings_steps"], runs[name]["head_steps"]) == trained, name
    assert runs["head_sampled"]["embeddings_steps"] == steps and runs["embeddings_sampled"]["head_steps"] == steps
    assert runs["head_sampled"]["head_steps"] < steps or runs["embeddings_sampled"]["embeddings_steps"] < steps
    trainable = {name: row["trainable_max"] for name, row in runs.items()}
    assert trainable["both_frozen"] < trainable["embeddings_frozen"] < trainable["lisa"]
    assert trainable["embeddings_frozen"] == trainable["head_frozen"]  # untied: two tables of the same size
    lisa_blocks = {json.dumps(row["blocks"]) for name, row in runs.items() if name != "lora"}
    assert len(lisa_blocks) == 1  # the choices draw from their own stream: the blocks are those of the default
    markdown_path = tmp_path / "lisa_choices_causal_tiny.md"
    markdown = markdown_path.read_text()
    assert "python -m benchmarks.lisa_choices --tiny" in markdown
    assert all(recipe.label in markdown for recipe in lisa_choices.RUNS.values())
    markdown_path.unlink()
    lisa_choices.main(["--tiny", "--render", "--out-dir", str(tmp_path)])
    assert markdown_path.read_text() == markdown
