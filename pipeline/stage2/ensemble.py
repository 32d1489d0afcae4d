"""Ensembles: the class probabilities of several runs' best checkpoints, averaged.

Seeds of one configuration disagree by several points on a 450-post dev split; averaging their probabilities is
the cheapest way to a better and steadier model, and it costs one forward pass per member. Members must see the
same features (encoders, preprocessing, dtype) and predict the same classes; runs of one cross-validation fold
must also share that fold, and are then evaluated on it (its held-out rows are the ``test`` split of the view).
Each member runs in its own ``eval_batch_size`` (with batch fusion a prediction depends on its batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache, SplitData, diff_provenance
from ..config import Config
from ..devices import resolve_device
from ..outputs import atomic_write, check_output_folder, check_writable_dir, read_stored_json
from .card import write_ensemble_card
from .folds import FoldView, fold_view
from .intervals import report_interval
from .metrics import classification_report
from .stats import METRICS, bootstrap_interval
from .plots import plot_confusions
from .runs import RunError, checkpoint_sha256, resolve_checkpoint, compatible, load_checkpoint, model_from_checkpoint, predict_split, write_predictions

CV_KEYS = ("cv_folds", "cv_fold", "cv_seed", "cv_val_fraction")
HELD_OUT = "test"  # the split no member saw in training or selection (a CV fold's held-out rows are its view's test)


@dataclass
class Member:
    path: Path  # the checkpoint
    model: torch.nn.Module
    cfg: Config
    classes: list[str]
    provenance: dict  # of the cache the member was trained on
    sha256: str = ""  # of its weights file: two members are one model when these match


def load_members(runs: list[Path], device: torch.device, same_fold: bool = True, which: str = "best") -> list[Member]:
    """Every run's ``which`` checkpoint (a checkpoint file is taken as it is), refused together unless they see the same
    features and classes (and, when they are to be evaluated on a cache, ``same_fold``: the same CV fold; models of
    different folds may predict new pairs)."""
    if not runs:
        raise RunError("an ensemble needs at least one run directory or checkpoint")
    members: list[Member] = []
    for run in runs:
        path = resolve_checkpoint(run, which)
        ckpt = load_checkpoint(path)
        model, cfg = model_from_checkpoint(ckpt, device)
        member = Member(path, model, cfg, list(ckpt["classes"]), ckpt["cache_provenance"], checkpoint_sha256(path))
        check_not_duplicate(member, members, run)
        members.append(member)
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise RunError(f"{m.path} predicts the classes {m.classes}, {first.path} predicts {first.classes}: the order differs, refusing to average them")
        diffs = compatible(m.provenance, first.provenance)
        if same_fold:
            diffs += diff_provenance(_cv(first.cfg), _cv(m.cfg))
        if diffs:
            raise RunError(
                f"cannot ensemble {m.path} with {first.path}: they were trained on different features, classes or folds. What differs:\n  "
                + "\n  ".join(d.replace("cache has", f"{first.path} has").replace("request has", f"{m.path} has") for d in diffs)
            )
    return members


def check_not_duplicate(member: Member, members: list[Member], given: Path) -> None:
    """Refuse a member that is already in the ensemble (the same file, or a copy with identical weights): it would
    count one model twice and report a spread of zero between the two."""
    for m in members:
        if m.sha256 == member.sha256:
            same = "is the same checkpoint as" if m.path.resolve() == member.path.resolve() else "has the same weights as"
            raise RunError(f"{given} ({member.path}) {same} {m.path}: an ensemble member may appear once; drop the duplicate")


def check_member_classes(members: list[Member], cache) -> None:
    """Refuse a member whose classes, in order, are not the cache's: its output k would be scored as the cache's
    class k, another class."""
    for m in members:
        if m.classes != list(cache.classes):
            raise RunError(
                f"{m.path} predicts the classes {m.classes}, but {cache.path} labels rows as {list(cache.classes)} (order "
                "matters: output k is scored as class k); refusing. Ensemble runs trained on caches with this class order"
            )


def _cv(cfg: Config) -> dict:
    return {k: getattr(cfg.train, k) for k in CV_KEYS} if cfg.train.cv_folds else {"cv_folds": 0}


def member_view(cache: FeatureCache, members: list[Member]) -> FeatureCache | FoldView:
    """The cache as the members were evaluated: the cache itself, or their CV fold of it (same dataset required)."""
    first = members[0]
    diffs = compatible(cache.provenance, first.provenance)
    if first.cfg.train.cv_folds:
        # a fold is a set of rows of one dataset: another dataset extracted alike would give other folds
        diffs = diff_provenance(first.provenance, cache.provenance)
    if diffs:
        raise RunError(f"{cache.path} was not extracted like the members' cache; refusing. What differs:\n  " + "\n  ".join(diffs))
    return fold_view(cache, first.cfg.train) if first.cfg.train.cv_folds else cache


def average_probs(members: list[Member], split: SplitData, device: torch.device) -> dict[str, np.ndarray]:
    """The members' class probabilities averaged row by row; ``pred`` is the average's argmax."""
    probs = [predict_split(m.model, split, m.cfg.train.eval_batch_size, device)["probs"] for m in members]
    mean = np.mean(probs, axis=0) if len(split.rows) else np.zeros((0, len(members[0].classes)), np.float32)
    return {"rows": split.rows, "probs": mean, "pred": mean.argmax(-1) if len(mean) else np.zeros(0, np.int64), "members": probs}


def ensemble(runs: list[Path], cache: Path | FeatureCache, out: Path | None = None, device: str = "cpu", which: str = "best") -> dict:
    """Evaluate the average of ``runs`` (their ``which`` checkpoints) on every labelled split of ``cache`` (or the
    members' CV fold of it); with ``out``, write ``results.json``, ``predictions-<split>.csv`` (the columns of a single
    run's) and the model card there."""
    if out is not None:
        check_output_folder(Path(out), "the ensemble")
        check_writable_dir(Path(out), "the ensemble's results")
    dev = resolve_device(device)
    members = load_members(runs, dev, which=which)
    fc = cache if isinstance(cache, (FeatureCache, FoldView)) else FeatureCache(cache)
    check_member_classes(members, fc)
    view = member_view(fc.base if isinstance(fc, FoldView) else fc, members)
    classes = members[0].classes
    first_provenance = members[0].provenance
    results: dict = {
        "members": [str(m.path) for m in members],
        # what the members are: a stored result is reused only for these exact weights (cached_ensemble)
        "members_sha256": [m.sha256 for m in members],
        "how": f"mean of the members' class probabilities; each member's {which} checkpoint"
        + (" (selected on dev)" if which == "best" else " (of its last epoch)"),
        "classes": classes,
        "splits": {},
        "members_mean": {},
    }
    if isinstance(view, FoldView):
        results["cv"] = view.describe()
    for name in view.splits:
        split = view.load(name)
        pred = average_probs(members, split, dev)
        if out is not None:
            write_predictions(Path(out) / f"predictions-{name}.csv", split, pred, classes)
        if not split.has_labels:
            results["splits"][name] = {"n": int(len(split.rows)), "labels": "none: predictions only"}
            continue
        y = split.labels[split.rows]
        results["splits"][name] = classification_report(y, pred["pred"], classes)
        singles = [classification_report(y, p.argmax(-1), classes) for p in pred["members"]]
        results["members_mean"][name] = {
            k: {"mean": float(np.mean([s[k] for s in singles])), "std": float(np.std([s[k] for s in singles], ddof=1)) if len(singles) > 1 else 0.0}
            for k in METRICS
        }
        if name == HELD_OUT:
            # intervals for the held-out split only: dev selected the members' checkpoints, train fitted them
            results["splits"][name].update(report_interval(y, pred["pred"], len(classes)))
            paired = bootstrap_interval(y, np.stack([p.argmax(-1) for p in pred["members"]]), len(classes))
            if paired is not None:
                for k in METRICS:
                    results["members_mean"][name][k]["ci95"] = list(paired[k])
    if out is not None:
        # the pictures a single run gets: a confusion matrix per labelled split (counts, row shares)
        plot_confusions(results["splits"], classes, Path(out), f"ensemble of {len(members)} runs")
        atomic_write(Path(out) / "results.json", json.dumps(results, indent=2), "the ensemble's results")
        write_ensemble_card(Path(out), results, first_provenance)
    return results


def cached_ensemble(runs: list[Path], cache, out: Path, device: str = "cpu") -> dict:
    """``ensemble`` unless ``out`` already holds the result for exactly these members (sweeps rerun cheaply): the
    same checkpoints by content, so a member retrained in place is evaluated again."""
    done = Path(out) / "results.json"
    paths = [resolve_checkpoint(r) for r in runs]
    res = read_stored_json(done)
    if res is not None:
        held_out = res.get("splits", {}).get(HELD_OUT, {})
        # the same checkpoints by content; a result from before the intervals were recorded is computed again
        same = res.get("members") == [str(p) for p in paths] and res.get("members_sha256") == [checkpoint_sha256(p) for p in paths]
        if same and ("accuracy" not in held_out or "ci95" in held_out):
            return res
    return ensemble(runs, cache, out, device)


def seed_ensembles(result, cache_path: Path, out: Path, min_seeds: int = 2) -> dict[str, dict]:
    """For every configuration of a finished sweep with ``min_seeds`` or more finished seeds: the ensemble of those
    seeds, evaluated on every split (``<out>/<config slug>/``). Keyed by configuration slug."""
    from .sweeps.worker import SharedCache  # one read of each split for all configurations

    groups: dict[str, list[Path]] = {}
    for r in result.rows:
        run = result.runs_dir / r["run"]
        # a distributed sweep's runs may live on other machines: only runs whose checkpoint is here can be ensembled
        if r["status"] == "ok" and run.is_dir():
            groups.setdefault(r["config"], []).append(run)
    groups = {slug: runs for slug, runs in groups.items() if len(runs) >= min_seeds}
    if not groups:
        return {}
    from .ownership import own_run

    cache = SharedCache(cache_path)
    found = {}
    for slug, runs in groups.items():
        # tables sharing one --out share <out>/ensembles: one process at a time computes (or reuses) an ensemble
        with own_run(Path(out) / slug, wait=True, what="seed ensemble"):
            found[slug] = cached_ensemble(runs, cache, Path(out) / slug)
    return found


def ensemble_table(result, ensembles: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The "ensemble of its seeds" rows of a sweep, in its summary's order: each beside that configuration's mean ± std."""
    from .sweeps.spec import fmt
    from .sweeps.tables import summary_cell

    splits = [s for s in ("dev", "test") if any(s in e["splits"] and "accuracy" in e["splits"][s] for e in ensembles.values())]
    head = [*(result.keys or ["config"]), "seeds", *[f"{s} {m}" for s in splits for m in ("acc", "weighted F1", "macro F1")]]
    body = []
    for s in result.summary:
        e = ensembles.get(s["config"])
        if e is None:
            continue
        names = [fmt(s[k]) for k in result.keys] or [s["config"]]
        for kind, values in (
            ("mean ± std of the runs", [summary_cell(s, f"{sp}_{m}") for sp in splits for m in METRICS]),
            ("ensemble of the runs", [ensemble_cell(e["splits"][sp], m) for sp in splits for m in METRICS]),
        ):
            body.append([*names, f"{len(e['members'])} ({kind})", *values])
    return head, body


def ensemble_cell(split: dict, metric: str) -> str:
    """One ensemble score, with `` [lo, hi]`` when its split holds a 95% interval (the held-out split)."""
    text = f"{split[metric]:.4f}"
    ci = split.get("ci95", {}).get(metric)
    return text + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def write_ensemble_summary(out: Path, result, ensembles: dict[str, dict]) -> None:
    """``<out>/ensembles.md``: each configuration's mean ± std, then its ensemble. A file of its own: summary.md is
    what ``sweep summary`` rebuilds from the study alone, without the checkpoints an ensemble needs."""
    if not ensembles:
        return
    head, body = ensemble_table(result, ensembles)
    lines = [
        "Ensemble of each configuration's seeds (mean of their class probabilities; `ensembles/<config>/`), beside the "
        "mean ± std of the same runs. dev selected each run's checkpoint, so dev is optimistic for both.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *["| " + " | ".join(b) + " |" for b in body],
    ]
    atomic_write(Path(out) / "ensembles.md", "\n".join(lines) + "\n", "the ensembles table")
