"""benchmarks/estimate_llm.py: ratios against LoRA with the same savings, the goals and the rendered tables."""

from benchmarks import estimate_llm

GIB = 2**30


def _row(total_gib: float) -> dict:
    return {"label": "x", "total": int(total_gib * GIB)}


def _rows() -> dict:
    return {
        "lora": _row(60),
        "lora+checkpointing": _row(34),
        "lisa": _row(70),
        "lisa+checkpointing": _row(50),
        "lisa+adamw8bit+checkpointing+in_backward": _row(39),
        "lora+adamw8bit+checkpointing+in_backward": _row(34),
        "lisa_embeddings_head_frozen": _row(51),
        "lisa_embeddings_head_frozen+checkpointing": _row(38),
        "lisa_embeddings_head_frozen+adamw8bit+checkpointing+in_backward": _row(36),
        "full": _row(150),
        "full+int8_act+adamw8bit+in_backward": _row(54),
        "hft+checkpointing": _row(84),
        "hft+checkpointing+in_backward": _row(70),
    }


def test_goals_compare_each_lisa_row_with_lora_of_the_same_savings():
    rows = _rows()
    assert estimate_llm.ratios(rows, "lisa")["checkpointing"] == 50 / 34
    goals = {g["goal"].split(" <=")[0]: g for g in estimate_llm.goals(rows)}
    paper = goals["LISA (paper) + checkpointing"]
    assert paper["plain"] == 50 / 34 and paper["meeting"] == ["adamw8bit+checkpointing+in_backward"]  # 39 / 34
    lightest = goals["LISA (lightest) + checkpointing"]
    assert lightest["meeting"] == [] and not lightest["met"]  # 38 / 34 and 36 / 34 are above 1.05
    assert goals["LISA (lightest), no checkpointing"]["meeting"] == [""]  # 51 / 60
    assert goals["Full FT"]["meeting"] == ["int8_act+adamw8bit+in_backward"]
    assert goals["Half FT + checkpointing"]["meeting"] == ["checkpointing+in_backward"]


def test_render_names_every_goal_and_what_is_not_met():
    rows = _rows()
    results = {
        "config": "c.yaml",
        "device": "cuda",
        "seconds": 1.0,
        "environment": {"date": "today"},
        "losses": {"model loss": {"rows": rows, "goals": estimate_llm.goals(rows), "notes": []}},
    }
    text = estimate_llm.render(results)
    assert "| Full FT <= 60 GiB |" in text and "**not met** (best 1.06x)" in text
    assert "50.0 (1.47x)" in text  # LISA + checkpointing against LoRA + checkpointing
