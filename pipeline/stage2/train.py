"""Stage two: train the SPP-SCL heads from the feature cache with the two-step update (Algorithm 1).

Read top to bottom: ``train`` sets up (cache, model, optimiser, run directory), then loops over epochs;
each batch goes through ``two_step_update`` (or ``one_step_update`` for Table 4's ablation); each epoch
ends with a dev evaluation, a line in ``metrics.jsonl`` and the ``last``/``best`` checkpoints (safetensors + JSON,
see ``checkpoint.py``; loading and applying a trained model is ``runs.py``). Epochs are numbered from 1 everywhere: console, metrics.jsonl, checkpoints, results.json.
After training the best checkpoint is evaluated on every labelled split; unlabelled splits get predictions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache, diff_provenance
from ..config import STAGE_SECTIONS, Config, ConfigError, apply_overrides, resolve_key
from ..devices import resolve_device
from ..errors import EXIT_FAILED, safe, shown
from ..outputs import atomic_write, check_output_folder, check_writable_dir
from ..progress import make_progress
from .checkpoint import FORMAT, VERSION, checkpoint_files, save_checkpoint
from .data import Batch, SplitBatches
from .folds import FoldView, fold_view
from .gate import two_step_gate
from .loggers import make_logger
from .losses import LossTerms, one_step_loss, step1_loss, step2_loss
from .metrics import selection_key
from .card import write_run_card
from .ownership import own_run
from .plots import plot_confusions, plot_curves
from .baselines import baselines
from .provenance import cache_record, config_as_trained
from .runs import RunError, build_model, cache_dims, evaluate_split, load_checkpoint, model_from_checkpoint, write_predictions

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ one batch


@dataclass
class StepLog:
    lambda_ce: float  # λ·CE
    intra_image: float
    intra_text: float
    inter: float  # 0.0 when step 2 did not fire
    fired: bool
    total: float


def _step1(out, labels: torch.Tensor, tc) -> LossTerms:
    return step1_loss(
        out.logits, labels, out.image_emb, out.text_emb, lambda_ce=tc.lambda_ce, tau=tc.tau, use_intra=tc.use_intra, self_term=tc.supcon_self_term
    )


def two_step_update(model, opt, batch: Batch, tc) -> StepLog:
    """Algorithm 1: step 1 updates on λ·CE + L_cl_i + L_cl_t; step 2 re-forwards the same batch with the
    updated heads and, if the gate fires, updates on L_cl_m alone."""
    model.train()
    terms = _step1(model(batch.image, batch.tokens, batch.mask), batch.labels, tc)
    opt.zero_grad(set_to_none=True)
    terms.total.backward()
    opt.step()
    inter, fired = 0.0, False
    if tc.use_inter and tc.modalities == "both":
        out2 = model(batch.image, batch.tokens, batch.mask)
        if two_step_gate(out2.text_emb, out2.image_emb, batch.labels, tc.alpha, mode=tc.gate).fire:
            lm = step2_loss(out2.text_emb, out2.image_emb, batch.labels, tau=tc.tau, symmetric=tc.inter_symmetric).total
            # "zero" keeps zero-filled gradients on the parameters L_cl_m does not reach, so AdamW moves them too (official code)
            opt.zero_grad(set_to_none=tc.step2_grads == "none")
            lm.backward()
            opt.step()
            inter, fired = lm.item(), True
    f = terms.as_floats()
    return StepLog(f["ce"], f["cl_i"], f["cl_t"], inter, fired, f["total"] + inter)


def one_step_update(model, opt, batch: Batch, tc) -> StepLog:
    """Table 4's ablation: a single update on λ·CE + L_cl_i + L_cl_t + L_cl_m."""
    model.train()
    out = model(batch.image, batch.tokens, batch.mask)
    terms = one_step_loss(
        out.logits,
        batch.labels,
        out.image_emb,
        out.text_emb,
        lambda_ce=tc.lambda_ce,
        tau=tc.tau,
        use_intra=tc.use_intra,
        use_inter=tc.use_inter,
        self_term=tc.supcon_self_term,
        symmetric=tc.inter_symmetric,
    )
    opt.zero_grad(set_to_none=True)
    terms.total.backward()
    opt.step()
    f = terms.as_floats()
    return StepLog(f["ce"], f["cl_i"], f["cl_t"], f["cl_m"], False, f["total"])


