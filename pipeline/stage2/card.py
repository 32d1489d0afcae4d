"""A model card per run: ``README.md`` in the run folder, in the Hugging Face model-card layout.

YAML front matter (``library_name``, ``tags``, ``datasets``, ``metrics`` and a ``model-index`` holding each labelled
split's accuracy and F1 with the split named), then: what the model predicts and how to load it, the training data
and the frozen encoders (from the cache's provenance), the configuration, the metrics (the split and the selection
named, the baselines beside them), intended use and limits, and the citation of SPP-SCL. Written by ``train`` and
``ensemble --out``; it is rebuilt from the run's files, so it never disagrees with them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..outputs import atomic_write
from .baselines import baseline_lines

CITATION = """@inproceedings{wu2026sppscl,
  title     = {{SPP-SCL}: Semi-Push-Pull Supervised Contrastive Learning for Image-Text Sentiment Analysis and Beyond},
  author    = {Wu, Jiesheng and Li, Shengrong},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2026}
}"""

# the hyperparameters a reader needs to tell two runs apart; config.json holds every one
CARD_KEYS = ("lr", "epochs", "batch_size", "lambda_ce", "tau", "alpha", "update", "fusion", "modalities", "ha_layers", "seed")


def _model_index(name: str, dataset: str, splits: dict[str, dict], primary: str) -> list[dict]:
    results = []
    for split, m in splits.items():
        if "accuracy" not in m:
            continue
        results.append(
            {
                "task": {"type": "image-text-classification", "name": "Image-text sentiment classification"},
                "dataset": {"name": dataset, "type": dataset, "split": split},
                "metrics": [
                    {"type": "accuracy", "value": round(float(m["accuracy"]), 4), "name": f"{split} accuracy"},
                    {"type": "f1", "value": round(float(m["weighted_f1"]), 4), "name": f"{split} weighted F1", "args": {"average": "weighted"}},
                    {"type": "f1", "value": round(float(m["macro_f1"]), 4), "name": f"{split} macro F1", "args": {"average": "macro"}},
                ],
            }
        )
    return [{"name": name, "results": results}] if results else []


def _front_matter(name: str, provenance: dict, splits: dict[str, dict], primary: str) -> str:
    dataset = provenance["dataset"]["name"]
    meta = {
        "library_name": "sppscl",
        "tags": ["sppscl", "spp-scl", "image-text-classification", "multimodal-sentiment-analysis", "frozen-encoders"],
        "datasets": [dataset],
        "metrics": ["accuracy", "f1"],
        "model-index": _model_index(name, dataset, splits, primary),
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _metrics_table(splits: dict[str, dict]) -> list[str]:
    lines = ["| split | n | accuracy | weighted F1 | macro F1 |", "|---|---:|---:|---:|---:|"]
    for split, m in splits.items():
        if "accuracy" in m:
            lines.append(f"| {split} | {m['n']} | {m['accuracy']:.4f} | {m['weighted_f1']:.4f} | {m['macro_f1']:.4f} |")
        else:
            lines.append(f"| {split} | {m['n']} | - | - | - (no labels: predictions only) |")
    return lines


def _encoders(provenance: dict) -> list[str]:
    enc = provenance["encoders"]
    image, text = enc["image"], enc["text"]
    lines = [f"- image: `{image['name']}`" + (f" ({image['weights']})" if image.get("weights") else "")]
    tok = text.get("tokenizer", {})
    layers = text.get("layers")
    lines.append(
        f"- text: `{text['name']}`" + (f" ({text['weights']})" if text.get("weights") else "")
        + (f", max_length {tok['max_length']}" if "max_length" in tok else "")
        + (f", its last {len(layers)} layers cached" if isinstance(layers, list) else "")
    )
    lines.append(f"- features stored as {provenance['dtype']}, computed in {provenance.get('precision', 'fp32')}; the encoders stay frozen")
    return lines


def render_card(
    name: str,
    kind: str,
    provenance: dict,
    results: dict,
    config: dict | None,
    selection: str,
    usage: list[str],
) -> str:
    """The card's Markdown. ``kind`` says what the folder holds ("SPP-SCL heads", "an ensemble of N runs"); ``usage``
    is the Markdown showing how to predict with it."""
    ds = provenance["dataset"]
    classes = list(results["classes"])
    splits = results["splits"]
    primary = results.get("primary_f1", ds.get("primary_f1", "weighted"))
    lines = [
        f"# {name}: {kind} for image-text sentiment ({ds['name']})",
        "",
        "## What it predicts",
        "",
        f"One of {len(classes)} classes ({', '.join(classes)}) for an image-text pair, with the probability of each. "
        "Frozen encoders turn the image and the text into features (listed below); the trained SPP-SCL heads "
        "(hierarchical attention over the text layers, cross-modal fusion, a classifier) predict the class.",
        "",
        *usage,
        "",
        "## Training data",
        "",
        f"- dataset: `{ds['name']}` (format `{ds.get('format', '?')}`), classes {', '.join(classes)}",
        "- rows per split: " + ", ".join(f"{s} {m['n']}" for s, m in splits.items())
        + (f"; {results['skipped_rows']} rows skipped at extraction (recorded in the cache)" if results.get("skipped_rows") else ""),
    ]
    if ds.get("limit_per_split"):
        lines.append(f"- **a trial cache**: at most {ds['limit_per_split']} rows per split were extracted (`--limit`)")
    if ds.get("samples_sha256"):
        lines.append(f"- samples digest (sha256 of ids, texts and labels): `{ds['samples_sha256'][:16]}…`")
    if "cv" in results:
        lines.append(f"- one fold of a cross-validation: {results['cv']}")
    lines += ["", "### Encoders (frozen, from the cache's provenance)", "", *_encoders(provenance), ""]
    lines += ["## Configuration", ""]
    if config is not None:
        tc = config.get("train", {})
        lines += ["| key | value |", "|---|---|", *[f"| {k} | {tc[k]} |" for k in CARD_KEYS if k in tc], "", "Every key: `config.json`.", ""]
    else:
        lines += ["The members' configurations are in their own run folders.", ""]
    lines += ["## Metrics", "", *_metrics_table(splits), "", f"Selection: {selection}."]
    if "dev" in splits and "accuracy" in splits["dev"]:
        lines.append("dev chose the checkpoint, so its numbers are optimistic; the other labelled splits were not used for any choice.")
    refs = baseline_lines(results)
    if refs:
        lines += ["", "For reference, on the same rows:", "", *[f"- {r}" for r in refs]]
    lines += [
        "",
        "## Intended use and limits",
        "",
        "- Research on image-text sentiment analysis: predictions for posts like the training data (social-media "
        "image-text pairs, in the language of the training texts). Not for decisions about people.",
        f"- It saw only `{ds['name']}`; accuracy on other sources, languages or image styles is unknown until measured "
        "(`sppscl evaluate` on a cache of them, extracted with the same encoders).",
        "- The same encoders must make the features: `sppscl.load` and `sppscl predict` load them by the names above "
        "and refuse weights that differ.",
    ]
    fusion = (config or {}).get("train", {}).get("fusion")
    if fusion == "batch":
        lines.append(
            "- Batch fusion (the paper's Eq. 3): a prediction depends on the other pairs predicted with it; a single pair is a batch "
            "of one. Train with `--set fusion=sample` for batch-independent predictions."
        )
    lines += [
        "",
        "## Citation",
        "",
        "The method is Jiesheng Wu and Shengrong Li, *SPP-SCL: Semi-Push-Pull Supervised Contrastive Learning for Image-Text "
        "Sentiment Analysis and Beyond*, AAAI 2026:",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return _front_matter(name, provenance, splits, primary) + "\n" + "\n".join(lines)


def write_run_card(out_dir: Path, results: dict, provenance: dict, config: dict) -> Path:
    """The card of a training run (``train``): its best checkpoint, selected on dev."""
    out_dir = Path(out_dir)
    selection = (
        f"the checkpoint of epoch {results['best_epoch']} (`best.safetensors`), chosen by {results['selection']} over "
        f"{results['epochs_trained']} epochs trained"
    )
    usage = [
        "```python",
        "import sppscl",
        f'model = sppscl.load("{out_dir}")',
        'preds = model.predict([("photo.jpg", "what a lovely day")])   # preds[0].pred, preds[0].probs',
        "```",
        "",
        f'or `sppscl predict --checkpoint {out_dir} --image photo.jpg --text "what a lovely day"`.',
    ]
    text = render_card(out_dir.name, "SPP-SCL heads", provenance, results, config, selection, usage)
    path = out_dir / "README.md"
    atomic_write(path, text, "the model card")
    return path


def write_ensemble_card(out_dir: Path, results: dict, provenance: dict) -> Path:
    """The card of an ensemble (``ensemble --out``): its members and how they are combined."""
    out_dir = Path(out_dir)
    n = len(results["members"])
    selection = f"{results['how']}; members: " + ", ".join(f"`{m}`" for m in results["members"])
    flags = " ".join(f"--checkpoint {m}" for m in results["members"])
    usage = [f'`sppscl predict {flags} --image photo.jpg --text "what a lovely day"` (the mean of the members\' class probabilities).']
    text = render_card(out_dir.name, f"an ensemble of {n} SPP-SCL runs", provenance, results, None, selection, usage)
    path = out_dir / "README.md"
    atomic_write(path, text, "the model card")
    return path
