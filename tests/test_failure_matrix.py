"""Issue 11's matrix: bad inputs and faults across every command, run in-process through ``sppscl.cli.main``.

Each row builds its bad input, runs one command and asserts: the exit code (2 bad input/option/location,
1 a failed run or problems found by ``data verify``), that the message names the offending file/row/id/key,
that no traceback reaches the user, and that no file that existed before the command changed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import craft_checkpoint, tiny_config
from sppscl.cli import main

LABELS = ("positive", "neutral", "negative")


# ------------------------------------------------------------------------------------ building bad inputs


def jpeg(seed: int = 0, size=(40, 30)) -> bytes:
    px = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR data starts at byte 16: width, height (big-endian); its CRC covers type + data
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def image_bytes(mode: str, fmt: str) -> bytes:
    im = Image.new("RGB", (24, 20), (200, 60, 30)).convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (24, 20), 300)
    if mode == "P":
        im.info["transparency"] = 0
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def rows(n: int = 4, split: str = "train") -> list[dict]:
    return [{"id": f"{split}{i}", "text": f"a {split} post number {i}", "image": f"images/{split}{i}.jpg", "label": i % 3} for i in range(n)]


@dataclass
class Dataset:
    """A manifest (or CLMLF) dataset under ``root/data`` with a preset YAML for --config."""

    root: Path
    splits: dict[str, list[dict]] = field(default_factory=lambda: {s: rows(4 if s == "train" else 3, s) for s in ("train", "dev", "test")})
    fmt: str = "manifest"
    raw: dict[str, bytes] = field(default_factory=dict)  # split file name -> bytes written as is
    images: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes (default: a JPEG per row)
    missing: set[str] = field(default_factory=set)  # relative image paths not to create

    @property
    def data(self) -> Path:
        return self.root / "data"

    def write(self) -> Path:
        (self.data / "images").mkdir(parents=True, exist_ok=True)
        names = {}
        for split, rs in self.splits.items():
            name = f"{split}.{'json' if self.fmt == 'clmlf' else 'jsonl'}"
            names[split] = name
            if name in self.raw:
                (self.data / name).write_bytes(self.raw[name])
            elif self.fmt == "clmlf":
                items = [{"id": r["id"], "text": r["text"], "emotion_label": r["label"]} for r in rs]
                (self.data / name).write_text(json.dumps(items))
            else:
                (self.data / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
            for i, r in enumerate(rs):
                rel = r["image"] if self.fmt == "manifest" else f"images/{r['id']}.jpg"
                if rel not in self.images and rel not in self.missing and "/.." not in rel:
                    (self.data / rel).parent.mkdir(parents=True, exist_ok=True)
                    (self.data / rel).write_bytes(jpeg(i))
        for rel, content in self.images.items():
            (self.data / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.data / rel).write_bytes(content)
        preset = self.root / "preset.yaml"
        preset.write_text(
            yaml.safe_dump(
                {
                    "dataset": {"name": "bad", "format": self.fmt, "data_dir": str(self.data), "splits": names, "image_dir": "images"},
                    "encoders": {"image": "tiny-cnn", "text": "tiny-bert", "max_length": 32},
                    "extract": {"batch_size": 4, "num_workers": 0, "device": "cpu"},
                }
            )
        )
        return preset


# ------------------------------------------------------------------------------------ the rows


@dataclass
class Expect:
    argv: list[str]
    code: int
    names: list[str]  # each must appear in the output (the offending file / row / id / key)
    # files under these folders must be byte-identical after the command (default: the case's own folder)
    protect: list[Path] = field(default_factory=list)
    after: Callable[[], None] | None = None  # further checks (e.g. a rerun resumes)


@dataclass
class Env:
    tmp: Path
    cache: Path  # the session's tiny cache
    run: Path  # the session's tiny run (best/last checkpoints)
    monkeypatch: pytest.MonkeyPatch

    def dataset(self, **kw) -> Dataset:
        return Dataset(self.tmp / "ds", **kw)


CASES: dict[str, Callable[[Env], Expect]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def verify_and_extract(name: str, mutate: Callable[[Dataset], None], names: list[str], extract_code: int = 2, verify_code: int = 1):
    """Two rows from one bad dataset: ``data verify`` reports it (exit 1) and ``extract`` refuses it (exit 2)."""

    def build(env: Env, command: str) -> Expect:
        ds = env.dataset()
        mutate(ds)
        preset = ds.write()
        if command == "verify":
            return Expect(["data", "verify", "--config", str(preset), "--workers", "1"], verify_code, names, [ds.data])
        return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "out.h5"), "--quiet"], extract_code, names, [ds.data])

    CASES[f"verify_{name}"] = lambda env: build(env, "verify")
    CASES[f"extract_{name}"] = lambda env: build(env, "extract")


def _set(split: str, i: int, **kw):
    def mutate(ds: Dataset) -> None:
        ds.splits[split][i].update(kw)

    return mutate


def _image(rel: str, content: bytes):
    def mutate(ds: Dataset) -> None:
        ds.images[rel] = content

    return mutate


# images
verify_and_extract("corrupt_image", _image("images/train1.jpg", b"not an image at all" * 20), ["train1", "train1.jpg", "undecodable"])
verify_and_extract("truncated_image", _image("images/dev2.jpg", jpeg(5)[:300]), ["dev2", "dev2.jpg"])
verify_and_extract("empty_image_file", _image("images/test0.jpg", b""), ["test0", "test0.jpg"])
verify_and_extract("missing_image", lambda ds: ds.missing.add("images/train2.jpg"), ["train2", "train2.jpg", "missing image"])
verify_and_extract(
    "oversized_image", _image("images/train3.jpg", png_claiming(20000, 20000)), ["train3", "train3.jpg", "400.0 megapixels", "limit of 64.0"]
)
# texts
verify_and_extract("empty_text", _set("train", 0, text=""), ["train0", "empty text"])
verify_and_extract("whitespace_text", _set("dev", 1, text=" \t\n "), ["dev1", "empty text"])
verify_and_extract("unencodable_text", _set("train", 1, text="lone \ud800 surrogate"), ["train1", "surrogate"])
# ids and labels
verify_and_extract("duplicate_id", _set("test", 2, id="train0"), ["train0", "duplicate id"])
verify_and_extract("unknown_label", _set("train", 3, label=7), ["train3", "label 7"])
verify_and_extract("negative_label", _set("dev", 0, label=-2), ["dev0", "label -2"])
verify_and_extract("empty_split", lambda ds: ds.splits.__setitem__("dev", []), ["dev", "dev.jsonl", "no rows"])


def _clmlf_escape(ds: Dataset) -> None:
    """CLMLF derives image paths from ids: an id that climbs out of the image folder must not be read."""
    ds.fmt = "clmlf"
    ds.splits["train"][1]["id"] = "../../outside/evil"
    outside = ds.root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "evil.jpg").write_bytes(jpeg(9))


verify_and_extract("path_escaping_id", _clmlf_escape, ["../../outside/evil", "outside the image folder", "outside/evil.jpg"])


def _mislabelled(ds: Dataset) -> None:
    # a PNG and a GIF under .jpg names: PIL reads the content, not the name, so these are fine
    ds.images["images/train0.jpg"] = image_bytes("RGB", "PNG")
    ds.images["images/train1.jpg"] = image_bytes("P", "GIF")


verify_and_extract("mislabelled_image_format_is_fine", _mislabelled, [], extract_code=0, verify_code=0)


def _every_mode(ds: Dataset) -> None:
    modes = [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "JPEG"), ("YCbCr", "JPEG"), ("RGB", "BMP"), ("RGBA", "WEBP")]
    ds.splits["train"] = [{"id": f"m{i}", "text": f"mode {m}", "image": f"images/m{i}.img", "label": i % 3} for i, (m, _) in enumerate(modes)]
    for i, (m, fmt) in enumerate(modes):
        ds.images[f"images/m{i}.img"] = image_bytes(m, fmt)


verify_and_extract("every_image_mode_is_fine", _every_mode, [], extract_code=0, verify_code=0)
verify_and_extract("overlong_text_is_truncated_not_refused", _set("train", 0, text="word " * 20000), [], extract_code=0, verify_code=0)


# structure of the files: these stop in the adapter, the same way for verify and extract (exit 2)
def structure(name: str, mutate: Callable[[Dataset], None], names: list[str]):
    verify_and_extract(name, mutate, names, extract_code=2, verify_code=2)


def _raw(name: str, content: bytes, fmt: str = "manifest"):
    def mutate(ds: Dataset) -> None:
        ds.fmt = fmt
        ds.raw[name] = content

    return mutate


structure("non_utf8_manifest", _raw("train.jsonl", b'{"id": "a", "text": "caf\xe9", "image": "images/a.jpg"}\n'), ["train.jsonl", "line 1", "UTF-8"])
structure("malformed_jsonl", _raw("dev.jsonl", b'{"id": "d0", "text": "x", "image": "images/dev0.jpg", "label": 0}\n{"id": \n'), ["dev.jsonl", "line 2", "JSON"])
structure("jsonl_row_is_a_list", _raw("train.jsonl", b'["t0", "text", "images/train0.jpg", 0]\n'), ["train.jsonl", "line 1", "object"])
structure("clmlf_not_a_list", _raw("train.json", b'{"id": 1}', fmt="clmlf"), ["train.json", "JSON list"])
structure("clmlf_malformed_json", _raw("test.json", b'[{"id": 1, "text": "x"', fmt="clmlf"), ["test.json", "not valid JSON"])
structure("clmlf_id_wrong_type", _raw("train.json", b'[{"id": {"a": 1}, "text": "x", "emotion_label": 0}]', fmt="clmlf"), ["train.json", "row 0", "id"])
# JSON nested deeper than the parser's recursion (a 200 KB file): one line, not an internal error
structure("clmlf_json_100000_deep", _raw("train.json", b"[" * 100_000 + b"]" * 100_000, fmt="clmlf"), ["train.json", "nested too deeply"])
structure("jsonl_row_100000_deep", _raw("dev.jsonl", b'{"id": "d0", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"), ["dev.jsonl", "line 1", "nested too deeply"])
structure("clmlf_text_wrong_type", _raw("train.json", b'[{"id": 3, "text": 5, "emotion_label": 0}]', fmt="clmlf"), ["train.json", "id 3", "text"])
structure("non_integer_label", _set("train", 2, label="maybe"), ["train.jsonl", "line 3", "train2", "'maybe'"])
structure("fractional_label", _set("train", 1, label=1.5), ["train.jsonl", "train1", "1.5"])
structure("label_missing_on_some_rows", lambda ds: ds.splits["dev"][1].pop("label"), ["dev.jsonl", "dev1"])
structure("missing_text_key", lambda ds: ds.splits["test"][0].pop("text"), ["test.jsonl", "line 1", "'text'"])


@case
def verify_csv_manifest_without_image_column(env: Env) -> Expect:
    ds = env.dataset()
    preset = ds.write()
    (ds.data / "train.csv").write_text("id,text,label\nt0,hello,0\n")
    cfg = yaml.safe_load(preset.read_text())
    cfg["dataset"]["splits"]["train"] = "train.csv"
    preset.write_text(yaml.safe_dump(cfg))
    return Expect(["data", "verify", "--config", str(preset)], 2, ["train.csv", "line 1", "image"], [ds.data])


@case
def verify_missing_split_file(env: Env) -> Expect:
    ds = env.dataset()
    preset = ds.write()
    (ds.data / "test.jsonl").unlink()
    return Expect(["data", "verify", "--config", str(preset)], 2, ["test", "test.jsonl", "does not exist"], [ds.data])


@case
def verify_missing_data_dir(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["data", "verify", "--config", str(preset), "--data-dir", str(env.tmp / "nowhere")], 2, ["nowhere", "does not exist"])


@case
def verify_unknown_preset(env: Env) -> Expect:
    return Expect(["data", "verify", "--config", "no-such-preset"], 2, ["no-such-preset"])


@case
def verify_malformed_preset_yaml(env: Env) -> Expect:
    bad = env.tmp / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    return Expect(["data", "verify", "--config", str(bad)], 2, ["bad.yaml", "YAML"])


@case
def verify_preset_with_wrong_type(env: Env) -> Expect:
    bad = env.tmp / "bad.yaml"
    bad.write_text("extract:\n  batch_size: many\n")
    return Expect(["data", "verify", "--config", str(bad)], 2, ["bad.yaml", "extract.batch_size", "many"])


# ------------------------------------------------------------------------------------ extract options and outputs


def _good(env: Env) -> tuple[Dataset, Path]:
    ds = env.dataset()
    return ds, ds.write()


@case
def extract_batch_size_zero(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["extract", "--config", str(preset), "--batch-size", "0", "--out", str(env.tmp / "c.h5")], 2, ["--batch-size", "greater than or equal to 1"], [ds.data])


@case
def extract_negative_limit(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["extract", "--config", str(preset), "--limit", "-1", "--out", str(env.tmp / "c.h5")], 2, ["--limit"], [ds.data])


@case
def extract_batch_size_not_an_integer(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["extract", "--config", str(preset), "--batch-size", "lots", "--out", str(env.tmp / "c.h5")], 2, ["--batch-size", "valid integer"], [ds.data])


@case
def extract_bad_on_error(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["extract", "--config", str(preset), "--on-error", "ignore", "--out", str(env.tmp / "c.h5")], 2, ["--on-error", "ignore"], [ds.data])


@case
def extract_set_max_length_nonsense(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["extract", "--config", str(preset), "--set", "encoders.max_length=1", "--out", str(env.tmp / "c.h5")], 2, ["encoders.max_length=1"], [ds.data])


@case
def extract_out_is_a_folder(env: Env) -> Expect:
    ds, preset = _good(env)
    (env.tmp / "folder").mkdir()
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "folder"), "--quiet"], 2, ["folder", "is a folder"], [ds.data])


@case
def extract_out_under_a_file(env: Env) -> Expect:
    ds, preset = _good(env)
    (env.tmp / "afile").write_text("x")
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "afile" / "c.h5"), "--quiet"], 2, ["afile", "not a folder"], [ds.data])


@case
def extract_out_read_only(env: Env) -> Expect:
    ds, preset = _good(env)
    ro = env.tmp / "ro"
    ro.mkdir()
    # tests may run as root, who can write anywhere: the location reports itself unwritable instead
    _unwritable(env, ro)
    return Expect(["extract", "--config", str(preset), "--out", str(ro / "c.h5"), "--quiet"], 2, [str(ro), "not writable"], [ds.data])


@case
def extract_full_disk_before_start(env: Env) -> Expect:
    ds, preset = _good(env)
    env.monkeypatch.setattr("sppscl.stage1.extract.free_bytes", lambda p: 1000)
    out = env.tmp / "c.h5"

    def after():
        # nothing was left behind, so the next run starts clean
        assert not out.exists() and not out.with_name("c.h5.partial").exists()

    return Expect(["extract", "--config", str(preset), "--out", str(out), "--quiet"], 1, ["c.h5", "no space left", "1.0 KB free", "needs about"], [ds.data], after)


@case
def extract_full_disk_while_writing(env: Env) -> Expect:
    """ENOSPC injected at the positioned write after two batches: exit 1 naming the cache; the rerun resumes."""
    ds, preset = _good(env)
    out = env.tmp / "c.h5"
    import os

    real, calls = os.pwrite, {"n": 0}

    def pwrite(fd, data, pos):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    env.monkeypatch.setattr("sppscl.cache.os.pwrite", pwrite)

    def after():
        env.monkeypatch.setattr("sppscl.cache.os.pwrite", real)
        assert main(["extract", "--config", str(preset), "--out", str(out), "--quiet"]) == 0
        clean = env.tmp / "clean.h5"
        assert main(["extract", "--config", str(preset), "--out", str(clean), "--quiet"]) == 0
        assert _arrays(out) == _arrays(clean)

    return Expect(["extract", "--config", str(preset), "--out", str(out), "--quiet"], 1, ["c.h5", "no space left", "resumes"], [ds.data], after)


@case
def extract_existing_cache_of_another_request(env: Env) -> Expect:
    ds, preset = _good(env)
    out = env.tmp / "c.h5"
    assert main(["extract", "--config", str(preset), "--out", str(out), "--quiet"]) == 0
    return Expect(
        ["extract", "--config", str(preset), "--set", "encoders.max_length=16", "--out", str(out), "--quiet"],
        2,
        ["max_length: the cache on disk has 32, this command has 16", "--force"],
        [ds.data, out],
    )


@case
def extract_force_replaces_an_unreadable_cache(env: Env) -> Expect:
    """The advice an unreadable cache gives (--force) works."""
    ds, preset = _good(env)
    out = env.tmp / "c.h5"
    out.write_bytes(b"garbage, not HDF5")
    assert main(["extract", "--config", str(preset), "--out", str(out), "--quiet"]) == 2
    return Expect(["extract", "--config", str(preset), "--out", str(out), "--force", "--quiet"], 0, [], [ds.data])


# ------------------------------------------------------------------------------------ caches and checkpoints


def _train(env: Env, *extra: str, cache: Path | None = None, out: Path | None = None) -> list[str]:
    return ["train", "--cache", str(cache or env.cache), "--out", str(out or env.tmp / "run"), "--set", "threads=1", "--quiet", *extra]


@case
def train_missing_cache(env: Env) -> Expect:
    return Expect(_train(env, cache=env.tmp / "none.h5"), 2, ["none.h5", "no such cache"])


@case
def train_truncated_cache(env: Env) -> Expect:
    bad = env.tmp / "cut.h5"
    bad.write_bytes(env.cache.read_bytes()[:4096])
    return Expect(_train(env, "--config", "demo", cache=bad), 2, ["cut.h5", "not a readable sppscl cache"], [env.tmp, env.cache.parent])


@case
def train_foreign_hdf5(env: Env) -> Expect:
    import h5py

    bad = env.tmp / "foreign.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = np.arange(3)
    return Expect(_train(env, "--config", "demo", cache=bad), 2, ["foreign.h5", "not a readable sppscl cache"], [env.tmp])


@case
def train_incomplete_cache(env: Env) -> Expect:
    import h5py

    bad = env.tmp / "half.h5"
    bad.write_bytes(env.cache.read_bytes())
    with h5py.File(bad, "r+") as f:
        f.attrs["complete"] = False
    return Expect(_train(env, "--config", "demo", cache=bad), 2, ["half.h5", "did not finish", "sppscl extract"], [env.tmp])


@pytest.mark.parametrize("bad, key", [("lr=nan", "train.lr=nan"), ("lr=inf", "train.lr=inf"), ("alpha=-inf", "train.alpha=-inf"), ("epochs=ten", "epochs"),
                                      ("batch_size=0", "train.batch_size=0"), ("dropout=1.5", "dropout"), ("learning_rate=1", "learning_rate"),
                                      ("encoders.max_length=8", "encoders.max_length"), ("lr", "'lr'")])
def test_train_set_values(bad, key, tiny_cache, tmp_path, capsys):
    """--set values that parse but cannot be used, wrong types, unknown keys, keys of another stage: exit 2 naming the key."""
    code = main(["train", "--cache", str(tiny_cache[0]), "--out", str(tmp_path / "r"), "--set", bad, "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and key in err and "Traceback" not in err + out, err
    assert not (tmp_path / "r").exists()


@case
def train_negative_seed(env: Env) -> Expect:
    return Expect(_train(env, "--seed", "-1"), 2, ["--seed", "greater than or equal to 0"])


@case
def train_unknown_device(env: Env) -> Expect:
    return Expect(_train(env, "--device", "tpu:0"), 2, ["tpu:0"])


@case
def train_cuda_without_cuda(env: Env) -> Expect:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return Expect(_train(env, "--device", "cuda"), 2, ["cuda", "not available"])


@case
def train_out_is_a_file(env: Env) -> Expect:
    (env.tmp / "run").write_text("x")
    return Expect(_train(env), 2, ["run", "is a regular file"], [env.tmp])


@case
def train_out_read_only(env: Env) -> Expect:
    ro = env.tmp / "ro"
    ro.mkdir()
    _unwritable(env, ro)
    return Expect(_train(env, out=ro / "run"), 2, [str(ro), "not writable"], [env.tmp])


@case
def train_into_an_existing_run(env: Env) -> Expect:
    return Expect(_train(env, out=env.run), 2, [str(env.run), "already holds a run", "--resume"], [env.run])


@case
def train_resume_with_a_changed_learning_rate(env: Env) -> Expect:
    return Expect(_train(env, "--resume", "--set", "lr=0.5", out=env.run), 2, ["train.lr", "--resume", "epochs"], [env.run])


@case
def train_resume_nothing_to_resume(env: Env) -> Expect:
    (env.tmp / "empty").mkdir()
    return Expect(_train(env, "--resume", out=env.tmp / "empty"), 2, ["empty", "nothing to resume"])


@case
def train_full_disk_while_checkpointing(env: Env) -> Expect:
    """ENOSPC at the second epoch's checkpoint: exit 1 naming the file and the bytes it needs; --resume then
    finishes with the weights an uninterrupted run has."""
    import builtins

    out = env.tmp / "run"
    calls = {"n": 0}

    def full_open(path, mode="r", *a, **k):
        fh = builtins.open(path, mode, *a, **k)
        if mode[0] in "wx" and str(path).endswith(".safetensors.tmp"):
            calls["n"] += 1
            if calls["n"] >= 3:  # epoch 1 writes best and last; epoch 2's first checkpoint fails
                fh.close()
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return fh

    env.monkeypatch.setattr("sppscl.outputs.open", full_open, raising=False)
    argv = _train(env, "--set", "epochs=3", out=out)

    def after():
        env.monkeypatch.undo()
        assert not list(out.glob("*.tmp")), "a stray temporary file was left behind"
        assert main([*argv, "--resume"]) == 0
        clean = env.tmp / "clean"
        assert main(_train(env, "--set", "epochs=3", out=clean)) == 0
        assert _weights(out / "last.safetensors") == _weights(clean / "last.safetensors")
        strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "epoch_seconds"} for x in p.read_text().splitlines()]  # noqa: E731
        assert strip(out / "metrics.jsonl") == strip(clean / "metrics.jsonl")

    return Expect(argv, 1, [".safetensors", "no space left", "needs about", "--resume"], [env.cache.parent], after)


@case
def evaluate_missing_checkpoint(env: Env) -> Expect:
    return Expect(["evaluate", "--checkpoint", str(env.tmp / "nope.safetensors"), "--cache", str(env.cache)], 2, ["nope.safetensors", "no such checkpoint"])


@case
def evaluate_truncated_checkpoint(env: Env) -> Expect:
    cut = env.tmp / "cut.safetensors"
    cut.write_bytes((env.run / "best.safetensors").read_bytes()[:200])
    return Expect(["evaluate", "--checkpoint", str(cut), "--cache", str(env.cache)], 2, ["cut.safetensors", "not a readable"], [env.tmp, env.run])


@case
def evaluate_foreign_checkpoint(env: Env) -> Expect:
    from safetensors.torch import save_file
    import torch

    foreign = env.tmp / "other.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    return Expect(["evaluate", "--checkpoint", str(foreign), "--cache", str(env.cache)], 2, ["other.safetensors", "not an sppscl checkpoint"], [env.tmp])


@case
def evaluate_unknown_split(env: Env) -> Expect:
    return Expect(["evaluate", "--checkpoint", str(env.run / "best.safetensors"), "--cache", str(env.cache), "--split", "holdout"], 2, ["holdout", "splits: "], [env.run])


@case
def evaluate_cache_of_other_encoders(env: Env) -> Expect:
    """The message says which side has which value (it had them swapped)."""
    return Expect(
        ["evaluate", "--checkpoint", str(env.run / "best.safetensors"), "--cache", str(other_cache(env))],
        2,
        ["max_length: this cache has 16, the checkpoint's cache has 32"],
        [env.run],
    )


@case
def evaluate_out_under_a_file(env: Env) -> Expect:
    (env.tmp / "afile").write_text("x")
    return Expect(
        ["evaluate", "--checkpoint", str(env.run / "best.safetensors"), "--cache", str(env.cache), "--out", str(env.tmp / "afile" / "res")],
        2,
        ["afile", "not a folder"],
        [env.tmp, env.run],
    )


@case
def probe_single_class_train(env: Env) -> Expect:
    from sppscl.stage1.synthetic import generate

    data = env.tmp / "data"
    generate(data, 30, seed=2)
    lines = [ln for ln in (data / "train.jsonl").read_text().splitlines() if json.loads(ln)["label"] == 1]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(data, size=30)
    cfg.dataset.format = "manifest"
    from sppscl.stage1.extract import extract

    one = env.tmp / "one.h5"
    extract(cfg, one, progress=False)
    return Expect(["probe", "--cache", str(one)], 2, ["one.h5", "'train'", "single class"], [env.tmp])


@case
def probe_unknown_modality(env: Env) -> Expect:
    return Expect(["probe", "--cache", str(env.cache), "--modalities", "audio"], 2, ["--modalities", "audio"])


@case
def sweep_grid_without_values(env: Env) -> Expect:
    return Expect(["sweep", "--cache", str(env.cache), "--grid", "lr=", "--out", str(env.tmp / "s"), "--quiet"], 2, ["--grid", "lr"])


@case
def sweep_grid_with_nan(env: Env) -> Expect:
    return Expect(["sweep", "--cache", str(env.cache), "--grid", "lr=1e-3,nan", "--out", str(env.tmp / "s"), "--quiet"], 2, ["lr", "nan"])


@case
def sweep_zero_jobs(env: Env) -> Expect:
    return Expect(["sweep", "--cache", str(env.cache), "--grid", "lr=1e-3", "--jobs", "0", "--out", str(env.tmp / "s")], 2, ["--jobs"])


@case
def sweep_missing_cache(env: Env) -> Expect:
    return Expect(["sweep", "--cache", str(env.tmp / "gone.h5"), "--grid", "lr=1e-3", "--out", str(env.tmp / "s")], 2, ["gone.h5"])


@case
def predict_batch_size_zero(env: Env) -> Expect:
    return Expect(["predict", "--checkpoint", str(env.run / "best.safetensors"), "--image", "x.jpg", "--text", "hi", "--batch-size", "0"], 2, ["--batch-size"])


@case
def predict_malformed_input_row(env: Env) -> Expect:
    (env.tmp / "in.jsonl").write_text('{"text": "ok", "image": "a.jpg"}\n{"text": \n')
    (env.tmp / "a.jpg").write_bytes(jpeg())
    return Expect(["predict", "--checkpoint", str(env.run / "best.safetensors"), "--input", str(env.tmp / "in.jsonl"), "--quiet"], 2, ["in.jsonl", "line 2", "JSON"], [env.tmp])


@case
def predict_unencodable_text(env: Env) -> Expect:
    (env.tmp / "in.jsonl").write_text('{"id": "s1", "text": "bad \\ud800", "image": "a.jpg"}\n')
    (env.tmp / "a.jpg").write_bytes(jpeg())
    return Expect(["predict", "--checkpoint", str(env.run / "best.safetensors"), "--input", str(env.tmp / "in.jsonl"), "--quiet"], 2, ["in.jsonl", "s1"], [env.tmp])


@case
def predict_output_unwritable(env: Env) -> Expect:
    (env.tmp / "a.jpg").write_bytes(jpeg())
    (env.tmp / "afile").write_text("x")
    return Expect(
        ["predict", "--checkpoint", str(env.run / "best.safetensors"), "--image", str(env.tmp / "a.jpg"), "--text", "hi", "--out", str(env.tmp / "afile" / "p.csv")],
        2,
        ["afile", "not a folder"],
        [env.tmp],
    )


@case
def predict_output_full_disk_keeps_the_old_file(env: Env) -> Expect:
    import builtins

    (env.tmp / "a.jpg").write_bytes(jpeg())
    old = env.tmp / "p.csv"
    old.write_text("previous predictions\n")

    def full_open(path, mode="r", *a, **k):
        if mode[0] in "wx":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return builtins.open(path, mode, *a, **k)

    env.monkeypatch.setattr("sppscl.outputs.open", full_open, raising=False)
    return Expect(
        ["predict", "--checkpoint", str(env.run / "best.safetensors"), "--image", str(env.tmp / "a.jpg"), "--text", "hi", "--out", str(old)],
        1,
        ["p.csv", "no space left"],
        [env.tmp],
        lambda: None if not list(env.tmp.glob("*.tmp")) else pytest.fail("stray temporary file"),
    )


# ------------------------------------------------------------------------------------ rows added with their fixes


@case
def train_cache_missing_a_dataset(env: Env) -> Expect:
    import h5py

    bad = env.tmp / "holed.h5"
    bad.write_bytes(env.cache.read_bytes())
    with h5py.File(bad, "r+") as f:
        del f["splits/dev/labels"]
    return Expect(_train(env, "--config", "demo", cache=bad), 2, ["holed.h5", "splits/dev/labels: missing", "--force"], [env.tmp])


@case
def train_cache_with_foreign_provenance(env: Env) -> Expect:
    import h5py

    bad = env.tmp / "odd.h5"
    bad.write_bytes(env.cache.read_bytes())
    with h5py.File(bad, "r+") as f:
        f.attrs["provenance"] = json.dumps({"something": "else"})
    return Expect(_train(env, "--config", "demo", cache=bad), 2, ["odd.h5", "not a complete sppscl cache"], [env.tmp])


@case
def extract_bad_pixel_limit_variable(env: Env) -> Expect:
    ds, preset = _good(env)
    env.monkeypatch.setenv("SPPSCL_MAX_IMAGE_PIXELS", "lots")
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "c.h5"), "--quiet"], 2, ["SPPSCL_MAX_IMAGE_PIXELS", "'lots'"], [ds.data])


@case
def verify_pixel_limit_from_the_environment(env: Env) -> Expect:
    """The documented knob works: a lower limit refuses the dataset's ordinary 40x30 images, naming it."""
    ds, preset = _good(env)
    env.monkeypatch.setenv("SPPSCL_MAX_IMAGE_PIXELS", "1000")
    return Expect(["data", "verify", "--config", str(preset)], 1, ["oversized image", "40x30", "limit of 0.0", "SPPSCL_MAX_IMAGE_PIXELS"], [ds.data])