class TrainingDiverged(RunError):
    """A loss became NaN or infinite: the run failed (exit 1), it is no result."""

    exit_code = EXIT_FAILED


def check_finite_loss(log: StepLog, epoch: int, step: int, steps: int, lr: float) -> None:
    """Stop the run at the first step whose loss is NaN or infinite, naming the epoch, the step and the loss terms.

    A diverged model still predicts (NaN logits argmax to class 0), so without this a run would report a dev accuracy
    and a sweep would rank it; the check reads floats the step computed anyway."""
    if math.isfinite(log.total):
        return
    terms = f"λ·CE {log.lambda_ce:.4g}, intra image {log.intra_image:.4g}, intra text {log.intra_text:.4g}, inter {log.inter:.4g}"
    raise TrainingDiverged(
        f"non-finite loss at epoch {epoch}, step {step} of {steps}: total {log.total:.4g} ({terms}). Training diverged, most "
        f"often because the learning rate is too high (train.lr={lr:g}): rerun with a lower one, e.g. --set lr={lr / 10:g}"
    )


# ------------------------------------------------------------------------------------ checkpoints

# how a run that stopped on an error continues (full disk: after freeing space)
RESUME = "rerun the same command with --resume (the run continues from its last complete epoch)"


# ------------------------------------------------------------------------------------ the run


