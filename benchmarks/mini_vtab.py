"""Mini VTAB-1k: every method on every generated task, 3 seeds, both tiny pretrained backbones.

Accuracy: each (backbone, task, method, seed) is trained by the recipe runner from
``recipes/mini_vtab/<method>.yaml`` (the same schedule for every method, final top-1 on the test
split, no best-of-eval picking); finished runs are kept under ``--runs`` and skipped on a re-run.
Cost: step time and training-step peak memory of each method at the recipes' batch size, measured
by ``harness.py`` (each configuration in its own process, interleaved rounds) against the frozen
floor (trunk frozen, activation gradients through every block) and HF PEFT's LoRA, the outside peer. HF PEFT's
LoRA and DoRA (``peft-lora``, ``peft-dora``) train from their own recipes at visionpeft LoRA's and DoRA's rank and
learning rate, on the layers those adapt, so each pair differs only in implementation.

Writes a markdown table per backbone (top-1 mean ± std per task, average, trainable parameters, step
time, memory above the floor), the targets' verdicts, a bar chart, and average top-1 against trainable
parameters for every method (``<out>_per_parameter.png``: accuracy per parameter is NOLA's point).

    python benchmarks/mini_vtab.py [--backbones vit convnet] [--seeds 0 1 2] [--workers 2] [--out benchmarks/results/mini_vtab_cpu.md]
    python benchmarks/mini_vtab.py --tune-lr --tasks digits orientation --workers 2 [--backbones convnet]   # learning rates
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import Workload, frozen_floor, machine  # noqa: E402
from harness import main as harness_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "mini_vtab"
METHODS = ["linear", "full", "peft-lora", "lora", "flora", "snella", "sara", "svd", "peft-dora", "dora", "map", "mora",
           "nola", "alpha-lora"]
PEFT_METHODS = ["lora", "flora", "snella", "sara", "svd", "dora", "map", "mora", "nola", "alpha-lora"]
BACKBONES = ["vit", "convnet"]
BATCH = 32


def recipe_for(method: str, backbone: str, overrides: list[str] = ()) -> dict:
    """The method's recipe on ``backbone`` with that backbone's own choices
    (``visionpeft.data.mini_vtab.backbone_overrides``), then ``overrides``."""
    from visionpeft.data.mini_vtab import backbone_overrides
    from visionpeft.training import load_recipe

    return load_recipe(RECIPES / f"{method}.yaml", [*backbone_overrides(method, backbone), *overrides])


# --- accuracy -------------------------------------------------------------------------------------
# Learning rates tried per backbone and method on train800 -> val200 (seed 0) by ``--tune-lr``; PEFT's
# LoRA takes LoRA's, so the two differ only in implementation. The grids reach one step past each
# method's best, so no best sits on an edge.
LR_GRID = {
    "vit": {"linear": [1e-2, 3e-2, 1e-1, 3e-1, 1.0], "full": [3e-4, 1e-3, 3e-3],
            "lora": [3e-3, 1e-2, 3e-2], "flora": [1e-3, 3e-3, 1e-2, 3e-2],
            "snella": [3e-3, 1e-2, 3e-2, 1e-1], "sara": [3e-3, 1e-2, 3e-2, 1e-1],
            "svd": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "dora": [3e-3, 1e-2, 3e-2], "map": [3e-3, 1e-2, 3e-2],
            "mora": [3e-3, 1e-2, 3e-2], "nola": [3e-4, 1e-3, 3e-3], "alpha-lora": [3e-3, 1e-2, 3e-2]},
    "convnet": {"linear": [3e-2, 1e-1, 3e-1], "full": [3e-4, 1e-3, 3e-3, 1e-2],
                "lora": [3e-3, 1e-2, 3e-2], "flora": [1e-3, 3e-3, 1e-2, 3e-2],
                "snella": [3e-3, 1e-2, 3e-2, 1e-1], "sara": [1e-2, 3e-2, 1e-1, 3e-1], "svd": [3e-2, 1e-1, 3e-1, 1.0],
                "dora": [3e-3, 1e-2, 3e-2], "map": [3e-3, 1e-2, 3e-2],
                "mora": [3e-3, 1e-2, 3e-2], "nola": [3e-4, 1e-3, 3e-3], "alpha-lora": [3e-3, 1e-2, 3e-2]},
}
LR_TIE = 1.0


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_one(method: str, backbone: str, overrides: list[str]) -> dict:
    from visionpeft.training import train

    return train(recipe_for(method, backbone, overrides), progress=False)


def _same_recipe(recipe_file: Path, method: str, backbone: str, overrides: list[str]) -> bool:
    """Whether a finished run was trained from the recipe as it is now (a changed learning rate re-runs it)."""
    current = json.loads(json.dumps(recipe_for(method, backbone, overrides), default=str))
    return json.loads(recipe_file.read_text()) == current


def run_jobs(jobs: dict, workers: int, desc: str, train: bool = True) -> dict:
    """Train every job ``{key: (method, backbone, overrides, output)}``; {key: summary}.

    A job whose ``output/summary.json`` exists is read, not re-run, unless its ``recipe.json`` differs
    from the recipe as it is now. With ``workers`` > 1 the jobs run in
    that many spawned processes sharing this process's threads (on 2 cores, two 1-thread runs finish
    1.4x sooner than one 2-thread run; the results are the same, training is deterministic).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    summaries, todo = {}, {}
    for key, (method, backbone, overrides, output) in jobs.items():
        job = (method, backbone, [*overrides, f"output={output}"])
        summary_file, recipe_file = Path(output) / "summary.json", Path(output) / "recipe.json"
        if summary_file.is_file() and (not recipe_file.is_file() or _same_recipe(recipe_file, *job)):
            summaries[key] = json.loads(summary_file.read_text())
        else:
            todo[key] = job
    if not train:
        return summaries
    progress = tqdm(total=len(jobs), initial=len(summaries), desc=desc, unit="run")
    if workers <= 1 or len(todo) <= 1:
        for key, job in todo.items():
            summaries[key] = _train_one(*job)
            progress.update()
    else:
        threads = max(1, torch.get_num_threads() // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_set_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(_train_one, *job): key for key, job in todo.items()}
            for future in as_completed(futures):
                summaries[futures[future]] = future.result()
                progress.update()
    progress.close()
    return summaries


def _epochs(args) -> list[str]:
    return [f"train.epochs={args.epochs}"] if args.epochs else []


def run_accuracy(args) -> dict:
    """{(backbone, task, method): [final top-1 per seed]} and {(backbone, method): trainable parameters}."""
    from visionpeft.data.mini_vtab import write_mini_vtab

    write_mini_vtab(args.data, args.tasks)
    jobs = {}
    # seed-major: an interrupted grid leaves whole seeds of the table, not whole tasks
    for backbone, task, method, seed in ((b, t, m, s) for b in args.backbones for s in args.seeds
                                         for t in args.tasks for m in args.methods):
        overrides = [f"data.root={args.data}", f"data.task={task}", f"train.seed={seed}", *_epochs(args)]
        jobs[(backbone, task, method, seed)] = (method, backbone, overrides,
                                                Path(args.runs) / backbone / task / method / f"seed{seed}")
    summaries = run_jobs(jobs, args.workers, "mini VTAB runs", train=not args.finished_only)
    if args.finished_only:  # report only the backbones whose every run has finished
        for backbone in list(args.backbones):
            done = sum(key[0] == backbone for key in summaries)
            expected = sum(key[0] == backbone for key in jobs)
            if done < expected:
                print(f"tiny {backbone}: {done} of {expected} runs finished; left out of the report")
                args.backbones.remove(backbone)
    top1: dict = {}
    trainable: dict = {}
    for (backbone, task, method, seed) in jobs:  # insertion order: seeds in order, first task first
        if backbone not in args.backbones:
            continue
        summary = summaries[(backbone, task, method, seed)]
        top1.setdefault((backbone, task, method), []).append(summary["final_top1"])
        trainable.setdefault((backbone, method), summary["trainable_parameters"])
    return {"top1": top1, "trainable": trainable}


def chosen_lr(means: dict[float, float]) -> float:
    """The smallest rate within ``LR_TIE`` points of the best val200 mean: near the edge of stability a
    higher rate buys little on one seed and can diverge on another."""
    top = max(means.values())
    return min(lr for lr, mean in means.items() if mean >= top - LR_TIE)


def tune_lr(args) -> str:
    """Train each method at each of its ``LR_GRID`` rates on train800, score on val200 (seed 0); a table. The
    outside peers (``PEER_OF``) take the rate of the method they are compared with."""
    from visionpeft.data.mini_vtab import PEER_OF, write_mini_vtab

    write_mini_vtab(args.data, args.tasks)
    methods = [m for m in args.methods if m not in PEER_OF]
    jobs = {}
    for backbone, task, method in ((b, t, m) for b in args.backbones for t in args.tasks for m in methods):
        for lr in LR_GRID[backbone][method]:
            overrides = [f"data.root={args.data}", f"data.task={task}", "data.train_split=train800",
                         "data.eval_split=val200", "train.seed=0", f"train.lr={lr}", *_epochs(args)]
            jobs[(backbone, task, method, lr)] = (method, backbone, overrides,
                                                  Path(args.runs) / "lr" / backbone / task / method / f"lr{lr:g}")
    summaries = run_jobs(jobs, args.workers, "learning-rate runs")
    lines = [f"Machine: {machine('cpu')}. Val200 top-1 after training on train800 (seed 0, the recipes' schedule); "
             f"**bold** is each method's choice: the smallest rate within {LR_TIE:g} point of its best mean over the tasks.", ""]
    for backbone in args.backbones:
        lines += [f"### tiny {backbone}: learning rate on val200", "",
                  "| method | lr | " + " | ".join(args.tasks) + " | mean |", "|---|---:|" + "---:|" * (len(args.tasks) + 1)]
        for method in methods:
            means = {lr: statistics.mean(summaries[(backbone, t, method, lr)]["final_top1"] for t in args.tasks)
                     for lr in LR_GRID[backbone][method]}
            best = chosen_lr(means)
            for lr in LR_GRID[backbone][method]:
                cells = [f"{summaries[(backbone, t, method, lr)]['final_top1']:.1f}" for t in args.tasks]
                mark = "**" if lr == best else ""
                lines.append(f"| {method} | {mark}{lr:g}{mark} | " + " | ".join(cells) + f" | {mark}{means[lr]:.1f}{mark} |")
        lines.append("")
    return "\n".join(lines)


# --- cost -----------------------------------------------------------------------------------------
def _batch(device: str):
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (BATCH,), generator=g).to(device)


