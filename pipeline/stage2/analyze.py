"""The paper's diagnostics of a trained checkpoint on one cache split (SPEC §6; paper Fig. 1, 3, 4).

- IID, TTD, ITD (Fig. 1, 4): mean Euclidean distance between same-label embeddings within images
  (``I_p``), within texts (``T_p``) and from images to texts, per class and pooled over all classes.
- t-SNE of the fused features ``M_p``, the classifier's input (Fig. 3).
- The distance distributions per class (Fig. 4).
- The per-epoch firing rate of the inter-modal step (Algorithm 1's gate), from the run's ``metrics.jsonl``.

Each is shown next to a reference: the untrained heads (the run's own seed-initialised weights, i.e. the
model before its first update) or a second checkpoint (e.g. an ablation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache, SplitData
from ..config import Config
from ..devices import resolve_device
from ..outputs import atomic_write, save_figure
from .data import SplitBatches
from .runs import RunError, build_model, check_fold_split, resolve_checkpoint, compatible, load_checkpoint, model_from_checkpoint

MEASURES = ("IID", "TTD", "ITD")
SPACES = ("l2", "raw")
SPACE_TITLES = {"l2": "L2-normalised embeddings", "raw": "raw embeddings"}
# Distances between unit vectors lie in [0, 2]; Fig. 4's histograms use these bins.
HIST_EDGES = np.linspace(0.0, 2.0, 81)
ROW_BLOCK = 2048
TSNE_MAX_POINTS = 5000
MIN_TSNE_POINTS = 5
EXACT_TSNE_POINTS = 200


@dataclass
class Embeddings:
    """Per usable row of a split, in file order: true labels, ``I_p``, ``T_p`` (None for a branch the model
    lacks) and the fused features ``M_p``."""

    labels: np.ndarray
    image: np.ndarray | None
    text: np.ndarray | None
    fused: np.ndarray


@torch.no_grad()
def collect_embeddings(model, split: SplitData, batch_size: int, device: torch.device) -> Embeddings:
    """Eval-mode forward over the split in ``predict_split``'s batches, keeping the embeddings."""
    model.eval()
    image, text, fused = [], [], []
    for batch in SplitBatches(split).eval_batches(batch_size):
        out = model(batch.image.to(device), batch.tokens.to(device), batch.mask.to(device))
        fused.append(out.fused.float().cpu())
        if out.image_emb is not None:
            image.append(out.image_emb.float().cpu())
        if out.text_emb is not None:
            text.append(out.text_emb.float().cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else None  # noqa: E731
    return Embeddings(split.labels[split.rows], cat(image), cat(text), cat(fused))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: the space the contrastive losses (Eq. 5, 6) compare embeddings in."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pair_distances(a: np.ndarray, b: np.ndarray, distinct: bool, edges: np.ndarray | None = None, block: int = ROW_BLOCK):
    """(sum, count, histogram) of Euclidean distances ``‖a_i − b_j‖`` over pairs (i, j).

    ``distinct``: ``a`` and ``b`` are the same set and each unordered pair i < j counts once (IID, TTD);
    otherwise every ordered pair counts, i = j included (ITD). Rows of ``a`` go in blocks, so memory stays
    at ``block × len(b)`` however large the class. ``edges`` bins the distances (values beyond the edges
    fall into the end bins); the histogram is None without them.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    b_sq = (b**2).sum(1)
    total, count = 0.0, 0
    hist = None if edges is None else np.zeros(len(edges) - 1, dtype=np.int64)
    for start in range(0, len(a), block):
        x = a[start : start + block]
        # float64 keeps the expanded form's cancellation error near 1e-8 for nearby points
        d = np.sqrt(np.maximum((x**2).sum(1)[:, None] + b_sq[None, :] - 2.0 * x @ b.T, 0.0))  # (block, len(b))
        if distinct:
            d = d[np.arange(len(b))[None, :] > np.arange(start, start + len(x))[:, None]]
        total += float(d.sum())
        count += int(d.size)
        if hist is not None:
            hist += np.histogram(np.clip(d, edges[0], edges[-1]), edges)[0]
    return total, count, hist


def same_label_distances(
    image: np.ndarray | None, text: np.ndarray | None, labels: np.ndarray, classes: list[str], edges: np.ndarray | None = None
) -> tuple[dict, dict]:
    """IID, TTD and ITD per class and overall (Fig. 1, 4), on the embeddings as given.

    - IID: ``‖I_i − I_j‖`` over pairs i ≠ j with ``y_i = y_j`` (each unordered pair once);
    - TTD: the same on ``T_p``;
    - ITD: ``‖I_i − T_j‖`` over all (i, j) with ``y_i = y_j``, **i = j included**: an image and its own text
      are a same-label pair across modalities, and the inter-modal loss (Eq. 6) counts it as a positive.

    "overall" pools every same-label pair of every class (so large classes weigh more), not a mean of the
    class means. A measure is None where it has no pair (a class of one sample has no IID pair) or the
    model lacks a branch. Returns (stats, histograms): ``stats = {"per_class": {name: {IID, TTD, ITD,
    pairs: {...}}}, "overall": {...}}``, ``histograms[measure][name]`` = counts over ``edges`` (empty
    without ``edges``).
    """
    operands = {"IID": (image, image, True), "TTD": (text, text, True), "ITD": (image, text, False)}
    sums = {m: 0.0 for m in MEASURES}
    counts = {m: 0 for m in MEASURES}
    per_class: dict[str, dict] = {}
    hists: dict[str, dict[str, list[int]]] = {m: {} for m in MEASURES}
    for k, name in enumerate(classes):
        rows = np.flatnonzero(labels == k)
        entry: dict = {"n": int(len(rows)), "pairs": {}}
        for m, (a, b, distinct) in operands.items():
            if a is None or b is None:
                entry[m], entry["pairs"][m] = None, 0
                continue
            s, c, h = pair_distances(a[rows], b[rows], distinct, edges)
            entry[m] = s / c if c else None
            entry["pairs"][m] = c
            sums[m] += s
            counts[m] += c
            if h is not None:
                hists[m][name] = h.tolist()
        per_class[name] = entry
    overall: dict = {"n": int(sum(e["n"] for e in per_class.values())), "pairs": dict(counts)}
    for m in MEASURES:
        overall[m] = sums[m] / counts[m] if counts[m] else None
    return {"per_class": per_class, "overall": overall}, (hists if edges is not None else {})


def distance_report(emb: Embeddings, classes: list[str]) -> tuple[dict, dict]:
    """IID/TTD/ITD on L2-normalised and on raw embeddings, and Fig. 4's histograms (normalised space)."""
    norm = lambda x: None if x is None else l2_normalise(x)  # noqa: E731
    l2, hists = same_label_distances(norm(emb.image), norm(emb.text), emb.labels, classes, HIST_EDGES)
    raw, _ = same_label_distances(emb.image, emb.text, emb.labels, classes)
    return {"l2": l2, "raw": raw}, hists


# ------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tsne_points(fused: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the fused features (perplexity capped for small splits, which t-SNE requires)."""
    from sklearn.manifold import TSNE

    n = len(fused)
    perplexity = float(min(30.0, (n - 1) / 3))
    # Barnes-Hut pays off only on larger sets; on a few hundred points its OpenMP start-up dominates
    method = "exact" if n <= EXACT_TSNE_POINTS else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", method=method, random_state=seed)
    return tsne.fit_transform(np.asarray(fused, dtype=np.float64))


def plot_tsne(panels: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str], path: Path) -> None:
    """Fig. 3: one scatter per (title, 2-D points, labels) panel, coloured by true label."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (title, pts, labels) in zip(axes[0], panels):
        for k, name in enumerate(classes):
            sel = labels == k
            ax.scatter(pts[sel, 0], pts[sel, 1], s=8, alpha=0.75, color=colours(k % 10), label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="best", fontsize=8, markerscale=2)
    fig.suptitle("t-SNE of the fused features M_p (classifier input)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_distance_histograms(runs: list[tuple[str, dict]], classes: list[str], path: Path) -> None:
    """Fig. 4: IID / TTD / ITD distributions per class on L2-normalised embeddings; one line style per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    centres = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    styles = ("-", "--", ":", "-.")
    for ax, m in zip(axes[0], MEASURES):
        for r, (label, hists) in enumerate(runs):
            for k, name in enumerate(classes):
                counts = np.asarray(hists.get(m, {}).get(name, []), dtype=np.float64)
                if counts.sum() == 0:
                    continue
                ax.plot(centres, counts / counts.sum(), styles[r % len(styles)], color=colours(k % 10), label=f"{name} ({label})")
        ax.set_title(m)
        ax.set_xlabel("Euclidean distance, same label")
        ax.set_xlim(HIST_EDGES[0], HIST_EDGES[-1])
    axes[0][0].set_ylabel("share of pairs")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def read_step2_fired(metrics_path: Path) -> list[tuple[int, float]] | None:
    """(epoch, fraction of batches in which the inter-modal step fired) per epoch; None without a log."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [(int(r["epoch"]), float(r["step2_fired"])) for r in rows if "step2_fired" in r]


def plot_step2_fired(series: list[tuple[str, list[tuple[int, float]]]], path: Path) -> list[list[int]]:
    """Per-epoch firing rate of Algorithm 1's step 2 (the gate's decision), one line per run; returns the epochs
    drawn for each line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in series:
        # metrics.jsonl counts epochs from 1 (checkpoint format 2), so the epochs are plotted as written
        ax.plot([e for e, _ in points], [f for _, f in points], marker="o", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("inter-modal step (Algorithm 1, step 2): firing rate per epoch", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of batches where step 2 fired")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    drawn = [[int(x) for x in line.get_xdata()] for line in ax.get_lines()]
    plt.close(fig)
    return drawn


# ------------------------------------------------------------------------------------ the analysis


@dataclass
class Analysis:
    """What ``analyze`` computed and wrote; ``report`` is also saved as ``analysis.json`` in ``out_dir``."""

    out_dir: Path
    report: dict
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def untrained_model(ckpt: dict, device: torch.device):
    """The checkpoint's architecture with the run's seed-initialised weights (the model before training), eval mode."""
    cfg = Config.from_dict(ckpt["config"])
    # train() seeds torch with train.seed right before build_model: the same draw gives the run's initial weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(ckpt["dims"], cfg)
    return model.to(device).eval()


def analyze(
    checkpoint: Path,
    cache: Path,
    split: str = "dev",
    out_dir: Path | None = None,
    compare: Path | None = None,
    device: str = "auto",
    tsne: bool = True,
    which: str = "best",
) -> Analysis:
    """Distances, t-SNE, distance histograms and the step-2 firing rate for ``checkpoint`` on ``cache:split``,
    next to the untrained heads (or ``compare``). Writes ``analysis.json`` and PNGs into ``out_dir``
    (default ``<run dir>/analysis-<split>``)."""
    checkpoint = resolve_checkpoint(checkpoint, which)  # a run folder means its best (or last) checkpoint
    ckpt = load_checkpoint(checkpoint)
    fc = FeatureCache(cache)
    refs = [(checkpoint, ckpt)]
    if compare is not None:
        compare = resolve_checkpoint(compare, which)
        refs.append((compare, load_checkpoint(compare)))
    for path, c in refs:
        diffs = compatible(fc.provenance, c["cache_provenance"])
        if diffs:
            raise RunError(f"{fc.path} was not extracted like the cache of {path}; refusing. What differs:\n  " + "\n  ".join(diffs))
        check_fold_split(c, fc, split, path)
    data = fc.load(split)
    if not len(data.rows) or not data.has_labels:
        raise RunError(f"{fc.path}: split {split!r} has no labelled rows; the same-label distances need labels")
    dev = resolve_device(device)
    classes = list(ckpt["classes"])
    model, cfg = model_from_checkpoint(ckpt, dev)
    if compare is not None:
        other, _ = model_from_checkpoint(refs[1][1], dev)
        other_name, other_kind = Path(compare).parent.name or str(compare), "checkpoint"
    else:
        other, other_name, other_kind = untrained_model(ckpt, dev), "untrained", "untrained"
    this_name = checkpoint.parent.name or str(checkpoint)
    if this_name == other_name:
        this_name, other_name = str(checkpoint), str(compare)

    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent / f"analysis-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Analysis(out_dir, {})
    bs = cfg.train.eval_batch_size
    embs = [collect_embeddings(model, data, bs, dev), collect_embeddings(other, data, bs, dev)]
    dists = [distance_report(e, classes) for e in embs]
    result.report = {
        "checkpoint": str(checkpoint),
        "cache": str(fc.path),
        "split": split,
        "n": int(len(data.rows)),
        "classes": classes,
        "definitions": {
            "IID": "mean ||I_i - I_j|| over same-label pairs i != j (each unordered pair once)",
            "TTD": "mean ||T_i - T_j|| over same-label pairs i != j (each unordered pair once)",
            "ITD": "mean ||I_i - T_j|| over all same-label (i, j), i = j included (an image and its own text)",
            "overall": "pooled over every same-label pair of every class",
            "spaces": "l2: embeddings scaled to unit length (where the contrastive losses act); raw: as the heads output them",
        },
        "model": {"name": this_name, "kind": "checkpoint", "distances": dists[0][0]},
        "reference": {"name": other_name, "kind": other_kind, "path": str(compare) if compare else None, "distances": dists[1][0]},
        "histogram_edges": HIST_EDGES.tolist(),
        "histograms": {"model": dists[0][1], "reference": dists[1][1]},
    }
    if cfg.train.modalities != "both":
        result.notes.append(f"the checkpoint is unimodal (modalities={cfg.train.modalities}): measures of the missing branch are empty")

    if tsne:
        if len(data.rows) < MIN_TSNE_POINTS:
            result.notes.append(f"t-SNE skipped: split {split!r} has {len(data.rows)} rows (needs {MIN_TSNE_POINTS})")
        else:
            keep = np.arange(len(data.rows))
            if len(keep) > TSNE_MAX_POINTS:
                keep = np.sort(np.random.default_rng(0).choice(len(keep), TSNE_MAX_POINTS, replace=False))
                result.notes.append(f"t-SNE on a random {TSNE_MAX_POINTS} of the {len(data.rows)} rows (seed 0)")
            panels = [(name, tsne_points(e.fused[keep]), e.labels[keep]) for name, e in zip((this_name, other_name), embs)]
            result.files["tsne"] = out_dir / "tsne.png"
            plot_tsne(panels, classes, result.files["tsne"])
    result.files["distances"] = out_dir / "distances.png"
    plot_distance_histograms([(this_name, dists[0][1]), (other_name, dists[1][1])], classes, result.files["distances"])

    series = []
    for name, (path, c) in zip((this_name, other_name), refs):
        fired = read_step2_fired(path.parent / "metrics.jsonl")
        if fired is None:
            result.notes.append(f"no {path.parent / 'metrics.jsonl'}: no step-2 firing rate for {name}")
            continue
        tc = Config.from_dict(c["config"]).train
        if tc.update != "two-step" or not tc.use_inter or tc.modalities != "both":
            result.notes.append(f"{name}: step 2 never runs (update={tc.update}, use_inter={tc.use_inter}, modalities={tc.modalities})")
        series.append((name, fired))
        result.report.setdefault("step2_fired", {})[name] = [f for _, f in fired]
    if series:
        result.files["step2_fired"] = out_dir / "step2_fired.png"
        plot_step2_fired(series, result.files["step2_fired"])

    result.report["notes"] = result.notes
    result.report["files"] = {k: str(v) for k, v in result.files.items()}
    result.files["json"] = out_dir / "analysis.json"
    atomic_write(result.files["json"], json.dumps(result.report, indent=2), "the analysis")
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def render_analysis(report: dict, console) -> None:
    """The IID/TTD/ITD tables (normalised, then raw): one row per class and the pooled overall row."""
    from rich.table import Table

    from ..errors import safe

    a, b = report["model"], report["reference"]
    for space in SPACES:
        t = Table(title=safe(f"same-label distances on {SPACE_TITLES[space]} ({report['split']}, n={report['n']}): {a['name']} vs {b['name']}"))
        t.add_column("class")
        t.add_column("n", justify="right")
        for m in MEASURES:
            t.add_column(safe(f"{m}\n{a['name']}"), justify="right")
            t.add_column(safe(f"{m}\n{b['name']}"), justify="right")
        da, db = a["distances"][space], b["distances"][space]
        rows = [(name, da["per_class"][name], db["per_class"][name]) for name in report["classes"]]
        for i, (name, ea, eb) in enumerate([*rows, ("overall", da["overall"], db["overall"])]):
            cells = [c for m in MEASURES for c in (_fmt(ea[m]), _fmt(eb[m]))]
            t.add_row(safe(name), str(ea["n"]), *cells, style="bold" if i == len(rows) else None)
        console.print(t)
    console.print("IID/TTD: pairs i != j; ITD: all same-label (image i, text j), i = j included; overall: all same-label pairs pooled.")
