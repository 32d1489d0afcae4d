"""`sppscl predict`: single pairs, files, bad rows, agreement with `evaluate`, refusal of other encoders."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from sppscl.cache import FeatureCache
from sppscl.cli import main
from sppscl.config import apply_overrides
from sppscl.stage2.predict import Pair, PredictError, Predictor, read_pairs
from sppscl.stage2.checkpoint import save_checkpoint
from sppscl.stage2.runs import load_checkpoint, predict_split
from sppscl.stage2.train import train


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """One-epoch runs on the tiny cache with the paper's batch fusion and the batch-independent sample fusion."""
    path, cfg = tiny_cache
    root = tmp_path_factory.mktemp("predict-runs")
    for fusion in ("batch", "sample"):
        train(path, apply_overrides(cfg, ["epochs=1", f"fusion={fusion}"]), root / fusion, progress=False)
    return path, cfg.data_dir(), root


def _cli(ckpt, *args: str) -> int:
    return main(["predict", "--checkpoint", str(ckpt), "--device", "cpu", *map(str, args)])


def _cached_dev(runs, fusion: str):
    path, data_dir, root = runs
    predictor = Predictor(root / fusion / "best.safetensors", "cpu")
    split = FeatureCache(path).load("dev")
    return predictor, split, data_dir


def test_file_prediction_agrees_with_evaluate_on_the_cache(runs):
    predictor, split, data_dir = _cached_dev(runs, "batch")
    # the manifest the dev split was extracted from: same rows, same order; image paths relative to its folder
    pairs = read_pairs(data_dir / "dev.jsonl")
    assert len(pairs) == len(split.rows) > predictor.eval_batch_size // 2
    # the fresh encoder run reproduces the cached features exactly (same encoders, batches and float16 cast)
    fresh = predictor.encode(pairs)
    assert fresh.image.dtype == split.image.dtype == np.float16
    np.testing.assert_array_equal(fresh.image, split.image[split.rows])
    np.testing.assert_array_equal(fresh.offsets, split.offsets)
    np.testing.assert_array_equal(fresh.tokens, split.tokens)
    preds = predictor.predict(pairs, source="dev.jsonl")
    ref = predict_split(predictor.model, split, predictor.eval_batch_size, predictor.device)
    assert [p.id for p in preds] == list(split.ids[split.rows])
    np.testing.assert_allclose([[p.probs[c] for c in predictor.classes] for p in preds], ref["probs"], atol=1e-5)
    assert [p.index for p in preds] == ref["pred"].tolist()
    assert [p.pred for p in preds] == [predictor.classes[k] for k in ref["pred"]]


def test_cli_file_writes_one_row_per_input(runs, tmp_path):
    predictor, split, data_dir = _cached_dev(runs, "batch")
    ref = predict_split(predictor.model, split, predictor.eval_batch_size, predictor.device)
    out = tmp_path / "preds.jsonl"
    ckpt = runs[2] / "batch" / "best.safetensors"
    assert _cli(ckpt, "--input", data_dir / "dev.jsonl", "--out", out, "--quiet") == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(split.ids[split.rows])
    assert [r["pred"] for r in rows] == [predictor.classes[k] for k in ref["pred"]]
    probs = np.array([[r["probabilities"][c] for c in predictor.classes] for r in rows])
    np.testing.assert_allclose(probs, ref["probs"], atol=1e-5)

    csv_out = tmp_path / "preds.csv"
    assert _cli(ckpt, "--input", data_dir / "dev.jsonl", "--out", csv_out, "--quiet") == 0
    with open(csv_out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["pred"] for r in table] == [r["pred"] for r in rows] and all(r["error"] == "" for r in table)


def test_single_pair_is_a_batch_of_one(runs, capsys):
    predictor, split, data_dir = _cached_dev(runs, "batch")
    first = read_pairs(data_dir / "dev.jsonl")[0]
    (pred,) = predictor.predict([Pair("one", first.text, first.image)])
    # batch fusion on one pair: the cached row evaluated alone, as a batch of one
    alone = predict_split(predictor.model, replace(split, rows=split.rows[:1]), predictor.eval_batch_size, predictor.device)
    np.testing.assert_allclose(list(pred.probs.values()), alone["probs"][0], atol=1e-5)
    assert list(pred.probs) == predictor.classes and sum(pred.probs.values()) == pytest.approx(1.0, abs=1e-5)

    code = _cli(runs[2] / "batch" / "best.safetensors", "--image", first.image, "--text", first.text)
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0
    # the result on stdout, the note about batch fusion on stderr
    assert f"pred: {pred.pred}" in out and "batch of one" in captured.err and "batch of one" not in out
    for c in predictor.classes:
        assert c in out


