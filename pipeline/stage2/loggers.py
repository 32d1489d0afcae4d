"""Optional experiment trackers for stage two: TensorBoard or MLflow (``--set logger=tensorboard|mlflow|none``).

Each receives, per epoch, every number of that epoch's ``metrics.jsonl`` line (the loss terms, the step-2 firing
rate, the dev metrics, the learning rate, the epoch time) and, once, the run's resolved config as hyperparameters.
``metrics.jsonl`` stays the record of the run: a tracker only mirrors it, and a missing tracker package is an error
before the run starts, never a silent no-op.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, ConfigError

LOGGERS = ("none", "tensorboard", "mlflow")
EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# metrics.jsonl keys -> tracker tags, grouped the way TensorBoard and MLflow show them
SKIP = ("epoch", "best_epoch")


def tag(key: str) -> str:
    for prefix in ("loss_", "dev_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def flat_params(cfg: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as ``section.key`` -> scalar (lists and mappings as JSON text), as trackers take hyperparameters."""
    out: dict[str, str | int | float | bool] = {}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return out


def _missing(kind: str, e: ImportError) -> ConfigError:
    return ConfigError(
        f"--set logger={kind} needs the {EXTRA[kind]!r} package, which is not installed ({e.name or e}): "
        f"pip install 'sppscl[{kind}]' (or {EXTRA[kind]}), or use --set logger=none"
    )


class _Closing:
    """``with logger:`` closes the tracker however the run ends (an MLflow run left open would swallow the next)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


class TensorBoardLogger(_Closing):
    """Event files in ``<run>/tensorboard``: ``tensorboard --logdir runs`` shows every run side by side."""

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", e) from None
        self.params = flat_params(cfg)
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")

    def log_epoch(self, record: dict) -> None:
        for key, value in record.items():
            if key not in SKIP:
                self.writer.add_scalar(tag(key), value, record["epoch"])
        self.writer.flush()

    def finish(self, best: dict) -> None:
        # the HParams tab: one row per run, its config and the best dev numbers it was selected on
        self.writer.add_hparams(self.params, {f"hparam/best_{k}": v for k, v in best.items()}, run_name=".")

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowLogger(_Closing):
    """One MLflow run per training run, tracked where MLFLOW_TRACKING_URI (or MLflow's default) says."""

    def __init__(self, run_dir: Path, cfg: Config):
        try:
            import mlflow
        except ImportError as e:
            raise _missing("mlflow", e) from None
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        mlflow.log_params(flat_params(cfg))

    def log_epoch(self, record: dict) -> None:
        self.mlflow.log_metrics({tag(k): v for k, v in record.items() if k not in SKIP}, step=record["epoch"])

    def finish(self, best: dict) -> None:
        self.mlflow.log_metrics({f"best/{k}": v for k, v in best.items()})

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class NoLogger(_Closing):
    def log_epoch(self, record: dict) -> None:
        pass

    def finish(self, best: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def make_logger(cfg: Config, run_dir: Path):
    """The tracker ``cfg.train.logger`` names, opened on ``run_dir``."""
    kind = cfg.train.logger
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, cfg)
    if kind == "mlflow":
        return MLflowLogger(run_dir, cfg)
    return NoLogger()
