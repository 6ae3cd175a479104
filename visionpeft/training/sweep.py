"""Run one recipe over every task of a benchmark and tabulate the results.

VTAB-1k: the 19 tasks, their 3 group means, the mean of the group means (SPT/SNELL convention) and the
19-task mean (NOAH/VPT convention); also the generated tasks of a root whose task folders carry a ``task.json``
(the mini VTAB: those are the default tasks there). FGVC: the 5 datasets and their mean. Both the best-of-eval
top-1 (what the literature reports) and the final top-1 are given, labelled. A task whose output folder holds a
finished run of the same settings (the fingerprint of :mod:`visionpeft.training.checkpoints`) is reused and
named as reused; one of other settings is refused unless ``train.resume=restart``.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from visionpeft.data.formats import FGVC_DATASETS, VTAB_TASKS
from visionpeft.training.recipe import apply_overrides, validate

BENCHMARKS = {"vtab1k": list(VTAB_TASKS), "fgvc": list(FGVC_DATASETS)}


def generated_tasks(root: str | Path) -> dict[str, str]:
    """task -> group of the task folders under ``root`` that carry a ``task.json`` (group "generated" unless the
    file names one)."""
    found = {}
    for described in sorted(Path(root).glob("*/task.json")):
        try:
            group = json.loads(described.read_text()).get("group", "generated")
        except (json.JSONDecodeError, AttributeError):
            group = "generated"
        found[described.parent.name] = group if isinstance(group, str) else "generated"
    return found


def task_output(template: str, task: str) -> str:
    """A task's folder: the recipe's output with ``{task}`` filled in, or ``<output>/<task>``."""
    return template.replace("{task}", task) if "{task}" in template else str(Path(template) / task)


def results_folder(template: str) -> Path:
    """Where ``results.md`` goes: the folder above the per-task ones."""
    if "{task}" in template:
        return Path(template.split("{task}")[0] or ".")
    return Path(template)


def sweep(raw_recipe: dict[str, Any], overrides: list[str], tasks: list[str] | None = None,
          progress: bool = True) -> str:
    """Train the recipe on each task, reuse the tasks that already have a finished run of the same settings,
    write ``results.md`` above the task folders and return it."""
    from visionpeft.training.checkpoints import finished_run
    from visionpeft.training.runner import train

    raw = apply_overrides(raw_recipe, overrides)
    base = validate(raw, "recipe")
    benchmark = base["data"]["format"]
    if benchmark not in BENCHMARKS:
        raise ValueError(f"sweep runs over a benchmark's tasks: data.format must be vtab1k or fgvc, not {benchmark!r}")
    generated = generated_tasks(base["data"]["root"]) if benchmark == "vtab1k" else {}
    known = BENCHMARKS[benchmark] + [t for t in generated if t not in BENCHMARKS[benchmark]]
    tasks = tasks or (list(generated) if generated else BENCHMARKS[benchmark])
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown {benchmark} task(s) {unknown}; tasks: {', '.join(known)}")
    template = str(raw.get("output", base["output"]))
    results, reused = {}, []
    for task in tasks:
        recipe = validate(apply_overrides(raw, [f"data.task={task}", f"output={task_output(template, task)}"]), task)
        summary = None if recipe["train"]["resume"] == "restart" else finished_run(recipe)
        if summary is not None:
            reused.append(task)
            print(f"{task}: reused the finished run in {recipe['output']} (same settings; "
                  f"train.resume=restart trains it again)")
        results[task] = summary if summary is not None else train(recipe, progress)
    groups = {t: VTAB_TASKS[t][0] if t in VTAB_TASKS else generated.get(t, "fgvc") for t in tasks}
    table = tabulate(benchmark, results, groups)
    if reused:
        table += f"\n\nreused finished runs (same settings): {', '.join(reused)}"
    root = results_folder(template)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(table + "\n")
    return table


def tabulate(benchmark: str, results: dict[str, dict[str, Any]], groups: dict[str, str] | None = None) -> str:
    groups = groups or {t: VTAB_TASKS[t][0] if benchmark == "vtab1k" else "fgvc" for t in results}
    lines = ["| task | group | best-of-eval top-1 | final top-1 | trainable params |", "|---|---|---:|---:|---:|"]
    for task, summary in results.items():
        lines.append(f"| {task} | {groups[task]} | {summary['best_of_eval_top1']:.2f} | {summary['final_top1']:.2f} | "
                     f"{summary['trainable_parameters']:,} |")
    for label, key in (("best-of-eval", "best_of_eval_top1"), ("final", "final_top1")):
        if benchmark == "vtab1k":
            by_group = {}
            for task, summary in results.items():
                by_group.setdefault(groups[task], []).append(summary[key])
            means = {g: statistics.mean(v) for g, v in by_group.items()}
            lines.append("")
            lines.append(f"{label}: " + ", ".join(f"{g} {m:.2f}" for g, m in means.items())
                         + f"; mean of group means {statistics.mean(means.values()):.2f}"
                         + f"; {len(results)}-task mean {statistics.mean(s[key] for s in results.values()):.2f}")
        else:
            lines.append("")
            lines.append(f"{label}: mean over {len(results)} datasets {statistics.mean(s[key] for s in results.values()):.2f}")
    return "\n".join(lines)
