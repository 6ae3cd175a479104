"""Shared benchmark machinery: each configuration runs in its own process, so peak memory is its own.

A workload is a model (built fresh in each process), a batch and a loss. A configuration is a function
``setup(model, workload) -> model`` applied to the freshly built model. The child
process builds, sets up, warms up and times training steps (forward, loss, backward, fused AdamW step), and
prints one JSON line; the parent runs every configuration (``--repeats`` rounds, interleaved, to
spread machine noise), takes the median, and prints a markdown table with ratios to the frozen floor
and to a peer. Peak memory of the training steps (reset after the model is built and the adapter
attached): ``torch.cuda.max_memory_allocated`` on GPU, peak RSS (VmHWM) on CPU. On CPU the child also runs one
more step under the profiler and reads the peak bytes of live tensors from its allocation events, as
``max_memory_allocated`` counts on GPU: RSS also holds what glibc keeps of freed memory (which depends on
the sizes a method frees, not only on what it keeps) and the compiler's own memory where code is compiled.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch



@dataclasses.dataclass
class Workload:
    title: str
    build: Callable[[], torch.nn.Module]
    make_batch: Callable[[str], tuple]
    loss_fn: Callable
    #: parameters the frozen floor trains: cheap ones whose gradient needs activation gradients
    #: through every block (e.g. pos_embed, a stem norm), plus the task head
    floor_params: Callable[[torch.nn.Module], list] = lambda model: []
    head: tuple[str, ...] = ()


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls (micro-benchmarks)."""
    samples = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def reset_peak_memory(device: str) -> None:
    """Start the peak over from here, so that model building and attaching (a method's one-off work, such
    as SVDs or a global threshold) do not count as training memory."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # Linux: "5" resets the peak RSS (VmHWM)
            fh.write("5")
    except OSError:
        pass


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak, KiB on Linux


def step(model, optimizer, inputs, target, loss_fn) -> None:
    loss = loss_fn(model, inputs, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def live_peak_mb(model, optimizer, one_step: Callable[[], None]) -> float:
    """Peak MB of live tensors during ``one_step()``, parameters, buffers and optimizer state included: what
    ``torch.cuda.max_memory_allocated`` counts on GPU. The profiler's allocation events carry a running total
    of the bytes allocated (and not yet freed) while profiling; its rise during the step is added to the
    model's and the optimizer's tensors. (A dispatch-mode tracker would change what it measures: compiled code
    runs eagerly under one.) The profiler slows the step: never timed."""
    from torch._C._profiler import _EventType

    tensors = (*model.parameters(), *model.buffers(),
               *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)))
    existing = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        one_step()
    allocations, nodes = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not allocations:
        return existing / 2**20
    allocations.sort()
    _, first_size, first_total = allocations[0]
    before = first_total - first_size  # the running total persists across profiling sessions
    peak = max(total for _, _, total in allocations) - before
    return (existing + peak) / 2**20


def time_steps(model, make_batch, loss_fn, device: str, warmup: int, steps: int, live_peak: bool = True) -> dict:
    """Median step time, peak memory and, on CPU with ``live_peak``, the live-tensor peak of one more (profiled) step."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters, on CPU as on GPU. PyTorch's CPU default loops over the tensors,
    # a fixed cost per tensor (about 0.1 ms) that charges an adapter for how many tensors it has, not their size.
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    inputs, target = make_batch(device)
    times = []
    reset_peak_memory(device)
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, optimizer, inputs, target, loss_fn)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak_mb = peak_memory_mb(device)
    return {
        "step_s": statistics.median(times),
        "peak_mb": peak_mb,
        "live_peak_mb": peak_mb if device.startswith("cuda") or not live_peak else live_peak_mb(
            model, optimizer, lambda: step(model, optimizer, inputs, target, loss_fn)),
        "trainable": sum(p.numel() for p in params),
        "optimizer_state": sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0),
    }


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} CPU threads (torch {torch.__version__})"


def frozen_floor(model: torch.nn.Module, workload: Workload) -> torch.nn.Module:
    """The reference every adapter is measured against: trunk frozen, activation gradients only."""
    freeze_all(model)
    for p in workload.floor_params(model):
        p.requires_grad_(True)
    modules = dict(model.named_modules())
    for name in workload.head:
        modules[name].requires_grad_(True)
    return model