def _loss(model, inputs, target):
    import visionpeft as vp

    return F.cross_entropy(model(inputs), target) + vp.regularization(model)


def _floor_params(model):
    # the lowest cheap parameter, so activation gradients flow through every block
    return [model.pos_embed] if hasattr(model, "pos_embed") else [model.stem[1].weight]


def workloads() -> dict[str, Workload]:
    from visionpeft.models.tiny import tiny

    return {b: Workload(f"tiny {b}, 32 px, batch {BATCH}", lambda b=b: tiny(b, num_classes=10), _batch, _loss,
                        floor_params=_floor_params, head=("head",) if b == "vit" else ("head.fc",))
            for b in BACKBONES}


def _adapter_config(method: str):
    def setup(model, workload):
        from visionpeft.training.runner import apply_adapter

        backbone = "vit" if hasattr(model, "pos_embed") else "convnet"
        return apply_adapter(model, recipe_for(method, backbone)["adapter"])

    return setup


def cost_configs() -> dict:
    return {"floor": frozen_floor} | {m: _adapter_config(m) for m in METHODS}


def run_cost(args) -> dict:
    """{(backbone, method): harness row}."""
    rows = {}
    for backbone in args.backbones:
        argv = ["--workloads", backbone, "--configs", "floor", *args.methods, "--repeats", str(args.repeats),
                "--steps", str(args.steps), "--warmup", "2"]
        for row in harness_main(cost_configs(), workloads(), floor="floor", peer="peft-lora", argv=argv):
            rows[(backbone, row["config"])] = row
    return rows