def _mvsa_escape(ds: Dataset) -> None:
    """Raw MVSA reads data/<id>.txt: an id climbing out of data/ must not read the file it points at."""
    (ds.data / "data").mkdir(parents=True, exist_ok=True)
    (ds.root / "outside").mkdir(exist_ok=True)
    (ds.root / "outside" / "secret.txt").write_text("a secret")
    (ds.root / "outside" / "secret.jpg").write_bytes(jpeg(3))
    lines = ["ID\ttext,image"] + [f"{i}\tpositive,positive" for i in range(1, 6)] + ["../../outside/secret\tnegative,negative"]
    (ds.data / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    for i in range(1, 6):
        (ds.data / "data" / f"{i}.txt").write_text(f"post {i}")
        (ds.data / "data" / f"{i}.jpg").write_bytes(jpeg(i))


@case
def verify_mvsa_path_escaping_id(env: Env) -> Expect:
    ds = env.dataset()
    preset = ds.write()
    _mvsa_escape(ds)
    cfg = yaml.safe_load(preset.read_text())
    cfg["dataset"].update(format="mvsa-raw", splits={})
    preset.write_text(yaml.safe_dump(cfg))
    opened = []
    real = Path.read_bytes
    env.monkeypatch.setattr(Path, "read_bytes", lambda p: opened.append(str(p)) or real(p))

    def after():
        assert not [p for p in opened if "secret" in p], opened

    return Expect(["data", "verify", "--config", str(preset)], 1, ["../../outside/secret", "outside the image folder"], [ds.data], after)


# ------------------------------------------------------------------------------------ issue 17: hostile files and outputs


def _need_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mknod); run the suite as root to cover it")