def test_sample_fusion_does_not_depend_on_the_batch(runs):
    predictor, _, data_dir = _cached_dev(runs, "sample")
    assert predictor.fusion_note(single=True) is None
    pairs = read_pairs(data_dir / "dev.jsonl")
    together = predictor.predict(pairs)
    alone = [predictor.predict([p])[0] for p in pairs[:4]]
    for a, b in zip(alone, together):
        np.testing.assert_allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-5)


def _bad_input(tmp_path, data_dir):
    """A JSONL file mixing good rows with every kind of bad row; returns (path, good texts+images)."""
    good = read_pairs(data_dir / "dev.jsonl")[:3]
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    lines = [
        json.dumps({"id": "g1", "text": good[0].text, "image": str(good[0].image)}),
        "{not json",
        json.dumps({"id": "no-text", "image": str(good[0].image)}),
        json.dumps({"id": "empty", "text": "  ", "image": str(good[0].image)}),
        json.dumps({"id": "gone", "text": "hello", "image": "missing.jpg"}),
        json.dumps({"id": "g2", "text": good[1].text, "image": str(good[1].image)}),
        json.dumps({"id": "broken", "text": "hello", "image": "broken.jpg"}),
        json.dumps({"text": good[2].text, "image": str(good[2].image)}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_stop_names_the_row(runs, tmp_path, capsys):
    predictor, _, data_dir = _cached_dev(runs, "batch")
    path = _bad_input(tmp_path, data_dir)
    with pytest.raises(PredictError, match=r"pairs.jsonl: line 2 \(id '2'\): not valid JSON"):
        predictor.predict(read_pairs(path), source=str(path))
    # an undecodable image is only found when decoding: the first such row is named
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{\"")]
    only_broken = tmp_path / "broken.jsonl"
    only_broken.write_text("\n".join(json.dumps(r) for r in rows if r.get("id") in ("g1", "broken")) + "\n")
    with pytest.raises(PredictError, match=r"line 2 \(id 'broken'\): undecodable image"):
        predictor.predict(read_pairs(only_broken), source=str(only_broken))
    assert _cli(runs[2] / "batch" / "best.safetensors", "--input", path, "--quiet") == 2
    assert "line 2 (id '2')" in capsys.readouterr().err


def test_bad_rows_skip_reports_them_and_predicts_the_rest(runs, tmp_path):
    predictor, _, data_dir = _cached_dev(runs, "batch")
    path = _bad_input(tmp_path, data_dir)
    out = tmp_path / "out.jsonl"
    assert _cli(runs[2] / "batch" / "best.safetensors", "--input", path, "--out", out, "--on-error", "skip", "--quiet") == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["g1", "2", "no-text", "empty", "gone", "g2", "broken", "8"]
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"2", "no-text", "empty", "gone", "broken"}
    assert "not valid JSON" in errors["2"] and "missing 'text'" in errors["no-text"] and errors["empty"] == "empty text"
    assert errors["gone"].startswith("missing image:") and errors["broken"].startswith("undecodable image:")
    for r in rows:
        assert ("pred" in r) == ("error" not in r)
    # the good rows form the head batches on their own, as skipped rows do in a cache
    good = [r for r in rows if "pred" in r]
    clean = predictor.predict([p for p in read_pairs(path) if p.id in ("g1", "g2", "8")])
    for r, p in zip(good, clean):
        assert r["pred"] == p.pred
        assert r["probabilities"] == pytest.approx(p.probs, abs=1e-6)


def test_csv_input_rows(runs, tmp_path):
    predictor, _, data_dir = _cached_dev(runs, "batch")
    good = read_pairs(data_dir / "dev.jsonl")[:2]
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "image"])
        w.writerow(["a", good[0].text, str(good[0].image)])
        w.writerow(["b", good[1].text, str(good[1].image), "surplus"])
        w.writerow(["", good[1].text, str(good[1].image)])
    pairs = read_pairs(path)
    assert [p.id for p in pairs] == ["a", "b", "3"]
    assert pairs[1].error == "expected 3 fields, found 4" and pairs[1].line == 3
    with pytest.raises(PredictError, match=r"line 3 \(id 'b'\): expected 3 fields"):
        predictor.predict(pairs, source=str(path))
    preds = predictor.predict(pairs, on_error="skip")
    assert preds[0].pred is not None and preds[1].pred is None and preds[2].pred is not None


