"""lecun83 speed: cnnkit against the literal PyTorch network, and the machine's peak.

Run from the repository root::

    python -m benchmarks                 # the full suite (a few minutes on 2 cores)
    python -m benchmarks --repeats 7     # more timed runs per variant

In one process, after ``cnnkit.tune_runtime()`` (which both variants get):

1. the machine's fp32 peak: a 3x3 256->256 convolution, channels-last, batch 32, 56x56;
2. an equality check: the literal network (``benchmarks/literal.py``) with cnnkit's
   weights must give the same logits to 1e-4 relative, or nothing is timed;
3. lecun83 forward at batch 64, batch-1 latency, and training steps at batch 64 (SGD
   with momentum, cross-entropy), cnnkit and literal interleaved, the median of
   ``--repeats`` runs after warm-up with the min and max. Latency is timed warm (a run
   is 20 single-image calls in a row, per call) and cold (one call, right after the
   other network's, which leaves the caches full of its own data);
4. cnnkit's training step by layer (forward + backward of each, and the optimizer),
   with each one's share; a stage's rectification, normalization and pooling run as
   one fused op, and are timed as one, and the first stage, which needs no derivative
   for the images, runs whole as one op (its filter bank too);
5. the peak resident memory of a training step, each variant in a fresh process.

Prints a table and writes JSON to ``benchmarks/results/``. Useful work (two FLOP per
multiply-add of the two filter banks): 82 MFLOP per image forward, 188 MFLOP
per image for a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import cnnkit.models
from benchmarks.literal import LiteralLecun83
from cnnkit.models import stages
from cnnkit.runtime import tune_runtime

FORWARD_FLOP = 82e6  # useful multiply-adds x 2 per image
TRAIN_FLOP = 188e6
BATCH = 64
CLASSES = 101


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, calls: int = 1
) -> dict[str, dict[str, float]]:
    """Median, min and max seconds per call of each variant, one run of each in turn;
    a run makes ``calls`` calls in a row and counts their mean."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(lambda fn=fn: [fn() for _ in range(calls)]) / calls)
    return {name: _summary(t) for name, t in times.items()}


