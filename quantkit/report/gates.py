"""CI gates: the recipe's accuracy budgets judged against the report's measurements."""

from __future__ import annotations

from quantkit.recipe import Recipe


def check_gates(recipe: Recipe, report: dict) -> list[str]:
    """Human-readable failures of ``recipe.gates`` (min_sqnr in dB, max_drop in mAP50:95 points)."""
    failures = []
    g = recipe.gates
    if g.min_sqnr is not None:
        sqnr = report["accuracy"]["int8_vs_fp32_sqnr_db"]["worst_db"]
        if sqnr is None or float(sqnr) < g.min_sqnr:
            failures.append(f"INT8-vs-FP32 SQNR {sqnr} dB is below --min-sqnr {g.min_sqnr} dB")
    strong = report.get("strong")
    if g.require_strong and strong and strong.get("status") == "failed":
        failures.append(f"gates.require_strong: the strongly typed graph failed its check ({strong.get('failure')})")
    if g.max_drop is not None:
        ev = report.get("evaluation")
        if not ev:
            failures.append("--max-drop needs evaluation data (--eval DATA) and none was given")
        elif ev["drop_map50_95_points"] > g.max_drop:
            failures.append(f"INT8 mAP50:95 drop {ev['drop_map50_95_points']:.3f} points exceeds --max-drop {g.max_drop}")
    return failures


def gates_section(recipe: Recipe, failures: list[str]) -> dict:
    """The report's ``gates`` section."""
    return {"max_drop": recipe.gates.max_drop, "min_sqnr": recipe.gates.min_sqnr,
            "require_strong": recipe.gates.require_strong, "failures": failures,
            "passed": not failures}