def _occupy(env: Env, kind: str, name: str) -> tuple[Path, Callable[[], None]]:
    """``env.tmp/name`` made into ``kind`` (a FIFO, a character device, a socket, a symbolic link to a file outside
    the command's outputs, a folder); returns it and a check that it is still exactly that after the command."""
    import os
    import socket
    import stat

    p = env.tmp / name
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "chardev":
        _need_root("a device node")
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "symlink":
        victim = env.tmp / "victim" / "precious.txt"
        victim.parent.mkdir(exist_ok=True)
        victim.write_text("not yours\n")
        p.symlink_to(victim)
    elif kind == "folder":
        p.mkdir()
        (p / "keep.txt").write_text("mine\n")
    elif kind == "dangling":
        p.symlink_to(env.tmp / "nowhere" / "x")  # writing through it would create a file wherever it points
    mode = os.lstat(p).st_mode

    def still() -> None:
        assert os.lstat(p).st_mode == mode, f"{p} was replaced"
        if kind == "symlink":
            assert (env.tmp / "victim" / "precious.txt").read_text() == "not yours\n"
        if kind == "folder":
            assert sorted(x.name for x in p.iterdir()) == ["keep.txt"], "the folder was written into"

    return p, still


HOSTILE = {"fifo": "FIFO", "chardev": "character device", "socket": "socket", "symlink": "symbolic link", "folder": "folder", "dangling": "symbolic link"}


