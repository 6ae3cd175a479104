"""Run one recipe over every task of a benchmark and tabulate the results.

VTAB-1k: the 19 tasks, their 3 group means, the mean of the group means (SPT/SNELL convention) and the
19-task mean (NOAH/VPT convention); FGVC: the 5 datasets and their mean. Both the best-of-eval top-1
(what the literature reports) and the final top-1 are given, labelled.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from visionpeft.data.formats import FGVC_DATASETS, VTAB_TASKS
from visionpeft.training.recipe import apply_overrides, validate

BENCHMARKS = {"vtab1k": list(VTAB_TASKS), "fgvc": list(FGVC_DATASETS)}


def sweep(raw_recipe: dict[str, Any], overrides: list[str], tasks: list[str] | None = None,
          progress: bool = True) -> str:
    """Train the recipe on each task (output/<task>), skip tasks that already have a summary, write
    ``output/results.md`` and return it."""
    from visionpeft.training.runner import train

    base = validate(apply_overrides(raw_recipe, overrides), "recipe")
    benchmark = base["data"]["format"]
    if benchmark not in BENCHMARKS:
        raise ValueError(f"sweep runs over a benchmark's tasks: data.format must be vtab1k or fgvc, not {benchmark!r}")
    tasks = tasks or BENCHMARKS[benchmark]
    unknown = [t for t in tasks if t not in BENCHMARKS[benchmark]]
    if unknown:
        raise ValueError(f"unknown {benchmark} task(s) {unknown}; tasks: {', '.join(BENCHMARKS[benchmark])}")
    root = Path(base["output"])
    results = {}
    for task in tasks:
        recipe = validate(apply_overrides(raw_recipe, overrides + [f"data.task={task}", f"output={root / task}"]), task)
        summary_file = Path(recipe["output"]) / "summary.json"
        results[task] = json.loads(summary_file.read_text()) if summary_file.is_file() else train(recipe, progress)
    table = tabulate(benchmark, results)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(table + "\n")
    return table


def tabulate(benchmark: str, results: dict[str, dict[str, Any]]) -> str:
    lines = ["| task | group | best-of-eval top-1 | final top-1 | trainable params |", "|---|---|---:|---:|---:|"]
    for task, summary in results.items():
        group = VTAB_TASKS[task][0] if benchmark == "vtab1k" else "fgvc"
        lines.append(f"| {task} | {group} | {summary['best_of_eval_top1']:.2f} | {summary['final_top1']:.2f} | "
                     f"{summary['trainable_parameters']:,} |")
    for label, key in (("best-of-eval", "best_of_eval_top1"), ("final", "final_top1")):
        if benchmark == "vtab1k":
            groups = {}
            for task, summary in results.items():
                groups.setdefault(VTAB_TASKS[task][0], []).append(summary[key])
            means = {g: statistics.mean(v) for g, v in groups.items()}
            lines.append("")
            lines.append(f"{label}: " + ", ".join(f"{g} {m:.2f}" for g, m in means.items())
                         + f"; mean of group means {statistics.mean(means.values()):.2f}"
                         + f"; {len(results)}-task mean {statistics.mean(s[key] for s in results.values()):.2f}")
        else:
            lines.append("")
            lines.append(f"{label}: mean over {len(results)} datasets {statistics.mean(s[key] for s in results.values()):.2f}")
    return "\n".join(lines)