def train(
    cache_path: Path | FeatureCache,
    cfg: Config,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    console=None,
    in_memory: bool | None = None,
    resume_overrides: list[str] | None = None,
    resume_preset: str | None = None,
    on_epoch: Callable[[int, dict], bool] | None = None,
) -> dict:
    """Train into ``out_dir`` (or continue the run there with ``resume``); returns the results of the best epoch.

    ``on_epoch(epoch, record)`` is called after each epoch's checkpoint and ``metrics.jsonl`` line (``record`` is that
    line: ``dev_accuracy`` is the selection's score); returning True stops the run there, as a sweep's pruner asks
    (``stopped_run``: results.json says so and holds dev only; no split is evaluated).

    A resumed run takes its configuration from its checkpoint; ``resume_overrides`` (the command line's
    ``--set``) may only change what keeps it one run (see ``RESUMABLE_KEYS``); anything else is refused, and so is
    an explicit ``--config`` (``resume_preset``, whose values ``cfg`` holds) that differs from the run's.

    The run holds ``out_dir``'s ownership (``ownership.own_run``) from before its first read of the folder to
    after its last write: a second process training into the same folder is refused, naming this one.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    # before the folder's owner lock is taken beside it: a FIFO, link or folder of other files is never written into
    check_output_folder(out_dir, "a run", markers=RUN_MARKERS)
    check_writable_dir(out_dir, "the run")
    with own_run(out_dir, what="sppscl train"):
        return _train(cache_path, cfg, out_dir, resume, progress, console, in_memory, resume_overrides, resume_preset, on_epoch)


def _train(cache_path, cfg: Config, out_dir: Path, resume, progress, console, in_memory, resume_overrides, resume_preset, on_epoch=None) -> dict:
    tc = cfg.train
    # an open FeatureCache may be passed, so sweeps read a cache once per worker, not once per run
    cache = cache_path if isinstance(cache_path, FeatureCache) else FeatureCache(cache_path)
    classes = cache.classes
    for needed in ("train", "dev"):
        if needed not in cache.splits:
            raise RunError(f"{cache.path}: training needs a '{needed}' split; the cache has {', '.join(cache.splits)}")
    # the cache decides the dataset's classes; the preset's primary F1 applies when it names the same dataset
    primary = cache.provenance["dataset"].get("primary_f1", cfg.dataset.primary_f1)
    # config.json, the checkpoints and the trackers name the encoders, precision and data folder of this cache
    cfg = config_as_trained(cfg, cache)

    last_path, best_path = out_dir / "last", out_dir / "best"
    metrics_path = out_dir / "metrics.jsonl"
    has_last = checkpoint_files(last_path)[0].exists()
    if resume and not has_last and not _started(out_dir):
        if (out_dir / "last.pt").exists():
            raise RunError(
                f"{out_dir} was started by an older sppscl (last.pt); its checkpoints still load for evaluate, predict "
                "and analyze, but it cannot be resumed: start a new run"
            )
        raise RunError(f"{out_dir}: nothing to resume (no last.safetensors); start the run without --resume")
    if resume and has_last:
        ckpt = load_checkpoint(last_path)
        if "converted_from" in ckpt:
            raise RunError(
                f"{out_dir} was started by an older sppscl ({ckpt['converted_from']}); its checkpoints load for evaluate, "
                "predict and analyze, but the run cannot be resumed: start a new run"
            )
        diffs = diff_provenance(cache.provenance, ckpt["cache_provenance"], names=("this cache", "the run's cache"))
        if diffs:
            raise RunError(f"{cache.path} is not the cache this run was started on:\n  " + "\n  ".join(diffs))
        # a resumed run takes its configuration from the checkpoint, not the command line
        requested = cfg
        cfg, notes = resume_config(Config.from_dict(ckpt["config"]), resume_overrides or [], ckpt["epoch"], out_dir)
        cfg = config_as_trained(cfg, cache)  # a run started before runs recorded their cache truly is corrected
        if resume_preset is not None:
            # an explicit --config must describe this run: a preset that differs would otherwise be ignored silently
            keys = lambda c: {k: v for k, v in dataclasses.asdict(c.train).items() if k not in ("threads", "device")}  # noqa: E731
            diffs = diff_provenance(keys(cfg), keys(requested), names=("the run", f"--config {resume_preset}"))
            if diffs:
                raise ConfigError(
                    f"--resume continues the run in {out_dir} with its own configuration, and --config {resume_preset} differs from it:\n  "
                    + "\n  ".join(diffs)
                    + "\nDrop --config to continue the run as it was started, or start a new run with another --out."
                )
        tc = cfg.train
        if notes:
            atomic_write(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2), "the run's configuration", RESUME)
        for note in notes:
            if console is not None:
                console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    else:
        if out_dir.exists() and any(out_dir.iterdir()) and not _started(out_dir):
            raise RunError(f"{out_dir} already holds a run; choose another --out, or pass --resume to continue it")
        # --resume on a run that stopped before its first checkpoint (e.g. a full disk) starts it again
        resume = False

    if tc.cv_folds:
        # one fold of a cross-validation: train/dev/test become row subsets of the labelled train+dev rows
        cache = fold_view(cache, tc)
    dims = cache_dims(cache)
    if tc.ha_layers > dims["cached_layers"]:
        raise RunError(f"train.ha_layers={tc.ha_layers} but {cache.path} holds only the last {dims['cached_layers']} text layers")
    device = resolve_device(tc.device)
    # before anything is written: a tracker whose package is missing stops the run here
    logger = make_logger(cfg, out_dir)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    model = build_model(dims, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc.step_size, gamma=tc.gamma)
    rng = np.random.default_rng(tc.seed)
    # epochs are numbered from 1; ``done`` epochs are finished, best epoch 0 means none yet
    done, best = 0, {"epoch": 0, "key": (-1.0, -1.0), "dev": None}
    stopped = 0  # the epoch ``on_epoch`` stopped the run at (0: it was not stopped)

    if resume:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            rng.bit_generator.state = ckpt["rng"]["numpy"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(ckpt["rng"]["python"])
            done = ckpt["epoch"]
            best = {**ckpt["best"], "key": tuple(ckpt["best"]["key"])}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RunError(
                f"{checkpoint_files(last_path)[0]}: its optimizer, scheduler, RNG or best-epoch state cannot be restored "
                f"({type(e).__name__}: {shown(str(e))}); the checkpoint was altered or damaged: start a new run"
            ) from None
        _truncate_metrics(metrics_path, done, ckpt.get("record"))
    else:
        atomic_write(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2), "the run's configuration", RESUME)

    train_split = cache.load("train", in_memory=in_memory)
    dev_split = cache.load("dev", in_memory=in_memory)
    if len(train_split.rows) < 2:
        raise RunError(f"{cache.path}: the train split has {len(train_split.rows)} usable rows; at least 2 are needed")
    if not train_split.has_labels or not dev_split.has_labels:
        raise RunError(f"{cache.path}: train and dev must be labelled to train and select a model")
    train_batches = SplitBatches(train_split)
    update = two_step_update if tc.update == "two-step" else one_step_update

    with make_progress(enabled=progress, console=console, unit="batch/s") as prog, logger:
        n_batches = max(1, (len(train_batches) + tc.batch_size - 1) // tc.batch_size)
        ep_task = prog.add_task("epochs", total=tc.epochs, completed=done)
        b_task = prog.add_task("batches", total=n_batches)
        for epoch in range(done + 1, tc.epochs + 1):
            if tc.patience and best["epoch"] and epoch - 1 - best["epoch"] >= tc.patience:
                prog.note(f"early stop: dev has not improved for {tc.patience} epochs (best epoch {best['epoch']})")
                break
            t0 = time.perf_counter()
            prog.reset(b_task, total=n_batches)
            logs: list[StepLog] = []
            for step, batch in enumerate(train_batches.train_batches(tc.batch_size, rng), 1):
                logs.append(update(model, opt, batch.to(device), tc))
                check_finite_loss(logs[-1], epoch, step, n_batches, tc.lr)
                prog.advance(b_task)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            dev_metrics, _ = evaluate_split(model, dev_split, tc.eval_batch_size, device, classes)
            key = selection_key(dev_metrics, primary)
            improved = key > best["key"]
            if improved:
                best = {"epoch": epoch, "key": key, "dev": dev_metrics}
            record = {
                "epoch": epoch,
                "lr": lr,
                "loss_total": _mean(logs, "total"),
                "loss_lambda_ce": _mean(logs, "lambda_ce"),
                "loss_intra_image": _mean(logs, "intra_image"),
                "loss_intra_text": _mean(logs, "intra_text"),
                "loss_inter": _mean(logs, "inter"),
                "step2_fired": float(np.mean([lg.fired for lg in logs])) if logs else 0.0,
                "dev_accuracy": dev_metrics["accuracy"],
                "dev_weighted_f1": dev_metrics["weighted_f1"],
                "dev_macro_f1": dev_metrics["macro_f1"],
                "best_epoch": best["epoch"],
                "epoch_seconds": time.perf_counter() - t0,
            }
            state = {
                "format": FORMAT,
                "version": VERSION,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()},
                "best": {**best, "key": list(best["key"])},
                "config": cfg.to_dict(),
                "dims": dims,
                "classes": classes,
                "cache_provenance": cache.provenance,
                "cache_path": str(cache.path),
                # the epoch's log line travels with its checkpoint: a kill between the two writes loses no line
                "record": record,
            }
            if improved:
                # best needs no optimiser or RNG state: it is evaluated and shared, never resumed
                save_checkpoint({k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}, best_path)
            save_checkpoint(state, last_path)
            # the log line follows its checkpoint, so a resumed run never finds a line for an epoch it must redo;
            # the small file is rewritten whole, so a failed write never leaves half a line behind
            old = metrics_path.read_text() if metrics_path.exists() else ""
            atomic_write(metrics_path, old + json.dumps(record) + "\n", "the metrics log", RESUME)
            logger.log_epoch(record)
            prog.update(ep_task, advance=1, description=f"epoch {epoch}/{tc.epochs}")
            prog.note(
                f"epoch {epoch:>3}/{tc.epochs}  loss {record['loss_total']:.3f} (λ·CE {record['loss_lambda_ce']:.3f}, "
                f"intra {record['loss_intra_image']:.3f}/{record['loss_intra_text']:.3f}, inter {record['loss_inter']:.3f})  "
                f"step2 {record['step2_fired']:4.0%}  dev acc {record['dev_accuracy']:.4f}  "
                f"best {best['key'][0]:.4f}@{best['epoch']}{' *' if improved else ''}  {record['epoch_seconds']:.1f}s"
            )
            if on_epoch is not None and on_epoch(epoch, record):
                stopped = epoch
                prog.note(f"stopped at epoch {epoch}: pruned (the sweep's pruner found this run's dev curve worse than its peers')")
                break
        logger.finish({"epoch": best["epoch"], **{f"dev_{k}": best["dev"][k] for k in ("accuracy", "weighted_f1", "macro_f1")}})

    if stopped:
        return stopped_run(out_dir, cache, classes, stopped, best, primary)
    return finish_run(out_dir, cache, classes, device, in_memory)


def stopped_run(out_dir: Path, cache: FeatureCache, classes: list[str], epoch: int, best: dict, primary_f1: str) -> dict:
    """results.json of a run stopped at ``epoch`` by ``on_epoch`` (a sweep's pruner): ``status: pruned``, the epoch,
    and the best epoch's dev scores as logged; no split is evaluated and no prediction written, so no table, mean or
    ensemble can take it for a result. Its checkpoints and metrics.jsonl stay as written; curves.png is drawn."""
    results = {
        "status": "pruned",
        "pruned_at_epoch": epoch,
        "best_epoch": best["epoch"],
        "selection": "dev accuracy, ties by primary F1",
        "primary_f1": primary_f1,
        "classes": classes,
        "splits": {"dev": best["dev"]},
        "skipped_rows": len(cache.skipped),
        "epochs_trained": _epochs_logged(out_dir / "metrics.jsonl"),
        "cache": cache_record(cache.base if isinstance(cache, FoldView) else cache),
    }
    atomic_write(out_dir / "results.json", json.dumps(results, indent=2), "the results", RESUME)
    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
    return results


def finish_run(out_dir: Path, cache: FeatureCache, classes: list[str], device, in_memory=None) -> dict:
    """Evaluate the best checkpoint on every labelled split; write predictions for every split; results.json with the
    baselines dev accuracy is read against; curves.png from metrics.jsonl, confusion-<split>.png for every labelled
    split, and the model card (README.md)."""
    ckpt = load_checkpoint(out_dir / "best")
    model, cfg = model_from_checkpoint(ckpt, device)
    results = {
        "best_epoch": ckpt["best"]["epoch"],
        "selection": "dev accuracy, ties by primary F1",
        "primary_f1": cache.provenance["dataset"].get("primary_f1", cfg.dataset.primary_f1),
        "classes": classes,
        "splits": {},
        "skipped_rows": len(cache.skipped),
        "epochs_trained": _epochs_logged(out_dir / "metrics.jsonl"),
        "cache": cache_record(cache.base if isinstance(cache, FoldView) else cache),
    }
    if isinstance(cache, FoldView):
        results["cv"] = cache.describe()
    labels = {}
    for name in cache.splits:
        split = cache.load(name, in_memory=in_memory)
        metrics, pred = evaluate_split(model, split, cfg.train.eval_batch_size, device, classes)
        write_predictions(out_dir / f"predictions-{name}.csv", split, pred, classes)
        results["splits"][name] = metrics if metrics is not None else {"n": int(len(split.rows)), "labels": "none: predictions only"}
        labels[name] = split.labels[split.rows]
    results["baselines"] = baselines(cache, labels["train"], labels["dev"], classes)
    atomic_write(out_dir / "results.json", json.dumps(results, indent=2), "the results", RESUME)
    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
    plot_confusions(results["splits"], classes, out_dir, f"best checkpoint (epoch {results['best_epoch']})")
    write_run_card(out_dir, results, ckpt["cache_provenance"], ckpt["config"])
    return results


def _epochs_logged(path: Path) -> int:
    return sum(1 for ln in path.read_text().splitlines() if ln.strip()) if path.exists() else 0


def _mean(logs: list[StepLog], key: str) -> float:
    return float(np.mean([getattr(lg, key) for lg in logs])) if logs else 0.0


def _truncate_metrics(path: Path, done: int, last: dict | None = None) -> None:
    """Drop log lines of epochs after the checkpoint being resumed (a crash can leave one), and restore the
    checkpoint's own epoch line (``last``) when a crash came between the checkpoint and its line."""
    keep, epochs = [], set()
    for ln in path.read_text().splitlines() if path.exists() else []:
        try:
            epoch = json.loads(ln)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash in an older version: its epoch is redone anyway
        if epoch <= done:
            keep.append(ln)
            epochs.add(epoch)
    if last is not None and last.get("epoch") == done and done not in epochs:
        keep.append(json.dumps(last))
    atomic_write(path, "".join(ln + "\n" for ln in keep), "the metrics log", RESUME)


# the files only a run folder holds: a folder with other files in it is never written into
RUN_MARKERS = ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "last.pt", "best.pt", "results.json")


