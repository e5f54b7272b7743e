"""``summary``, ``presets``, ``spec``: networks before any training (the counts live in
:mod:`cnnkit.analysis`, the networks in :mod:`cnnkit.models`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli._common import load_spec
from cnnkit.cli._parsing import add_format, add_out, add_spec_arguments, int_at_least

SUMMARY_HELP = """\
Print a network's layers: output maps and size, units, trainable weights and biases,
2-D kernels, connections and multiply-adds per image, and totals.

connections: (input unit, output unit) pairs a layer joins through a weight or a
  window (filter banks: kernels x kernel area x output positions; pooling: output units
  x window area; normalization: pairs inside its window, cut at the borders).
multiply-adds: products of a trainable weight and an input (filter banks, trainable
  pooling, classifier); weight-free layers have none.
rows marked * (JSON: "view": "lecture"): a fused pooling layer shown as the lecture's two
  steps, pooling at stride 1 (lecun83: 64@66x66) then subsampling (64@14x14); the layer
  pools only where subsampling keeps a value, so these rows and the totals count that.
"""


def summary_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    parser.add_argument("--input", nargs=2, type=int, metavar=("H", "W"), help="input size")
    parser.add_argument(
        "--classes", type=int_at_least(2), default=None, help="number of classes (the spec's)"
    )
    parser.add_argument(
        "--dense",
        nargs=4,
        type=int,
        metavar=("INPUT_H", "INPUT_W", "HIDDEN_H", "HIDDEN_W"),
        help="also count a fully connected layer between these sizes (e.g. 1000 1000 100 100)",
    )
    add_format(parser, "table", "json")


def run_summary(args: argparse.Namespace) -> int:
    import dataclasses

    from cnnkit import analysis

    spec = load_spec(args)
    if args.input is not None:
        height, width = args.input
        spec = dataclasses.replace(
            spec, input=dataclasses.replace(spec.input, height=height, width=width)
        )
    if args.classes is not None:
        spec = spec.with_classes(args.classes)
    summary = analysis.summarize(spec)
    dense = None
    if args.dense is not None:
        in_h, in_w, hid_h, hid_w = args.dense
        dense = analysis.dense_equivalent((in_h, in_w), (hid_h, hid_w))
    if args.format == "json":
        print(analysis.to_json(summary, dense))
    else:
        print(analysis.format_table(summary, dense))
        origin = "--classes" if args.classes is not None else "the spec's; change with --classes N"
        print(f"classes: {spec.classifier.classes} ({origin})")
    return 0


def presets_arguments(parser: argparse.ArgumentParser) -> None:
    add_format(parser, "text", "json")


def run_presets(args: argparse.Namespace) -> int:
    import json

    from cnnkit import analysis
    from cnnkit.models import list_presets
    from cnnkit.models.presets import PRESETS, from_name

    rows = []
    for name in list_presets():
        spec = from_name(name)
        summary = analysis.summarize(spec)
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "description": doc[0] if doc else "",
                "input": f"{spec.input.maps}@{spec.input.height}×{spec.input.width}",
                "classes": spec.classifier.classes,
                "weights": summary.weights,
                "biases": summary.biases,
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        counts = f"{r['weights']:,} weights and {r['biases']:,} biases"
        print(f"{r['name']:<{width}}  {r['description']}")
        print(f"{'':<{width}}  input {r['input']}, {r['classes']} classes, {counts}")
    return 0


def spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", metavar="PRESET", help="a preset's name (see cnnkit presets)")
    add_out(parser, "FILE.toml", "write it there (default: print it)")


def run_spec(args: argparse.Namespace) -> int:
    from cnnkit.models import from_name

    spec = from_name(args.preset)
    if args.out is None:
        print(spec.to_toml(), end="")
        return 0
    out = Path(args.out)
    if out.suffix not in (".toml", ".json"):
        raise ValueError(f"--out {args.out!r} must end in .toml or .json")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out folder {str(out.parent)!r} does not exist")
    spec.save(str(out))
    print(f"wrote {out}")
    return 0