def _output_cases(command: str, build: Callable[[Env, Path], list[str]], kinds=tuple(HOSTILE), name: str = "out.h5", code: int = 2):
    for kind in kinds:

        def make(env: Env, kind=kind) -> Expect:
            target, still = _occupy(env, kind, name)
            return Expect(build(env, target), code, [str(target), HOSTILE[kind], "refusing"], [env.tmp], still)

        CASES[f"out17_{command}_{kind}"] = make


def _extract_argv(env: Env, target: Path) -> list[str]:
    ds, preset = _good(env)
    return ["extract", "--config", str(preset), "--out", str(target), "--force", "--quiet"]


# --force included: only a regular file is ever replaced
_output_cases("extract_force", _extract_argv, kinds=("fifo", "chardev", "socket", "symlink"))
_output_cases("merge_force", lambda env, t: ["cache", "merge", str(env.cache), str(env.cache), "--out", str(t), "--force", "--quiet"])
_output_cases("train", lambda env, t: _train(env, out=t), kinds=("fifo", "chardev", "socket", "symlink"), name="run")


def _predict_argv(env: Env, target: Path) -> list[str]:
    (env.tmp / "a.jpg").write_bytes(jpeg())
    return ["predict", "--checkpoint", str(env.run / "best.safetensors"), "--image", str(env.tmp / "a.jpg"), "--text", "hi", "--out", str(target)]


