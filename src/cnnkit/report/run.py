"""The report of one run: what was trained, on what, how well, and what it learned."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit import analysis, figures
from cnnkit.data.splits import DataSplits, ImageSet
from cnnkit.report import page
from cnnkit.report.pictures import confusion_figure, images_figure
from cnnkit.training.run import LoadedRun, RunEvaluation, evaluate_loaded, evaluation_images

SECTIONS = (
    "The run",
    "The network",
    "Accuracy",
    "Training curves",
    "Confusion matrix",
    "Learned filters",
    "Feature maps",
    "Misclassified examples",
)
"""Every section heading of a run's report, in order."""

MAPS_DPI = 70  # the feature-map figures are large; this keeps a default report small
SECTION4_DENSE = ((1000, 1000), (100, 100))  # the lecture's fully connected comparison
_SPLIT_NAMES = {"test": "test split", "val": "validation split (the data has no test split)",
                "all": "all images"}  # fmt: skip


@dataclass(frozen=True)
class Scored:
    """The run's predictions on its evaluation images: ``probabilities`` ``(N, classes)``."""

    images: ImageSet
    probabilities: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)  # (N,)

    def confidence(self) -> torch.Tensor:
        """Probability of each image's predicted class, ``(N,)``."""
        return self.probabilities.max(dim=1).values

    def mistakes(self) -> list[int]:
        """Indices of misclassified images, the most confident first."""
        wrong = (self.predicted != self.images.labels).nonzero().flatten().tolist()
        confidence = self.confidence()
        return sorted(wrong, key=lambda i: (-float(confidence[i]), i))

    def top(self, i: int, k: int = 3) -> list[tuple[str, float]]:
        values, indices = self.probabilities[i].topk(min(k, self.probabilities.shape[1]))
        names = self.images.class_names
        return [
            (names[c], float(v)) for c, v in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def score(loaded: LoadedRun, images: ImageSet, batch_size: int = 256) -> Scored:
    """Class probabilities of every image by the loaded run."""
    parts = [
        loaded.probabilities(images.images[start : start + batch_size])
        for start in range(0, len(images.labels), batch_size)
    ]
    probabilities = torch.cat(parts) if parts else torch.zeros(0, len(images.class_names))
    return Scored(images, probabilities)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _top_text(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {p:.3f}" for name, p in top)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def _run_section(loaded: LoadedRun, sizes: dict[str, int]) -> str:
    config = loaded.config
    data, training, model = config["data"], config["training"], config["model"]
    metrics = loaded.metrics
    seconds = sum(float(row.get("seconds") or 0.0) for row in metrics)
    val = [row.get("val_accuracy") for row in metrics]
    best = None
    if any(v is not None for v in val):
        best = metrics[int(np.nanargmax([np.nan if v is None else v for v in val]))]["epoch"]
    invocation = config.get("invocation") or {}
    where = (
        f"spec file {invocation['spec']}"
        if invocation.get("spec")
        else f"preset {invocation.get('preset') or model['name']}"
    )
    rows = [
        ("network", f"{model['name']} ({where}), {model.get('parameters', 0):,} parameters"),
        ("data", f"{data.get('source')} ({data.get('kind', '')})"),
        ("data digest", data.get("digest", "")),
        ("split sizes", ", ".join(f"{k} {v:,}" for k, v in sizes.items())),
        ("checkpoint", f"{loaded.checkpoint} (epoch {loaded.metadata.get('epoch')})"),
        ("epochs finished", f"{len(metrics)} of {training.get('epochs')}"),
        ("best epoch", f"{best} (best validation accuracy)" if best is not None else "–"),
        ("wall time", f"{seconds:.1f} s over the finished epochs"),
        ("created", config.get("created", "")),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in (config.get("versions") or {}).items())
    rows.append(("versions", versions))
    return page.section(
        "The run",
        "What was trained, on which data, with which options; the rest of the page reads "
        "this folder's files.",
        page.table(("", ""), rows, (False, False)),
        "<h3>Training options</h3>",
        page.pre(json.dumps(training, indent=2)),
    )


def _network_section(loaded: LoadedRun) -> str:
    if loaded.spec is None:
        return page.section(
            "The network", "A custom module without a spec: no layer table.",
            page.pre(str(loaded.model)),
        )  # fmt: skip
    summary = analysis.summarize(loaded.spec)
    dense = analysis.dense_equivalent(*SECTION4_DENSE)
    return page.section(
        "The network",
        "One row per layer: output maps and size, weights, 2-D kernels, connections and "
        "multiply-adds per image; below, Section 4's count for a fully connected layer.",
        page.pre(analysis.format_table(summary, dense)),
    )


def _accuracy_section(evaluation: RunEvaluation) -> str:
    r = evaluation.result
    split = _SPLIT_NAMES.get(evaluation.split, evaluation.split)
    headline = (
        f'<p class="big">accuracy {100 * r.accuracy:.2f}% ({r.correct:,}/{r.images:,})</p>'
        f"<p>loss {r.loss:.4f} · {page.escape(split)} of {page.escape(evaluation.source)} · "
        f"{page.escape(evaluation.checkpoint)} checkpoint (epoch {evaluation.epoch})</p>"
    )
    rows = []
    for c, name in enumerate(r.class_names):
        rows.append((name, _percent(r.per_class[name]), r.confusion[c][c], sum(r.confusion[c])))
    return page.section(
        "Accuracy",
        f"The numbers of `cnnkit evaluate --format json` for this checkpoint, on the {split}.",
        headline,
        page.table(("class", "accuracy", "correct", "images"), rows, (False, True, True, True)),
    )


def _curves_section(loaded: LoadedRun) -> str:
    if not loaded.metrics:
        return page.section("Training curves", "No epoch has finished yet.")
    fig = figures.curves_figure(loaded.metrics, source=loaded.spec.name if loaded.spec else None)
    return page.section(
        "Training curves",
        "Loss (left) and accuracy (right) per epoch for train, validation and test; the "
        "dotted line marks the best validation epoch.",
        page.image(fig, "training curves: loss and accuracy per epoch for each split"),
    )


def _pairs(confusion: list[list[int]], limit: int = 3) -> list[tuple[int, int, int]]:
    """``(count, true, predicted)`` of the most frequent confusions, most first."""
    pairs = [
        (count, t, p)
        for t, row in enumerate(confusion)
        for p, count in enumerate(row)
        if t != p and count > 0
    ]
    return sorted(pairs, key=lambda x: (-x[0], x[1], x[2]))[:limit]


def _gray(images: torch.Tensor) -> np.ndarray:
    return images[:, 0].float().numpy()  # (N, H, W): the first input map


def _confusion_section(evaluation: RunEvaluation, scored: Scored) -> str:
    r = evaluation.result
    names = r.class_names
    parts = [
        page.image(
            confusion_figure(r.confusion, names),
            "confusion matrix heat map: rows are true classes, columns predicted classes, "
            "each cell labelled with its count",
        )
    ]
    labels, predicted = scored.images.labels, scored.predicted
    for count, t, p in _pairs(r.confusion):
        chosen = ((labels == t) & (predicted == p)).nonzero().flatten()[:6]
        parts.append(f"<h3>true {page.escape(names[t])}, predicted {page.escape(names[p])}: "
                     f"{count} image{'s' if count != 1 else ''}</h3>")  # fmt: skip
        if len(chosen):
            captions = [f"p({names[p]}) = {float(scored.probabilities[i, p]):.2f}" for i in chosen]
            fig = images_figure(_gray(scored.images.images[chosen]), captions)
            alt = f"examples of class {names[t]} taken for {names[p]}"
            parts.append(page.image(fig, alt))
    if len(parts) == 1:
        parts.append("<p>No image was confused.</p>")
    return page.section(
        "Confusion matrix",
        "Row: the true class, column: the predicted one; the diagonal is what is right. "
        "Below, the most frequent confusions with examples.",
        *parts,
    )


def _filters_section(loaded: LoadedRun) -> str:
    if loaded.spec is None:
        return page.section("Learned filters", "A custom module: no filter banks to draw.")
    report = figures.sobel_report(loaded.model, 1)
    fig = figures.filters_figure(loaded.model, 1, report=report)
    return page.section(
        "Learned filters",
        "Stage 1's kernels (blue negative, red positive), each Sobel template beside the "
        "kernel most like it, with their cosine similarity.",
        page.image(fig, "stage 1 kernels and their best matches to Sobel's filters"),
        page.pre(report.to_text()),
    )


def choose_images(scored: Scored, count: int) -> list[int]:
    """``count`` image indices: the most confident correct one, then the most confident
    mistakes, then further correct ones when there are too few mistakes."""
    correct = (scored.predicted == scored.images.labels).nonzero().flatten().tolist()
    confidence = scored.confidence()
    correct.sort(key=lambda i: (-float(confidence[i]), i))
    mistakes = scored.mistakes()
    chosen = correct[:1] + mistakes[: max(0, count - 1)]
    chosen += [i for i in correct[1:] if i not in chosen][: count - len(chosen)]
    return chosen[:count]


def _maps_section(loaded: LoadedRun, scored: Scored, count: int) -> str:
    if loaded.spec is None or count == 0:
        return page.section("Feature maps", "No images were asked for (--images 0).")
    names = scored.images.class_names
    parts = []
    for i in choose_images(scored, count):
        true = names[int(scored.images.labels[i])]
        guess = names[int(scored.predicted[i])]
        verdict = "correct" if true == guess else "mistaken"
        parts.append(
            f"<h3>image {i}: true {page.escape(true)}, predicted {page.escape(guess)} "
            f"({verdict})</h3><p>top 3: {page.escape(_top_text(scored.top(i)))}</p>"
        )
        fig = figures.feature_maps_figure(loaded.model, scored.images.images[i])
        alt = f"every stage's feature maps for image {i} (true {true}, predicted {guess})"
        parts.append(page.image(fig, alt, dpi=MAPS_DPI))
    return page.section(
        "Feature maps",
        "For a correctly classified image and the most confident mistakes, the maps after "
        "every step of every stage, as in the lecture's Figures 2–4 (gray: values >= 0; "
        "blue-white-red: signed).",
        *parts,
    )


def _mistakes_section(scored: Scored, limit: int = 12) -> str:
    names = scored.images.class_names
    wrong = scored.mistakes()[:limit]
    if not wrong:
        return page.section("Misclassified examples", "No image was misclassified.")
    labels = scored.images.labels
    captions = [f"{names[int(labels[i])]} → {names[int(scored.predicted[i])]}" for i in wrong]
    fig = images_figure(_gray(scored.images.images[wrong]), captions)
    rows = [
        (i, names[int(labels[i])], names[int(scored.predicted[i])], _top_text(scored.top(i)))
        for i in wrong
    ]
    total = len(scored.mistakes())
    return page.section(
        "Misclassified examples",
        f"The {len(wrong)} most confident of {total} mistakes: true class → predicted, "
        "with the three most probable classes.",
        page.image(fig, "misclassified images, each captioned true class → predicted class"),
        page.table(("image", "true", "predicted", "top 3"), rows, (True, False, False, False)),
    )


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


def _split_sizes(loaded: LoadedRun) -> dict[str, int]:
    """Split sizes of the run's recorded data, from ``config.json``."""
    sizes = loaded.config["data"].get("sizes") or {}
    return {k: v for k, v in sizes.items() if isinstance(v, int)}


def run_report_html(
    loaded: LoadedRun,
    *,
    images: int = 3,
    data: str | os.PathLike[str] | DataSplits | None = None,
) -> tuple[str, RunEvaluation]:
    """The page of a loaded run and the evaluation it shows."""
    source, split, chosen = evaluation_images(loaded, data)
    evaluation = evaluate_loaded(loaded, source, split, chosen)
    scored = score(loaded, chosen)
    sizes = _split_sizes(loaded) or {split: len(chosen.labels)}
    name = loaded.spec.name if loaded.spec is not None else loaded.config["model"]["name"]
    sections = [
        _run_section(loaded, sizes),
        _network_section(loaded),
        _accuracy_section(evaluation),
        _curves_section(loaded),
        _confusion_section(evaluation, scored),
        _filters_section(loaded),
        _maps_section(loaded, scored, images),
        _mistakes_section(scored),
    ]
    subtitle = f"run {Path(loaded.path).name} · {loaded.checkpoint} checkpoint"
    return page.document(f"cnnkit report: {name}", subtitle, sections), evaluation