def main(configs: dict[str, Callable], workloads: dict[str, Workload], *, floor: str, peer: str,
         argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", nargs="+", default=list(workloads), choices=list(workloads))
    parser.add_argument("--configs", nargs="+", default=list(configs), choices=list(configs))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all configurations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    if args.child:
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
        workload = workloads[args.workloads[0]]
        model = workload.build().to(args.device)
        start = time.perf_counter()
        model = configs[args.child](model, workload)
        setup_s = time.perf_counter() - start
        result = time_steps(model, workload.make_batch, workload.loss_fn, args.device, args.warmup, args.steps)
        result["machine"] = machine(args.device)
        result["setup_s"] = setup_s
        print("RESULT " + json.dumps(result))
        return [result]

    tables = []
    rows_all = []
    for workload_name in args.workloads:
        rows = _run_workload(args, workload_name, floor, peer)
        tables.append(render(rows, floor, peer, workloads[workload_name].title, args))
        print(tables[-1] + "\n", flush=True)
        rows_all += rows
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n\n".join(tables) + "\n")
    return rows_all


def _run_workload(args, workload_name: str, floor: str, peer: str) -> list[dict]:
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for round_ in range(args.repeats):
        order = args.configs if round_ % 2 == 0 else list(reversed(args.configs))
        for name in order:
            cmd = [sys.executable, sys.argv[0], "--child", name, "--workloads", workload_name,
                   "--device", args.device, "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            runs[name].append(json.loads(line[len("RESULT "):]))
            print(f"  {workload_name} round {round_ + 1}: {name:<16} {runs[name][-1]['step_s']:.3f} s/step  "
                  f"{runs[name][-1]['peak_mb']:.0f} MB, live {runs[name][-1]['live_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    rows = []
    for name, results in runs.items():
        rows.append({"config": name, "step_s": statistics.median(r["step_s"] for r in results),
                     "peak_mb": statistics.median(r["peak_mb"] for r in results),
                     "live_peak_mb": statistics.median(r["live_peak_mb"] for r in results),
                     "trainable": results[0]["trainable"], "optimizer_state": results[0]["optimizer_state"],
                     "setup_s": statistics.median(r["setup_s"] for r in results),
                     "machine": results[0]["machine"]})
    return rows


def render(rows: list[dict], floor: str, peer: str, title: str, args) -> str:
    by = {r["config"]: r for r in rows}
    f, p = by.get(floor), by.get(peer)
    # on GPU the peak is already that of live tensors; on CPU both are shown
    memories = [("peak_mb", "peak memory")] + ([] if args.device.startswith("cuda") else [("live_peak_mb", "live tensors")])
    header = "".join(f"| {label} (MB) | above floor (MB) | ÷ {peer}'s overhead " for _, label in memories)
    lines = [f"### {title}", "",
             f"Machine: {rows[0]['machine']}; median of {args.steps} steps after {args.warmup} warm-up, "
             f"median over {args.repeats} interleaved rounds; each configuration in its own process.", "",
             f"| configuration | trainable params | optimizer state (elements) | attach (s) | step (s) | × floor | × {peer} "
             + header + "|",
             "|---|---:|---:|---:|---:|---:|---:" + "|---:|---:|---:" * len(memories) + "|"]

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "–"

    def memory(r, key):
        over = r[key] - f[key] if f else None
        peer_over = p[key] - f[key] if (p and f) else None
        return (f"| {r[key]:.0f} | {'–' if over is None else f'{over:+.0f}'} | "
                f"{ratio(over, peer_over) if (over is not None and peer_over and peer_over > 0) else '–'} ")

    for r in rows:
        lines.append(
            f"| {r['config']} | {r['trainable']:,} | {r['optimizer_state']:,} | {r.get('setup_s', float('nan')):.2f} | "
            f"{r['step_s']:.3f} | {ratio(r['step_s'], f and f['step_s'])} | {ratio(r['step_s'], p and p['step_s'])} "
            + "".join(memory(r, key) for key, _ in memories) + "|"
        )
    return "\n".join(lines)