def _evaluate_argv(env: Env, target: Path) -> list[str]:
    return ["evaluate", "--checkpoint", str(env.run), "--cache", str(env.cache), "--out", str(target)]


_output_cases("predict", _predict_argv, kinds=("fifo", "chardev", "socket", "symlink", "folder"), name="p.csv")
_output_cases("evaluate_json", _evaluate_argv, kinds=("fifo", "symlink", "folder"), name="r.json")
_output_cases("evaluate_folder", _evaluate_argv, kinds=("fifo", "symlink"), name="results")

# every other command's --out, file or folder: refused before any work, with what is there (regression rows)
_output_cases("predict_dangling", _predict_argv, kinds=("dangling",), name="p.csv")
_output_cases("report", lambda env, t: ["report", str(env.run), "--out", str(t)], kinds=("fifo", "folder", "dangling"), name="r.html")
_output_cases("probe_json", lambda env, t: ["probe", "--cache", str(env.cache), "--out", str(t)], kinds=("fifo", "folder", "dangling"), name="p.json")
_output_cases("ensemble", lambda env, t: ["ensemble", str(env.run), "--cache", str(env.cache), "--out", str(t)], kinds=("fifo", "dangling"), name="ens")
_output_cases("analyze", lambda env, t: ["analyze", "--checkpoint", str(env.run), "--cache", str(env.cache), "--out", str(t)], kinds=("fifo",), name="an")
_output_cases("sweep_summary", lambda env, t: ["sweep", "summary", "--out", str(t)], kinds=("fifo", "dangling"), name="sweep")
for _cmd, _argv in (("sweep", ["sweep", "--grid", "fusion=batch"]), ("cv", ["cv", "--folds", "2"]), ("reproduce", ["reproduce", "table7"])):
    _output_cases(_cmd, lambda env, t, a=_argv: [*a, "--cache", str(env.cache), "--seeds", "1", "--out", str(t), "--quiet"], kinds=("fifo", "dangling"), name="folder")


def _probe_record_beside(env: Env, kind: str) -> tuple[Path, Path]:
    import os
    import shutil

    cache = env.tmp / "c.h5"
    shutil.copy(env.cache, cache)
    record = env.tmp / "c.probe.json"
    if kind == "fifo":
        os.mkfifo(record)
    else:
        record.write_text("[" * 100_000 + "]" * 100_000)
    return cache, record


@case
def train17_probe_record_beside_the_cache_is_a_fifo(env: Env) -> Expect:
    """train reads <cache>.probe.json for its reference line: a FIFO there blocked train for ever; now it is no record."""
    cache, record = _probe_record_beside(env, "fifo")
    return Expect(_train(env, "--set", "epochs=1", cache=cache), 0, ["model card"], [env.tmp],
                  lambda: None if record.is_fifo() else pytest.fail("the FIFO was replaced"))


@case
def train17_probe_record_nested_100000_deep(env: Env) -> Expect:
    cache, _ = _probe_record_beside(env, "deep")
    return Expect(_train(env, "--set", "epochs=1", cache=cache), 0, ["model card"], [env.tmp])


@case
def report17_results_json_nested_100000_deep(env: Env) -> Expect:
    import shutil

    run = env.tmp / "run"
    shutil.copytree(env.run, run)
    (run / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    return Expect(["report", str(run), "--out", str(env.tmp / "r.html")], 2, ["run", "nested too deeply"], [env.tmp])


@case
def predict_input_row_100000_deep(env: Env) -> Expect:
    pairs = env.tmp / "pairs.jsonl"
    pairs.write_bytes(b'{"id": "p1", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b', "image": "a.jpg"}\n')
    return Expect(["predict", "--checkpoint", str(env.run), "--input", str(pairs)], 2, ["pairs.jsonl", "line 1", "nested too deeply"], [env.tmp])


@case
def out17_predict_to_a_link_to_standard_output(env: Env) -> Expect:
    """A link to /proc/self/fd/1 is a link: refused (predict --out - is the way to write to standard output)."""
    link = env.tmp / "p.csv"
    link.symlink_to("/proc/self/fd/1")
    return Expect(_predict_argv(env, link), 2, [str(link), "symbolic link to /proc/self/fd/1"], [env.tmp])


@case
def out17_demo_never_replaces_a_folder_of_other_files(env: Env) -> Expect:
    target, still = _occupy(env, "folder", "home")
    return Expect(["demo", "--out", str(target), "--cache", str(env.tmp / "demo.h5")], 2, [str(target), "holding other files"], [env.tmp], still)


@case
def out17_checkpoint_convert_onto_a_fifo(env: Env) -> Expect:
    import os

    import torch

    legacy = env.tmp / "best.pt"
    torch.save({"format": "sppscl-checkpoint", "version": 1, "epoch": 0, "best": {"epoch": 0}}, legacy)
    os.mkfifo(env.tmp / "conv.json")
    return Expect(["checkpoint", "convert", str(legacy), "--out", str(env.tmp / "conv")], 2, ["conv.json", "FIFO"], [env.tmp],
                  lambda: None if not (env.tmp / "conv.safetensors").exists() else pytest.fail("weights written beside a refused name"))


@case
def out17_merge_into_a_folder_does_no_work(env: Env) -> Expect:
    """merge --out DIR --force ran the whole merge, then failed and left DIR.merging behind."""
    (env.tmp / "dir").mkdir()

    def after() -> None:
        assert sorted(p.name for p in env.tmp.iterdir()) == ["dir"], list(env.tmp.iterdir())

    return Expect(["cache", "merge", str(env.cache), str(env.cache), "--out", str(env.tmp / "dir"), "--force"], 2, ["dir", "is a folder"], [env.tmp], after)


@case
def out17_train_into_a_folder_of_other_files(env: Env) -> Expect:
    target, still = _occupy(env, "folder", "notes")
    return Expect(_train(env, out=target), 2, [str(target), "holding other files", "keep.txt"], [env.tmp], still)


@case
def out17_lock_planted_as_a_link(env: Env) -> Expect:
    """A link at the cache's lock name would have its target truncated by the lock's pid record."""
    ds, preset = _good(env)
    link, still = _occupy(env, "symlink", "c.h5.lock")
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "c.h5"), "--quiet"], 2, [str(link), "symbolic link"], [env.tmp], still)