def measure_peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of a large 3x3 convolution, channels-last, forward only."""
    x = torch.randn(32, 256, 56, 56).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    flop = 2 * 32 * 256 * 256 * 9 * 56 * 56
    with torch.no_grad():
        result = interleaved({"peak": lambda: F.conv2d(x, w, padding=1)}, repeats)["peak"]
    best = flop / result["min"] / 1e9
    return {"gflops_best": best, "gflops_median": flop / result["median"] / 1e9, **result}


def build_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    model = cnnkit.models.build(cnnkit.models.from_name("lecun83", classes=CLASSES))
    return model, LiteralLecun83.from_cnnkit(model)


def check_equal(model: torch.nn.Module, literal: torch.nn.Module) -> float:
    """Largest |cnnkit - literal| over the largest |literal| on one batch of logits."""
    x = torch.randn(16, 1, 83, 83, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), literal(x)
    return float((a - b).abs().max() / b.abs().max())


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def make_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def layer_breakdown(model: torch.nn.Module, repeats: int) -> dict[str, dict[str, float]]:
    """Forward + backward seconds of each part of cnnkit's step, run part by part."""
    x = torch.randn(BATCH, 1, 83, 83)
    y = torch.randint(0, CLASSES, (BATCH,))
    parts: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
    for number, stage in enumerate(model.stages, start=1):
        if number == 1 and _runs_as_one_op(stage, x):
            parts.append(("stage1 (filters+rectify+norm+pool, one op)", stage))
            continue
        parts.append((f"stage{number}.filters", stage.filters))
        window, stride = stage.pool.window, getattr(stage.pool, "stride", (1, 1))

        def fused(h, norm=stage.norm, window=window, stride=stride):  # noqa: ANN001, ANN202
            return norm.forward_rectified_max_pool(h, window, stride)

        parts.append((f"stage{number}.rectify+norm+pool", fused))
    parts.append(("classifier+loss", lambda h: F.cross_entropy(model.classifier(h), y)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times: dict[str, list[float]] = {name: [] for name, _ in parts}
    times["optimizer"] = []
    for run in range(repeats + 1):
        optimizer.zero_grad(set_to_none=True)
        h, saved = x, []
        for index, (name, fn) in enumerate(parts):
            inp = h.detach().requires_grad_(index > 0)  # no derivative for the images
            start = time.perf_counter()
            h = fn(inp)
            saved.append((name, inp, h, time.perf_counter() - start))
        grad = None
        for name, inp, out, forward_s in reversed(saved):
            start = time.perf_counter()
            out.backward(grad)
            if run:
                times[name].append(forward_s + time.perf_counter() - start)
            grad = inp.grad
        elapsed = _timed(optimizer.step)
        if run:
            times["optimizer"].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    total = sum(medians.values())
    return {name: {"seconds": s, "share": s / total} for name, s in medians.items()}


def _runs_as_one_op(stage: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether the stage's four layers run as one op on ``x`` in a training step (no
    derivative for the images, the kernels' recorded)."""
    with torch.enable_grad():
        return stages._filters_norm_pool(list(stage.children()), x) is not None


def peak_memory(variant: str) -> dict[str, float]:
    """Peak RSS of a training step, in a fresh process (MB): see :func:`_memory_child`."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--memory-child", variant],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (the peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(variant: str) -> None:
    """Build one network, reset the peak-RSS mark, run 3 steps, print the JSON figures."""
    tune_runtime()
    model, literal = build_pair()
    net = model if variant == "cnnkit" else literal
    del model, literal
    x = torch.randn(BATCH, 1, 83, 83)
    y = torch.randint(0, CLASSES, (BATCH,))
    step = make_step(net, x, y)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _rss_mb("VmRSS")
    for _ in range(3):
        step()
    peak = _rss_mb("VmHWM")
    print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak, "step_mb": peak - before}))


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _span(times: dict[str, float], scale: float) -> str:
    return (
        f"{times['median'] * scale:8.1f} ms ({times['min'] * scale:.0f}-{times['max'] * scale:.0f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (>= 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--results", default="benchmarks/results", help="JSON output folder")
    parser.add_argument("--memory-child", choices=("cnnkit", "literal"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child)
        return 0
    settings = tune_runtime(args.threads)
    load_start = _load()
    print(
        f"threads {torch.get_num_threads()}, allocator tuned {settings.allocator_tuned}, "
        f"compiled kernels {settings.native_kernels} ({settings.native_seconds:.1f} s to build "
        f"or load), torch {torch.__version__}, load {load_start}",
        flush=True,
    )

    peak = measure_peak(args.repeats)
    print(
        f"peak: {peak['gflops_best']:.0f} GFLOP/s best, {peak['gflops_median']:.0f} median",
        flush=True,
    )

    model, literal = build_pair()
    difference = check_equal(model, literal)
    print(f"equality: max |cnnkit - literal| / max |literal| = {difference:.2e}", flush=True)
    if not difference <= 1e-4:
        print("the two networks differ: not timing them", file=sys.stderr)
        return 1

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 1, 83, 83, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    x1 = x[:1].clone()
    results: dict[str, dict] = {}
    results["forward"] = interleaved(
        {"cnnkit": make_forward(model, x), "literal": make_forward(literal, x)}, args.repeats
    )
    print("forward done", flush=True)
    single = {"cnnkit": make_forward(model, x1), "literal": make_forward(literal, x1)}
    # warm: 20 images in a row per run (a server's steady state); cold: each image right
    # after the other network's, which has evicted the processor's caches (not cnnkit's
    # kept weight transforms)
    results["latency, warm"] = interleaved(single, max(args.repeats, 20), warmup=3, calls=20)
    results["latency, cold"] = interleaved(single, max(args.repeats, 20), warmup=3)
    results["train"] = interleaved(
        {"cnnkit": make_step(model, x, y), "literal": make_step(literal, x, y)}, args.repeats
    )
    print("train done", flush=True)
    breakdown = layer_breakdown(model, args.repeats)
    memory = {variant: peak_memory(variant) for variant in ("cnnkit", "literal")}
    load_end = _load()

    rows = []
    for task, flop, batch in (
        ("forward", FORWARD_FLOP, BATCH),
        ("train", TRAIN_FLOP, BATCH),
        ("latency, warm", 0, 1),
        ("latency, cold", 0, 1),
    ):
        c, lit = results[task]["cnnkit"], results[task]["literal"]
        row = {
            "task": task,
            "cnnkit_s": c,
            "literal_s": lit,
            "speedup": lit["median"] / c["median"],
            "cnnkit_img_s": batch / c["median"],
            "literal_img_s": batch / lit["median"],
        }
        if flop:
            row["cnnkit_peak_share"] = batch * flop / c["median"] / (peak["gflops_best"] * 1e9)
        rows.append(row)

    print(
        f"\nlecun83, batch {BATCH}, {torch.get_num_threads()} threads; "
        f"median (min-max) of {args.repeats}"
    )
    print(f"{'':13s} {'cnnkit':>28s} {'literal':>28s} {'speed-up':>9s} {'% peak':>7s}")
    for row in rows:
        scale = 1e3
        c, lit = row["cnnkit_s"], row["literal_s"]
        share = f"{100 * row['cnnkit_peak_share']:.1f}" if "cnnkit_peak_share" in row else "-"
        print(
            f"{row['task']:13s} "
            f"{_span(c, scale)} {row['cnnkit_img_s']:7.0f}/s "
            f"{_span(lit, scale)} {row['literal_img_s']:7.1f}/s {row['speedup']:8.1f}x {share:>7s}"
        )
    print("\ncnnkit training step by layer (forward + backward, median):")
    for name, part in breakdown.items():
        print(f"  {name:24s} {part['seconds'] * 1e3:8.1f} ms {100 * part['share']:5.1f}%")
    for variant, mem in memory.items():
        print(
            f"peak RSS, {variant} training step: {mem['peak_rss_mb']:.0f} MB "
            f"({mem['step_mb']:.0f} MB above the built model)"
        )
    print(f"load average: {load_start} at start, {load_end} at end")

    report = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "compiled_kernels": {
            "used": settings.native_kernels,
            "build_or_load_seconds": settings.native_seconds,
        },
        "load": {"start": load_start, "end": load_end},
        "peak": peak,
        "equality_relative": difference,
        "results": rows,
        "breakdown": breakdown,
        "memory": memory,
    }
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lecun83-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