# --- report ---------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def render(args, accuracy: dict, cost: dict) -> str:
    top1, trainable = accuracy["top1"], accuracy["trainable"]
    lines = [f"Machine: {machine('cpu')}. Top-1 on each task's test split after the recipes' 10 epochs "
             f"(mean ± std over seeds {', '.join(map(str, args.seeds))}); step time and training-step peak "
             f"memory at batch {BATCH} (median of {args.steps} steps, {args.repeats} interleaved rounds, own process).", ""]
    for backbone in args.backbones:
        floor = cost.get((backbone, "floor"))
        lines += [f"### tiny {backbone}", "",
                  "| method | " + " | ".join(args.tasks) + f" | average | trainable ({args.tasks[0]}) | step × floor | memory above floor (MB) |",
                  "|---|" + "---:|" * (len(args.tasks) + 4)]
        for method in args.methods:
            row = cost.get((backbone, method))
            step = f"{row['step_s'] / floor['step_s']:.2f}" if row and floor else "n/a"
            memory = f"{row['peak_mb'] - floor['peak_mb']:+.0f}" if row and floor else "n/a"
            cells = []
            for task in args.tasks:
                mean, std = _mean_std(top1[(backbone, task, method)])
                cells.append(f"{mean:.1f} ± {std:.1f}")
            average = statistics.mean(statistics.mean(top1[(backbone, t, method)]) for t in args.tasks)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {average:.1f} | {trainable[(backbone, method)]:,} | "
                         f"{step} | {memory} |")
        if floor:
            lines.append(f"\nFrozen floor: {floor['step_s'] * 1000:.0f} ms/step, {floor['peak_mb']:.0f} MB peak.")
        lines += ["", *verdicts(args, top1, backbone), ""]
    return "\n".join(lines)