@case
def out17_partial_planted_as_a_link(env: Env) -> Expect:
    ds, preset = _good(env)
    link, still = _occupy(env, "symlink", "c.h5.partial")
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "c.h5"), "--quiet"], 2, [str(link), "symbolic link"], [env.tmp], still)


@case
def out17_results_file_planted_as_a_fifo_in_a_run(env: Env) -> Expect:
    """A file a command writes inside its own folder gets the same check (here: train's results.json)."""
    import os

    run = env.tmp / "run"
    run.mkdir()
    os.mkfifo(run / "config.json")
    return Expect(_train(env, out=run), 2, ["config.json", "FIFO"], [env.tmp])



# crafted caches: each violation of the cache's own header is one line naming the file and the field (exit 2)


def _tampered(name: str, change: Callable, names: list[str]):
    def make(env: Env) -> Expect:
        import h5py

        bad = env.tmp / "crafted.h5"
        bad.write_bytes(env.cache.read_bytes())
        with h5py.File(bad, "r+") as f:
            change(f)
        return Expect(_train(env, "--config", "demo", cache=bad), 2, ["crafted.h5", *names], [env.tmp])

    CASES[f"cache17_{name}"] = make


def _replace(key: str, fn: Callable[[np.ndarray], np.ndarray]):
    def change(f) -> None:
        a = fn(f[key][()])
        del f[key]
        f.create_dataset(key, data=a)

    return change


def _attr(key: str, value):
    return lambda f: f.attrs.__setitem__(key, value)


def _set_at(key: str, index: int, value):
    def change(f) -> None:
        f[key][index] = value

    return change


_tampered("status_shorter_than_rows", _replace("splits/train/status", lambda a: a[:-2]), ["splits/train/status", "shape"])
_tampered("complete_with_pending_rows", _set_at("splits/train/status", 3, 0), ["splits/train/status", "never written"])
_tampered("status_value_unknown", _set_at("splits/dev/status", 0, 9), ["splits/dev/status", "status 9"])
_tampered("tokens_stored_as_int8", _replace("splits/train/tokens", lambda a: a.astype(np.int8)), ["splits/train/tokens", "dtype int8"])
_tampered("image_stored_as_int64", _replace("splits/dev/image", lambda a: a.astype(np.int64)), ["splits/dev/image", "dtype int64"])
_tampered("labels_shorter_than_rows", _replace("splits/train/labels", lambda a: a[:-1]), ["splits/train/labels", "shape"])
_tampered("image_shorter_than_rows", _replace("splits/dev/image", lambda a: a[:-1]), ["splits/dev/image", "rows"])
_tampered("ids_shorter_than_rows", _replace("splits/test/ids", lambda a: a[:-1]), ["splits/test/", "shape"])
_tampered("tokens_shorter_than_offsets", _replace("splits/train/tokens", lambda a: a[:-3]), ["splits/train/offsets", "tokens holds"])
_tampered("offsets_decreasing", _replace("splits/train/offsets", lambda a: a[[0, 2, 1, *range(3, len(a))]]), ["splits/train/offsets", "non-decreasing"])
_tampered("offsets_negative", _set_at("splits/dev/offsets", 0, -4), ["splits/dev/offsets", "starting at 0"])
_tampered("label_of_7", _set_at("splits/train/labels", 2, 7), ["splits/train/labels", "label 7", "0..2"])
_tampered("dev_label_of_minus_3", _set_at("splits/dev/labels", 1, -3), ["splits/dev/labels", "label -3"])
_tampered("provenance_not_json", _attr("provenance", "{not json"), ["field provenance", "not valid JSON"])
_tampered("provenance_100000_deep", _attr("provenance", "[" * 100_000 + "]" * 100_000), ["field provenance", "nests deeper"])
_tampered("provenance_a_list", _attr("provenance", "[1, 2]"), ["field provenance", "not an object"])
_tampered("provenance_without_classes", _attr("provenance", json.dumps({"dataset": {"name": "x"}})), ["provenance names no dataset classes"])
_tampered("provenance_one_class", _attr("provenance", json.dumps({"dataset": {"name": "x", "classes": ["a"]}})), ["provenance.dataset.classes", "['a']"])
_tampered("provenance_shard_not_a_record", _attr("provenance", json.dumps({"shard": 5})), ["provenance.shard"])
_tampered("schema_version_from_the_future", _attr("schema_version", 99), ["schema_version is 99"])


def _special_cache(kind: str):
    def make(env: Env) -> Expect:
        target, still = _occupy(env, kind, "cache.h5")
        return Expect(_train(env, "--config", "demo", cache=target), 2, [str(target), HOSTILE[kind], "not a feature cache"], [env.tmp], still)

    CASES[f"cache17_special_{kind}"] = make


# train --cache FIFO blocked in the HDF5 open for ever
for _kind in ("fifo", "chardev", "folder"):
    _special_cache(_kind)


# inputs that are not files: each named as what it is, never opened (a FIFO would block the read), exit 2
def _special_input(name: str, kind: str, place: Callable[[Env, Dataset, Path, Path], tuple[list[str], Path]], words: list[str]):
    """``place(env, ds, preset, tmp)`` returns the argv and the path to turn into ``kind`` (after the dataset is
    written, so a FIFO or socket takes a file's place)."""

    def make(env: Env) -> Expect:
        import os
        import shutil

        ds, preset = _good(env)
        argv, target = place(env, ds, preset, env.tmp)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
        made, still = _occupy(env, kind, str(target.relative_to(env.tmp)))
        return Expect(argv, 2, [str(made), HOSTILE[kind], *words], [env.tmp], still)

    CASES[f"input_{name}_{kind}"] = make


def _verify(env, ds, preset, tmp):
    return ["data", "verify", "--config", str(preset), "--workers", "1"]


def _extract(env, ds, preset, tmp):
    return ["extract", "--config", str(preset), "--out", str(tmp / "c.h5"), "--quiet"]


for _kind in ("fifo", "socket", "folder"):
    _special_input("split_file_verify", _kind, lambda e, d, p, t: (_verify(e, d, p, t), d.data / "train.jsonl"), ["'train' split file", "not opened"])
    _special_input("split_file_extract", _kind, lambda e, d, p, t: (_extract(e, d, p, t), d.data / "dev.jsonl"), ["'dev' split file", "not opened"])
for _kind in ("fifo", "socket"):
    _special_input("data_folder", _kind, lambda e, d, p, t: (_verify(e, d, p, t), d.data), ["not a data folder"])
    _special_input("config_yaml", _kind, lambda e, d, p, t: (_verify(e, d, t / "preset.yaml", t), t / "preset.yaml"), ["not a YAML configuration"])
    _special_input("image_encoder_file", _kind, lambda e, d, p, t: (_extract(e, d, p, t) + ["--image-encoder", str(t / "w.pth")], t / "w.pth"),
                   ["not an image encoder weights file"])
    _special_input("text_encoder_folder", _kind, lambda e, d, p, t: (_extract(e, d, p, t) + ["--text-encoder", str(t / "bert")], t / "bert"),
                   ["not a text encoder folder"])
    _special_input("predict_image", _kind, lambda e, d, p, t: (["predict", "--checkpoint", str(e.run), "--image", str(t / "a.jpg"), "--text", "hi"], t / "a.jpg"),
                   ["pair", "not an image file"])
    _special_input("merge_shard", _kind, lambda e, d, p, t: (["cache", "merge", str(t / "s0.h5"), str(e.cache), "--out", str(t / "m.h5")], t / "s0.h5"),
                   ["not a shard file"])
    _special_input("predict_input", _kind, lambda e, d, p, t: (["predict", "--checkpoint", str(e.run), "--input", str(t / "pairs.jsonl")], t / "pairs.jsonl"),
                   ["not a .jsonl or .csv file of pairs"])