def _started(out_dir: Path) -> bool:
    """A run directory with a configuration but no checkpoint: it stopped before its first epoch ended."""
    names = ("last.safetensors", "best.safetensors", "last.pt", "best.pt")
    return (out_dir / "config.json").exists() and not any((out_dir / n).exists() for n in names)


# --set keys a resumed run may change: they keep it one run (the same steps, only more of them, or where it runs)
RESUMABLE_KEYS = ("epochs", "threads", "device")


def resume_config(stored: Config, overrides: list[str], done_epochs: int, out_dir: Path) -> tuple[Config, list[str]]:
    """The configuration a resumed run continues with: the stored one, plus the overrides that are sound.

    ``epochs`` may grow (training continues to the new count; the learning-rate schedule is a function of the
    epoch, so the run equals one started with that count); ``threads`` and ``device`` change where it runs.
    Any other changed key would make the run a mix of two configurations, and is refused.
    """
    cfg = apply_overrides(stored, overrides, STAGE_SECTIONS["train"], "train --resume")
    notes, refused = [], []
    for item in overrides:
        section, name = resolve_key(item.split("=", 1)[0].strip(), STAGE_SECTIONS["train"])
        old, new = getattr(getattr(stored, section), name), getattr(getattr(cfg, section), name)
        if old == new:
            continue
        if section == "train" and name in RESUMABLE_KEYS:
            notes.append(f"resuming with {section}.{name}={new} (the run was started with {old}), as --set asks")
        else:
            refused.append(f"{section}.{name} ({old} -> {new})")
    if refused:
        raise ConfigError(
            f"--resume continues the run in {out_dir} with its own configuration; --set cannot change {', '.join(refused)} "
            f"there. Only {', '.join(RESUMABLE_KEYS)} can change on --resume; start a new run with another --out for the rest."
        )
    if cfg.train.epochs < done_epochs:
        raise ConfigError(f"--set epochs={cfg.train.epochs}: the run in {out_dir} has already trained {done_epochs} epochs")
    return cfg, notes