def test_encoders_that_differ_from_the_checkpoints_are_refused(runs, tmp_path, capsys):
    ckpt = load_checkpoint(runs[2] / "batch" / "best.safetensors")
    ckpt["cache_provenance"]["encoders"]["image"]["weight_sha256"] = "0" * 64
    tampered = save_checkpoint(ckpt, tmp_path / "tampered")
    with pytest.raises(PredictError, match=r"image\.weight_sha256: the checkpoint's cache has '0000"):
        Predictor(tampered, "cpu")
    assert _cli(tampered, "--image", "x.jpg", "--text", "hi") == 2
    assert "refusing to predict" in capsys.readouterr().err


def test_usage_errors(runs, tmp_path, capsys):
    ckpt = runs[2] / "batch" / "best.safetensors"
    assert _cli(ckpt) == 2
    assert _cli(ckpt, "--text", "hi") == 2
    assert _cli(ckpt, "--text", "hi", "--image", "x.jpg", "--input", "p.jsonl") == 2
    assert "either --image and --text" in capsys.readouterr().err
    assert _cli(ckpt, "--input", "p.jsonl", "--out", "p.txt") == 2
    assert "must end in .jsonl or .csv" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert _cli(ckpt, "--input", tmp_path / "empty.jsonl") == 2
    assert "no rows to predict" in capsys.readouterr().err


def test_a_bf16_checkpoint_encodes_new_pairs_in_bf16(tiny_cache, tmp_path):
    """Predict runs the encoders in the precision the checkpoint's cache was computed in, so fresh features
    equal the cached ones bit for bit; and evaluate refuses a cache of another precision."""
    from sppscl.stage1.extract import extract

    path, cfg = tiny_cache
    bf16 = tmp_path / "bf16.h5"
    extract(cfg, bf16, progress=False, precision="bf16")
    train(bf16, apply_overrides(cfg, ["epochs=1", "fusion=sample"]), tmp_path / "run", progress=False)
    predictor = Predictor(tmp_path / "run" / "best.safetensors", "cpu")
    split = FeatureCache(bf16).load("dev")
    fresh = predictor.encode(read_pairs(cfg.data_dir() / "dev.jsonl"))
    np.testing.assert_array_equal(fresh.image, split.image[split.rows])
    np.testing.assert_array_equal(fresh.tokens, split.tokens)
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.safetensors"), "--cache", str(path), "--split", "dev", "--device", "cpu"])
    assert code == 2


def test_input_row_under_an_unknown_users_home_is_that_rows_error(tmp_path):
    from sppscl.stage2.predict import read_pairs

    f = tmp_path / "in.jsonl"
    f.write_text('{"id": "a", "text": "t", "image": "~no-such-user-sppscl/x.jpg"}\n{"id": "b", "text": "t", "image": "b.jpg"}\n')
    a, b = read_pairs(f)
    assert a.id == "a" and a.image is None and "cannot be expanded" in a.error
    assert b.error is None and b.image == tmp_path / "b.jpg"



def test_predict_to_standard_output_and_formula_cells_neutralised(runs, tmp_path, capsys):
    """predict --out - writes the CSV alone on standard output (the table goes to standard error), and an id a
    spreadsheet would run as a formula gets a leading quote (OWASP), as in every CSV sppscl writes; control
    characters of an id reach the console escaped."""
    import io

    from PIL import Image

    Image.new("RGB", (32, 24), (10, 200, 30)).save(tmp_path / "a.png")
    ids = ['=HYPERLINK("http://x","y")', "+1+1", "-2", "@SUM(A1)", "plain", "id\x1b[31mred"]
    rows = [json.dumps({"id": i, "text": f"text {n}", "image": "a.png"}) for n, i in enumerate(ids)]
    (tmp_path / "in.jsonl").write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert _cli(runs[2] / "batch" / "best.safetensors", "--input", str(tmp_path / "in.jsonl"), "--out", "-", "--quiet") == 0
    out, err = capsys.readouterr()
    got = list(csv.reader(io.StringIO(out)))
    assert got[0][:2] == ["id", "pred"] and len(got) == len(ids) + 1, out
    assert [r[0] for r in got[1:]] == ["'" + i if i[0] in "=+-@\t" else i for i in ids]
    assert "predictions written to standard output" in err
    assert "\x1b" not in err and "\\x1b[31mred" in err, err