# images: the stored size and the size the encoders resize to are both within the pixel budget
def _thin_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 20000)).save(buf, format="PNG")
    return buf.getvalue()


verify_and_extract("thin_png", _image("images/train1.jpg", _thin_png()), ["train1", "1x20000", "256x5120000", "megapixels"])


def _special_image(kind: str):
    def mutate(ds: Dataset) -> None:
        import os

        p = ds.data / "images" / "train2.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.missing.add("images/train2.jpg")
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "folder":
            p.mkdir()
        elif kind == "loop":
            p.symlink_to(p.name)

    return mutate


verify_and_extract("image_is_a_fifo", _special_image("fifo"), ["train2", "FIFO", "not an image file"])
verify_and_extract("image_is_a_folder", _special_image("folder"), ["train2", "is a folder", "not an image file"])
verify_and_extract("image_is_a_link_loop", _special_image("loop"), ["train2", "symbolic links"])


@case
def verify_counts_images_that_links_lead_outside(env: Env) -> Expect:
    """A dataset folder that is a farm of links is fine; verify says how many images really live outside it."""
    ds = env.dataset()
    preset = ds.write()
    outside = env.tmp / "elsewhere"
    outside.mkdir()
    for rel in ("images/train0.jpg", "images/dev1.jpg"):
        target = outside / Path(rel).name
        (ds.data / rel).rename(target)
        (ds.data / rel).symlink_to(target)
    return Expect(["data", "verify", "--config", str(preset), "--workers", "1"], 0, ["2 images resolve", "outside the dataset folder", str(outside)], [ds.data, outside])


# YAML: a bounded loader, and no error renders an unbounded value
def _preset_text(env: Env, text: str) -> Path:
    p = env.tmp / "hostile.yaml"
    p.write_text(text)
    return p


_BOMB = "train:\n  lr: &a [&b [&c [&d [&e [&f [&g [x, x, x, x, x, x, x, x, x], *g, *g, *g, *g, *g, *g, *g, *g], *f, *f, *f, *f, *f, *f, *f, *f], *e, *e, *e, *e, *e, *e, *e, *e], *d, *d, *d, *d, *d, *d, *d, *d], *c, *c, *c, *c, *c, *c, *c, *c], *b, *b, *b, *b, *b, *b, *b, *b]\n"


@case
def yaml17_anchor_bomb(env: Env) -> Expect:
    return Expect(_train(env, "--config", str(_preset_text(env, _BOMB))), 2, ["hostile.yaml", "line 2", "aliases"], [env.tmp])


@case
def yaml17_nested_100000_deep(env: Env) -> Expect:
    return Expect(_train(env, "--config", str(_preset_text(env, "train:\n  lr: " + "[" * 100_000 + "]" * 100_000 + "\n"))), 2, ["hostile.yaml", "nested too deeply"], [env.tmp])


@case
def yaml17_huge_value_is_echoed_short(env: Env) -> Expect:
    return Expect(_train(env, "--config", str(_preset_text(env, "train:\n  lr: '" + "9" * 200_000 + "x'\n"))), 2, ["train.lr", "(200003 characters)"], [env.tmp])


@case
def yaml17_config_is_a_fifo(env: Env) -> Expect:
    target, still = _occupy(env, "fifo", "preset.yaml")
    return Expect(_train(env, "--config", str(target)), 2, [str(target), "FIFO", "not a YAML configuration"], [env.tmp], still)



@case
def yaml17_integer_longer_than_python_converts(env: Env) -> Expect:
    """A 5000-digit integer made PyYAML's int() raise: an internal error."""
    return Expect(_train(env, "--config", str(_preset_text(env, "train:\n  epochs: " + "9" * 5000 + "\n"))), 2, ["hostile.yaml", "line 2", "5000 characters"], [env.tmp])


@case
def yaml17_integer_no_record_can_hold(env: Env) -> Expect:
    """extract.batch_size: 1e23 as an integer passed validation and crashed writing the cache's HDF5 attributes."""
    ds = env.dataset()
    preset = ds.write()
    preset.write_text(preset.read_text().replace("batch_size: 4", "batch_size: " + "9" * 23))
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "c.h5"), "--quiet"], 2, ["extract.batch_size", "2^53"], [env.tmp],
                  _nothing_created(env, "c.h5"))


@case
def ckpt17_checkpoint_named_without_suffix_is_a_fifo(env: Env) -> Expect:
    """A FIFO given as --checkpoint NAME was reported as 'NAME.safetensors: no such checkpoint'."""
    target, still = _occupy(env, "fifo", "model")
    return Expect(["evaluate", "--checkpoint", str(target), "--cache", str(env.cache)], 2, [str(target), "FIFO", "not a checkpoint file"], [env.tmp], still)


@case
def report17_path_is_a_fifo(env: Env) -> Expect:
    target, still = _occupy(env, "fifo", "runs")
    return Expect(["report", str(target), "--out", str(env.tmp / "r.html")], 2, [str(target), "FIFO", "not a run, sweep, cv or reproduce folder"], [env.tmp], still)


def _bomb(fmt: str, w: int, h: int) -> bytes:
    """A tiny GIF, TIFF or WebP file whose header claims ``w`` x ``h`` pixels (the image data is one pixel)."""
    buf = io.BytesIO()
    if fmt == "GIF":
        Image.new("P", (1, 1)).save(buf, format="GIF")
        d = bytearray(buf.getvalue())
        d[6:10] = struct.pack("<HH", w, h)  # logical screen
        i = d.index(b",")  # image descriptor
        d[i + 5 : i + 9] = struct.pack("<HH", w, h)
    elif fmt == "TIFF":
        Image.new("L", (1, 1)).save(buf, format="TIFF")
        d = bytearray(buf.getvalue())
        ifd = struct.unpack("<I", d[4:8])[0]
        for k in range(struct.unpack("<H", d[ifd : ifd + 2])[0]):
            at = ifd + 2 + 12 * k
            tag, typ = struct.unpack("<HH", d[at : at + 4])
            if tag in (256, 257):  # ImageWidth, ImageLength
                v = w if tag == 256 else h
                d[at + 8 : at + 12] = struct.pack("<I", v) if typ == 4 else struct.pack("<HH", v, 0)
    else:
        Image.new("RGB", (1, 1)).save(buf, format="WEBP", lossless=True)
        d = bytearray(buf.getvalue())
        i = d.index(b"VP8L") + 8  # signature byte, then 14-bit width-1, 14-bit height-1, alpha and version bits
        bits = struct.unpack("<I", d[i + 1 : i + 5])[0] & ~((1 << 28) - 1)
        d[i + 1 : i + 5] = struct.pack("<I", bits | (w - 1) | ((h - 1) << 14))
    assert Image.open(io.BytesIO(bytes(d))).size == (w, h)
    return bytes(d)


# decompression bombs in other formats than PNG: the header's size (stored, and after the resize) decides, before decoding
for _fmt, _size, _needle in (("GIF", (65535, 65535), "4294.8 megapixels"), ("GIF", (1, 20000), "256x5120000"), ("TIFF", (60000, 60000), "3600.0 megapixels"),
                             ("TIFF", (20000, 1), "5120000x256"), ("WEBP", (16384, 16384), "268.4 megapixels"), ("WEBP", (1, 16384), "256x4194304")):
    CASES[f"verify17_bomb_{_fmt.lower()}_{_size[0]}x{_size[1]}"] = (
        lambda env, f=_fmt, sz=_size, n=_needle: (lambda ds: (ds.images.__setitem__("images/dev1.jpg", _bomb(f, *sz)),
        Expect(["data", "verify", "--config", str(ds.write()), "--workers", "1"], 1, ["dev1", "oversized image", n], [ds.data]))[1])(env.dataset())
    )