def verdicts(args, top1: dict, backbone: str) -> list[str]:
    """The three targets, checked on this backbone's numbers."""
    out = []
    methods = [m for m in args.methods if m != "linear"]
    if "linear" in args.methods:
        losses = [f"{m} on {t}" for m in methods for t in args.tasks
                  if statistics.mean(top1[(backbone, t, m)]) <= statistics.mean(top1[(backbone, t, "linear")])]
        out.append(f"- every method beats the linear probe on every task: "
                   f"{'**met**' if not losses else '**missed** (' + ', '.join(losses) + ')'}")
    for method, label in (("lora", "LoRA"), ("dora", "DoRA")):
        peer = f"peft-{method}"
        if {method, peer} <= set(args.methods):
            out.append(f"- our {label} within one std of PEFT's {label}, or ahead of it: "
                       f"{_peer_verdict(top1, backbone, args.tasks, method, peer)}")
    if "full" in args.methods:
        average = {m: statistics.mean(statistics.mean(top1[(backbone, t, m)]) for t in args.tasks) for m in args.methods}
        candidates = [m for m in PEFT_METHODS if m in average]
        if candidates:
            best = max(candidates, key=average.get)
            gap = average["full"] - average[best]
            out.append(f"- best PEFT method ({best}, {average[best]:.1f}) within 1 point of full fine-tuning "
                       f"({average['full']:.1f}) on average: {'**met**' if gap <= 1.0 else '**missed**'} (gap {gap:+.1f})")
    return out


def _peer_verdict(top1: dict, backbone: str, tasks: list[str], method: str, peer: str) -> str:
    """The outside peer is there to catch our method doing worse; ahead of it is reported, not counted as a miss."""
    behind, ahead = [], []
    for task in tasks:
        ours, _ = _mean_std(top1[(backbone, task, method)])
        theirs, std = _mean_std(top1[(backbone, task, peer)])
        if abs(ours - theirs) > std:
            (ahead if ours > theirs else behind).append(
                f"{task} ({ours:.1f} vs {theirs:.1f} ± {std:.1f}, ours {'ahead' if ours > theirs else 'behind'})")
    verdict = "**met**" if not behind else "**missed** on " + ", ".join(behind)
    if ahead:
        verdict += f"; more than one std ahead on {', '.join(ahead)}"
    return verdict


