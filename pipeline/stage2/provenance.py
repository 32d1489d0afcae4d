"""What a run records about the cache it used, taken from the cache itself, never from the preset.

A preset names the encoders, precision and data folder a cache *would* be built with; the cache a run trains on may
have been built otherwise (``--set`` at extraction, another preset, a cache copied from another machine). So the
sections of a run's ``config.json`` that describe the features (``dataset``'s name, format, classes and folder;
``encoders``; ``extract``'s dtype and precision), the tracker's hyperparameters and ``results.json``'s ``cache`` are
all set from the cache's provenance and its recorded data folder (``config_as_trained``, ``cache_record``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..cache import DATA_DIR_ATTR, FeatureCache
from ..config import Config


def cache_record(cache: FeatureCache) -> dict:
    """The cache a run used, as its provenance says: file, data folder, dataset, encoders, dtype and precision.

    ``data_dir`` is None for a cache extracted before sppscl recorded it."""
    prov = cache.provenance
    text = prov["encoders"]["text"]
    data_dir = str(getattr(cache, "attrs", {}).get(DATA_DIR_ATTR, "")) or None
    return {
        "path": str(Path(cache.path).resolve()),
        "data_dir": data_dir,
        "dataset": prov["dataset"]["name"],
        "format": prov["dataset"].get("format"),
        "classes": list(prov["dataset"]["classes"]),
        "image_encoder": prov["encoders"]["image"]["name"],
        "text_encoder": text["name"],
        "max_length": int(text["tokenizer"]["max_length"]),
        "layers": len(text["layers"]),
        "dtype": prov["dtype"],
        # caches from before --precision were all computed in float32
        "precision": prov.get("precision", "fp32"),
    }


def config_as_trained(cfg: Config, cache: FeatureCache) -> Config:
    """``cfg`` with every key that describes the features set from ``cache``: what ``config.json`` and the trackers
    record, so a run on an EfficientNet-Lite0 + MiniLM cache never names the preset's ResNet-50 + BERT."""
    r = cache_record(cache)
    out = copy.deepcopy(cfg)
    out.dataset.name, out.dataset.classes = r["dataset"], r["classes"]
    out.dataset.format = r["format"] or out.dataset.format
    out.dataset.primary_f1 = cache.provenance["dataset"].get("primary_f1", out.dataset.primary_f1)
    # unknown for an old cache: empty rather than the preset's folder, which the features need not come from
    out.dataset.data_dir = r["data_dir"] or ""
    out.encoders.image, out.encoders.text = r["image_encoder"], r["text_encoder"]
    out.encoders.max_length, out.encoders.layers = r["max_length"], r["layers"]
    out.extract.dtype, out.extract.precision = r["dtype"], r["precision"]
    return out