# crafted checkpoints: each violation of the checkpoint's own header is one line naming the file and the field (exit 2)


def _crafted(name: str, change: Callable[[dict, dict], str | None], names: list[str]):
    def make(env: Env) -> Expect:
        bad = craft_checkpoint(env.run / "best.safetensors", env.tmp / "crafted.safetensors", change)
        res = env.tmp / "res"

        def after() -> None:
            assert not res.exists(), "results were written for a refused checkpoint"

        return Expect(["evaluate", "--checkpoint", str(bad), "--cache", str(env.cache), "--out", str(res)], 2, ["crafted.safetensors", *names], [env.tmp], after)

    CASES[f"ckpt17_{name}"] = make


def _first_weight(meta: dict) -> str:
    return sorted(meta["model"])[0]


def _reshape(meta: dict, tensors: dict) -> None:
    import torch

    key = meta["model"][_first_weight(meta)]["__tensor__"]
    tensors[key] = torch.zeros(*[d + 1 for d in tensors[key].shape])


def _set_meta(path: str, value):
    def change(meta: dict, tensors: dict) -> None:
        *parents, last = path.split(".")
        d = meta
        for k in parents:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value

    return change


_crafted("tensor_of_the_wrong_shape", _reshape, ["field model.", "shape"])
_crafted("dims_that_do_not_match_the_weights", _set_meta("dims.text_hidden", 7), ["field model.", "dims and config give"])
_crafted("two_class_names_for_three_classes", _set_meta("classes", ["positive", "neutral"]), ["field classes", "2 names", "num_classes is 3"])
_crafted("classes_unlike_its_caches", _set_meta("classes", ["negative", "neutral", "positive"]), ["field cache_provenance.dataset.classes"])
_crafted("json_100000_deep", lambda m, t: "[" * 100_000 + "]" * 100_000, ["field metadata", "nests deeper"])
_crafted("metadata_not_json", lambda m, t: "{oops", ["field metadata", "not valid JSON"])
_crafted("model_is_5", _set_meta("model", 5), ["field model", "5"])
_crafted("no_cache_provenance", _set_meta("cache_provenance", KeyError), ["field cache_provenance", "missing"])
_crafted("eval_batch_size_0", _set_meta("config.train.eval_batch_size", 0), ["field config", "eval_batch_size"])
_crafted("stored_config_of_the_wrong_type", _set_meta("config.train.lr", "fast"), ["field config", "train.lr", "'fast'"])
_crafted("dims_negative", _set_meta("dims.num_classes", -3), ["field dims.num_classes", "-3"])
_crafted("weights_as_integers", lambda m, t: t.__setitem__(m["model"][_first_weight(m)]["__tensor__"], t[m["model"][_first_weight(m)]["__tensor__"]].to(__import__("torch").int8)), ["field model.", "int8"])
_crafted("malformed_items", _set_meta("best", {"__items__": [[1, 2, 3]]}), ["damaged checkpoint metadata"])


@case
def ckpt17_checkpoint_is_a_fifo(env: Env) -> Expect:
    target, still = _occupy(env, "fifo", "best.safetensors")
    return Expect(["evaluate", "--checkpoint", str(target), "--cache", str(env.cache)], 2, [str(target), "FIFO", "not a checkpoint file"], [env.tmp], still)


@case
def ckpt17_malicious_pickle_as_image_encoder(env: Env) -> Expect:
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(env.tmp / "pwned"),))

    torch.save({"x": Evil()}, env.tmp / "evil.pth")
    ds, preset = _good(env)

    def after() -> None:
        assert not (env.tmp / "pwned").exists()

    return Expect(["extract", "--config", str(preset), "--image-encoder", str(env.tmp / "evil.pth"), "--out", str(env.tmp / "c.h5"), "--quiet"],
                  2, ["evil.pth", "refused to load", "could run code"], [env.tmp], after)




@case
def verify17_control_characters_in_an_id_are_shown_escaped(env: Env) -> Expect:
    """An id holding a terminal escape sequence reaches the console escaped, never raw."""
    ds = env.dataset()
    ds.splits["train"][0]["id"] = "evil\x1b[2J\x1b[31mid"
    ds.splits["train"][0]["text"] = ""
    preset = ds.write()
    return Expect(["data", "verify", "--config", str(preset), "--workers", "1"], 1, ["evil\\x1b[2J\\x1b[31mid", "empty text"], [ds.data])

# usage errors: exit 2 before anything is created
def _nothing_created(env: Env, *names: str) -> Callable[[], None]:
    def after() -> None:
        made = [n for n in names if (env.tmp / n).exists()]
        assert not made, f"created before refusing: {made}"

    return after


@case
def usage17_empty_shard(env: Env) -> Expect:
    ds, preset = _good(env)
    return Expect(["extract", "--config", str(preset), "--out", str(env.tmp / "c.h5"), "--shard", "", "--quiet"], 2, ["--shard ''"], [env.tmp],
                  _nothing_created(env, "c.h5", "c.h5.lock"))


@case
def usage17_sweep_negative_seed(env: Env) -> Expect:
    return Expect(["sweep", "--cache", str(env.cache), "--grid", "fusion=batch", "--seeds", "-1", "--out", str(env.tmp / "sw"), "--quiet"], 2,
                  ["--seeds '-1'", "seed -1"], [env.tmp], _nothing_created(env, "sw"))


@case
def usage17_sweep_device_this_machine_lacks(env: Env) -> Expect:
    return Expect(["sweep", "--cache", str(env.cache), "--grid", "fusion=batch", "--seeds", "1", "--devices", "cuda:7", "--out", str(env.tmp / "sw"), "--quiet"], 2,
                  ["cuda:7"], [env.tmp], _nothing_created(env, "sw"))


# ------------------------------------------------------------------------------------ shared fixtures and the runner


def _unwritable(env: Env, folder: Path) -> None:
    """``folder`` reports itself unwritable (tests may run as root, whom permissions do not stop)."""
    import os

    real = os.access
    env.monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == folder else real(p, mode, *a, **k))


_OTHER: dict[str, Path] = {}


def other_cache(env: Env) -> Path:
    """A cache extracted with another max_length (built once per session)."""
    if "path" not in _OTHER:
        from sppscl.stage1.extract import extract

        root = env.cache.parent / "other"
        cfg = tiny_config(root / "data", size=24)
        cfg.encoders.max_length = 16
        extract(cfg, root / "other.h5", progress=False)
        _OTHER["path"] = root / "other.h5"
    return _OTHER["path"]


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("matrixrun") / "run"
    assert main(["train", "--cache", str(tiny_cache[0]), "--out", str(run), "--set", "epochs=1", "--set", "threads=1", "--quiet"]) == 0
    return run


def _arrays(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        out = {}
        for s, g in f["splits"].items():
            for k in g:
                a = g[k][()]
                out[f"{s}/{k}"] = hashlib.sha256(repr(a.tolist()).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes()).hexdigest()
        return out


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in load_file(path).items() if k.startswith("model")}


def _snapshot(roots: list[Path]) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_matrix_has_at_least_40_rows():
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_or_fault(name, tiny_cache, tiny_run, tmp_path, monkeypatch, capsys):
    opened: list[str] = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    env = Env(tmp_path, tiny_cache[0], tiny_run, monkeypatch)
    expect = CASES[name](env)
    capsys.readouterr()
    protected = [tiny_cache[0], tiny_run] + expect.protect
    # the command's own output location may be created; everything that existed before must stay as it was
    before = _snapshot(protected)
    code = main(expect.argv)
    out, err = capsys.readouterr()
    assert code == expect.code, f"exit {code}, expected {expect.code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    text = " ".join((out + err).split())
    for needle in expect.names:
        assert " ".join(needle.split()) in text, f"{needle!r} not in the output:\n{out}\n{err}"
    after = _snapshot(protected)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files changed: {changed}"
    assert not [p for p in opened if "outside" in p], f"read outside the dataset: {opened}"
    if expect.after is not None:
        expect.after()