def plot(args, accuracy: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1 = accuracy["top1"]
    fig, axes = plt.subplots(1, len(args.backbones), figsize=(6.5 * len(args.backbones), 3.8), squeeze=False)
    methods = args.methods
    width = 0.8 / len(methods)
    for ax, backbone in zip(axes[0], args.backbones):
        for i, method in enumerate(methods):
            stats = [_mean_std(top1[(backbone, t, method)]) for t in args.tasks]
            ax.bar([x + i * width for x in range(len(args.tasks))], [m for m, _ in stats], width,
                   yerr=[s for _, s in stats], label=method, capsize=2)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(args.tasks))], args.tasks)
        ax.set(ylabel="top-1 (%)", title=f"tiny {backbone}", ylim=(0, 100))
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("mini VTAB-1k: test top-1, mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_parameter(args, accuracy: dict, path: Path) -> None:
    """Average top-1 over the tasks against trainable parameters (log scale), every method, one panel per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1, trainable = accuracy["top1"], accuracy["trainable"]
    fig, axes = plt.subplots(1, len(args.backbones), figsize=(6.5 * len(args.backbones), 4.2), squeeze=False)
    for ax, backbone in zip(axes[0], args.backbones):
        for method in args.methods:
            average = statistics.mean(statistics.mean(top1[(backbone, t, method)]) for t in args.tasks)
            count = trainable[(backbone, method)]
            ax.scatter([count], [average], s=18)
            ax.annotate(method, (count, average), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="trainable parameters", ylabel="average top-1 (%)", title=f"tiny {backbone}")
        ax.grid(alpha=0.3)
    fig.suptitle("mini VTAB-1k: average test top-1 against trainable parameters")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if "--child" in sys.argv:  # a cost measurement process started by the harness
        harness_main(cost_configs(), workloads(), floor="floor", peer="peft-lora")
        return
    from visionpeft.data.mini_vtab import MINI_TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--tasks", nargs="+", default=list(MINI_TASKS), choices=list(MINI_TASKS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cost measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of cost measurements")
    parser.add_argument("--skip-cost", action="store_true", help="accuracy only")
    parser.add_argument("--tune-lr", action="store_true",
                        help="instead of the benchmark: each method's LR_GRID on train800 -> val200, seed 0")
    parser.add_argument("--workers", type=int, default=1, help="training runs in parallel, sharing the threads")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: report the backbones whose runs have all finished")
    parser.add_argument("--data", default="runs/mini_vtab")
    parser.add_argument("--runs", default="runs/mini_vtab_bench")
    parser.add_argument("--out", default=None, help="write the markdown report here (and a .png chart beside it)")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (got {args.workers})")
    if args.tune_lr:
        write_report(args.out, "Mini VTAB-1k learning rates: `python benchmarks/mini_vtab.py --tune-lr`", tune_lr(args))
        return
    accuracy = run_accuracy(args)
    if not args.backbones:
        return
    cost = {} if args.skip_cost else run_cost(args)
    write_report(args.out, "Mini VTAB-1k: `python benchmarks/mini_vtab.py`", render(args, accuracy, cost))
    if args.out:
        plot(args, accuracy, Path(args.out).with_suffix(".png"))
        out = Path(args.out)
        plot_per_parameter(args, accuracy, out.with_name(out.stem + "_per_parameter.png"))


def write_report(out: str | None, heading: str, report: str) -> None:
    """Print ``report``; with ``out``, also write it there (atomically) under ``heading``."""
    from visionpeft.io import atomic_write

    print(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: Path(tmp).write_text(f"## {heading}\n\n{report}\n"))


if __name__ == "__main__":
    main()
