"""Every adapter format on tiny files written in tmp_path, plus the real MVSA-Single split when present."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sppscl.config import Config, load_config
from sppscl.stage1.adapters import DataError, load_samples, mvsa_majority, mvsa_pair_label

REAL_MVSA_SINGLE = Path(__file__).parents[1] / ".." / "shared" / "data" / "mvsa-single"


def make_cfg(fmt: str, splits: dict[str, str], classes: list[str] | None = None, **dataset) -> Config:
    cfg = Config()
    cfg.dataset.format = fmt
    cfg.dataset.splits = splits
    if classes is not None:
        cfg.dataset.classes = classes
    for key, value in dataset.items():
        setattr(cfg.dataset, key, value)
    return cfg


def write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def by_id(report) -> dict:
    return {s.id: s for s in report.samples}


# --- clmlf --------------------------------------------------------------------------------------------

HFM_SPLITS = {"train": "train.json", "dev": "valid.json", "test": "test.json"}


def test_clmlf_hfm_naming_and_unlabeled_test(tmp_path):
    write_json(tmp_path / "train.json", [
        {"id": "10", "text": "a", "emotion_label": 1},
        {"id": 11, "text": "b", "emotion_label": 0},
    ])
    write_json(tmp_path / "valid.json", [{"id": "20", "text": "c", "emotion_label": 0}])
    write_json(tmp_path / "test.json", [{"id": "30", "text": "d"}, {"id": "31", "text": "e"}])
    report = load_samples(make_cfg("clmlf", HFM_SPLITS, ["not-sarcastic", "sarcastic"]), tmp_path)

    assert report.split_counts() == {"train": 2, "dev": 1, "test": 2}
    s = by_id(report)
    assert (s["10"].label, s["11"].label, s["20"].label) == (1, 0, 0)
    assert s["11"].split == "train" and s["20"].split == "dev"
    assert s["30"].label is None and s["31"].label is None
    assert s["10"].image == tmp_path / "images" / "10.jpg" and s["10"].image.is_absolute()
    assert any("test" in n and "no labels" in n for n in report.notes)


def test_clmlf_relative_data_dir_becomes_absolute(tmp_path, monkeypatch):
    write_json(tmp_path / "d" / "train.json", [{"id": "1", "text": "a", "emotion_label": 0}])
    monkeypatch.chdir(tmp_path)
    report = load_samples(make_cfg("clmlf", {"train": "train.json"}), Path("d"))
    assert report.samples[0].image == tmp_path / "d" / "images" / "1.jpg"


def test_clmlf_keeps_out_of_range_label_for_verify(tmp_path):
    write_json(tmp_path / "train.json", [{"id": "1", "text": "a", "emotion_label": 7}])
    report = load_samples(make_cfg("clmlf", {"train": "train.json"}), tmp_path)
    assert report.samples[0].label == 7


def test_clmlf_partly_labeled_file_names_file_and_ids(tmp_path):
    write_json(tmp_path / "train.json", [
        {"id": "1", "text": "a", "emotion_label": 0},
        {"id": "2", "text": "b"},
        {"id": "3", "text": "c", "emotion_label": 2},
    ])
    with pytest.raises(DataError, match=r"train\.json.*1 of 3.*ids without a label: 2$"):
        load_samples(make_cfg("clmlf", {"train": "train.json"}), tmp_path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('[{"id": "1", "text": "a"', r"train\.json: not valid JSON \(line 1"),
        ('{"id": "1"}', r"train\.json: expected a JSON list"),
        ('[{"id": "1", "text": "a"}, {"text": "b"}]', r"train\.json: row 1: missing key 'id'"),
        ('[{"id": "1", "text": "a"}, {"id": "9"}]', r"train\.json: row 1 \(id 9\): missing or non-string 'text'"),
        ('[{"id": "1", "text": "a", "emotion_label": "pos"}]', r"train\.json: row 0 \(id 1\): label 'pos' is not"),
        ('[{"id": "", "text": "a"}]', r"train\.json: row 0: id '' is missing"),
    ],
)
def test_clmlf_malformed_files_name_file_and_row(tmp_path, content, pattern):
    (tmp_path / "train.json").write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_samples(make_cfg("clmlf", {"train": "train.json"}), tmp_path)


def test_missing_split_file_and_empty_splits_are_errors(tmp_path):
    write_json(tmp_path / "train.json", [])
    with pytest.raises(DataError, match=r"split 'dev': file .*valid\.json does not exist"):
        load_samples(make_cfg("clmlf", {"train": "train.json", "dev": "valid.json"}), tmp_path)
    with pytest.raises(DataError, match="dataset.splits is empty"):
        load_samples(make_cfg("clmlf", {}), tmp_path)
    with pytest.raises(DataError, match="data folder .*nowhere does not exist"):
        load_samples(make_cfg("clmlf", HFM_SPLITS), tmp_path / "nowhere")


# --- hfm-raw ------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


HFM_RAW_SPLITS = {"train": "text/train.txt", "dev": "text/valid2.txt", "test": "text/test2.txt"}


def write_hfm_raw(root: Path) -> None:
    write_lines(root / "text/train.txt", [
        "['100', 'just a normal day <user>', 0]",
        "['101', 'Oh great, more SARCASM from you', 1]",
        "['102', 'look at this <URL> now', 1]",
        "['103', \"what a day, isn't it\", 1]",
        "",
        "['104', 'that was a good Joke', 0]",
        "['105', 'emoji_smile lovely weather', 0]",
    ])
    write_lines(root / "text/valid2.txt", [
        "['200', 'dev post one', 1, 0]",
        "['201', 'so IRONIC', 0, 1]",
        "['202', 'dev post three', 1, 1]",
    ])
    write_lines(root / "text/test2.txt", ["['300', 'test post', 0, 1]", "['301', 'exgag repost', 1, 0]"])


def test_hfm_raw_three_and_four_element_lines_and_keyword_filter(tmp_path):
    write_hfm_raw(tmp_path)
    report = load_samples(make_cfg("hfm-raw", HFM_RAW_SPLITS, ["not-sarcastic", "sarcastic"]), tmp_path)

    s = by_id(report)
    assert report.split_counts() == {"train": 3, "dev": 2, "test": 1}
    assert (s["100"].label, s["103"].label, s["105"].label) == (0, 1, 0)
    # 4-element lines: the label is the last element, not the hashtag label
    assert (s["200"].label, s["202"].label, s["300"].label) == (0, 1, 1)
    assert s["103"].text == "what a day, isn't it"
    assert s["200"].image == tmp_path / "images" / "200.jpg"
    assert report.dropped == {
        "hfm keyword filter: sarcasm": ["101"],
        "hfm keyword filter: <url>": ["102"],
        "hfm keyword filter: joke": ["104"],
        "hfm keyword filter: ironic": ["201"],
        "hfm keyword filter: exgag": ["301"],
    }
    assert report.notes == [
        "HFM keyword filter dropped 3 of 6 rows in train",
        "HFM keyword filter dropped 1 of 3 rows in dev",
        "HFM keyword filter dropped 1 of 2 rows in test",
    ]


def test_hfm_raw_filter_off_keeps_every_row(tmp_path):
    write_hfm_raw(tmp_path)
    cfg = make_cfg("hfm-raw", HFM_RAW_SPLITS, ["not-sarcastic", "sarcastic"], hfm_keyword_filter=False)
    report = load_samples(cfg, tmp_path)
    assert report.split_counts() == {"train": 6, "dev": 3, "test": 2}
    assert report.dropped == {} and report.notes == []


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ("['102', 'unterminated, 1]", r"train\.txt: line 2: not a Python literal"),
        ("['102', 'two', 'elements', 0, 1]", r"train\.txt: line 2: expected a list of 3 or 4"),
        ("['102', 5, 1]", r"train\.txt: line 2 \(id 102\): text is not a string"),
        ("['102', 'text', 'x']", r"train\.txt: line 2 \(id 102\): label 'x'"),
    ],
)
def test_hfm_raw_malformed_line_names_file_and_line(tmp_path, bad, pattern):
    write_lines(tmp_path / "text/train.txt", ["['101', 'fine', 0]", bad])
    with pytest.raises(DataError, match=pattern):
        load_samples(make_cfg("hfm-raw", {"train": "text/train.txt"}), tmp_path)


# --- mmsd2 --------------------------------------------------------------------------------------------


def test_mmsd2_reads_label_dir_and_both_label_keys(tmp_path):
    write_json(tmp_path / "mmsd2/train.json", [
        {"image_id": "5", "text": "a", "label": 1},
        {"image_id": "6", "text": "b", "label": 0},
    ])
    write_json(tmp_path / "mmsd2/valid.json", [{"id": "7", "text": "c", "emotion_label": 1}])
    write_json(tmp_path / "mmsd2/test.json", [{"id": "8", "text": "d", "label": 0}])
    cfg = make_cfg("mmsd2", HFM_SPLITS, ["not-sarcastic", "sarcastic"], label_dir="mmsd2", image_dir="dataset_image")
    report = load_samples(cfg, tmp_path)

    s = by_id(report)
    assert {k: (v.split, v.label) for k, v in s.items()} == {
        "5": ("train", 1), "6": ("train", 0), "7": ("dev", 1), "8": ("test", 0)
    }
    assert s["5"].image == tmp_path / "dataset_image" / "5.jpg"
    assert any("MMSD2.0" in n for n in report.notes)


def test_mmsd2_absolute_label_dir_and_errors(tmp_path):
    labels = tmp_path / "elsewhere"
    write_json(labels / "train.json", [{"id": "5", "text": "a", "label": 1}])
    report = load_samples(make_cfg("mmsd2", {"train": "train.json"}, label_dir=str(labels)), tmp_path)
    assert report.samples[0].label == 1
    with pytest.raises(DataError, match="needs dataset.label_dir"):
        load_samples(make_cfg("mmsd2", {"train": "train.json"}), tmp_path)
    with pytest.raises(DataError, match="label folder .*missing does not exist"):
        load_samples(make_cfg("mmsd2", {"train": "train.json"}, label_dir="missing"), tmp_path)


# --- mvsa-raw -----------------------------------------------------------------------------------------


def write_mvsa(root: Path, header: str, rows: list[str], texts: dict[str, bytes]) -> None:
    write_lines(root / "labelResultAll.txt", [header, *rows])
    (root / "data").mkdir(parents=True, exist_ok=True)
    for sid, raw in texts.items():
        (root / "data" / f"{sid}.txt").write_bytes(raw)


SINGLE_ROWS = [
    "1\tpositive,positive",   # equal -> positive
    "2\tneutral,negative",    # neutral + polar -> negative
    "3\tpositive,neutral",    # polar + neutral -> positive
    "4\tpositive,negative",   # conflict -> dropped
    "5\tneutral,neutral",     # equal -> neutral
    "6\tNegative,Positive ",  # conflict (case, trailing space) -> dropped
]


def test_mvsa_single_pair_rule_with_split_files(tmp_path):
    texts = {str(i): f"  tweet {i}\n".encode() for i in range(1, 7)}
    texts["3"] = b"caf\xe9 \xff odd bytes "  # latin-1, not UTF-8
    write_mvsa(tmp_path, "ID\ttext,image", SINGLE_ROWS, texts)
    write_lines(tmp_path / "splits/train.txt", ["1", "2", "4"])
    write_lines(tmp_path / "splits/dev.txt", ["3"])
    write_lines(tmp_path / "splits/test.txt", ["5", ""])
    splits = {"train": "splits/train.txt", "dev": "splits/dev.txt", "test": "splits/test.txt"}
    report = load_samples(make_cfg("mvsa-raw", splits), tmp_path)

    s = by_id(report)
    assert {k: (v.split, v.label) for k, v in s.items()} == {
        "1": ("train", 0), "2": ("train", 2), "3": ("dev", 0), "5": ("test", 1)
    }
    assert s["1"].text == "tweet 1"
    assert s["3"].text == "caf\ufffd \ufffd odd bytes"
    assert s["2"].image == tmp_path / "data" / "2.jpg"
    assert report.dropped == {"mvsa: text and image labels conflict (positive vs negative)": ["4", "6"]}
    summary = "MVSA-Single (1 annotator): kept 4 of 6 rows, dropped 2 positive-vs-negative text/image conflicts"
    assert summary in report.notes
    assert "split train: 1 listed ids were dropped by the MVSA cleaning rule" in report.notes


def test_mvsa_split_file_with_unknown_id_is_an_error(tmp_path):
    write_mvsa(tmp_path, "ID\ttext,image", SINGLE_ROWS, {})
    write_lines(tmp_path / "train.txt", ["1", "99"])
    with pytest.raises(DataError, match=r"train\.txt: line 2: id 99 is not in labelResultAll"):
        load_samples(make_cfg("mvsa-raw", {"train": "train.txt"}), tmp_path)


def test_mvsa_without_split_files_makes_seeded_811_split(tmp_path):
    rows = [f"{i}\tpositive,neutral" for i in range(1, 41)]
    write_mvsa(tmp_path / "a", "ID\ttext,image", rows, {})
    write_mvsa(tmp_path / "b", "ID\ttext,image", rows[::-1], {})
    first = load_samples(make_cfg("mvsa-raw", {}), tmp_path / "a")
    second = load_samples(make_cfg("mvsa-raw", {}), tmp_path / "b")

    assert first.split_counts() == {"train": 32, "dev": 4, "test": 4}
    split_of = {s.id: s.split for s in first.samples}
    # the split depends on the ids, not on the file's line order
    assert split_of == {s.id: s.split for s in second.samples}
    assert split_of != {str(i): "train" if i <= 32 else "dev" if i <= 36 else "test" for i in range(1, 41)}
    assert any("8:1:1" in n and "seed 42" in n for n in first.notes)
    # a missing .txt is an empty text for verify to report, not an error
    assert all(s.text == "" for s in first.samples)
    assert any(n.startswith("40 ids have no data/<id>.txt") for n in first.notes)


def test_mvsa_multiple_majority_over_annotators(tmp_path):
    rows = [
        "1\tpositive,positive\tpositive,neutral\tneutral,positive",    # all positive
        "2\tnegative,negative\tneutral,neutral\tneutral,negative",     # 2 of 3 negative
        "3\tpositive,negative\tneutral,neutral\tneutral,neutral",      # one conflict, 2 neutral -> neutral
        "4\tpositive,positive\tneutral,neutral\tnegative,negative",    # all differ -> dropped
        "5\tpositive,negative\tnegative,positive\tneutral,neutral",    # two conflicts, 1 vote -> dropped
        "6\tneutral,positive\tpositive,negative\tpositive,positive",   # 2 positive, 1 conflict -> positive
    ]
    write_mvsa(tmp_path, "ID\ttext,image\ttext,image\ttext,image", rows, {str(i): b"t" for i in range(1, 7)})
    report = load_samples(make_cfg("mvsa-raw", {}), tmp_path)

    assert {s.id: s.label for s in report.samples} == {"1": 0, "2": 2, "3": 1, "6": 0}
    assert report.dropped == {"mvsa: no majority over 3 annotators": ["4", "5"]}
    assert any(n.startswith("MVSA-Multiple (3 annotators): kept 4 of 6 rows") for n in report.notes)


def test_mvsa_rules_as_functions():
    pos, neu, neg = 0, 1, 2
    assert [mvsa_pair_label(*p) for p in [(pos, pos), (neu, neg), (neg, neu), (pos, neg), (neg, pos)]] == [
        pos, neg, neg, None, None
    ]
    assert mvsa_majority([pos, pos, None]) == pos
    assert mvsa_majority([pos, neg, None]) is None
    assert mvsa_majority([None, None, None]) is None


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (["1\tpositive,happy"], r"labelResultAll\.txt: line 2: label 'happy' is not one of"),
        (["1\tpositive,positive", "2\tpositive"],
         r"labelResultAll\.txt: line 3 \(id 2\): annotation 'positive' is not"),
        (["1\tpositive,positive", "2\tpositive,positive\tneutral,neutral"],
         r"line 3: 2 annotator columns, earlier lines have 1"),
        ([], r"labelResultAll\.txt: no label rows"),
        (["7\tpositive,positive", "7\tneutral,neutral"], r"labelResultAll\.txt: line 3: id 7 appears twice"),
    ],
)
def test_mvsa_malformed_label_file(tmp_path, rows, pattern):
    write_mvsa(tmp_path, "ID\ttext,image", rows, {})
    with pytest.raises(DataError, match=pattern):
        load_samples(make_cfg("mvsa-raw", {}), tmp_path)


def test_mvsa_without_label_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="labelResultAll.txt does not exist"):
        load_samples(make_cfg("mvsa-raw", {}), tmp_path)


# --- manifest -----------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_manifest_jsonl_per_split(tmp_path):
    elsewhere = tmp_path / "pics" / "z.png"
    write_jsonl(tmp_path / "m/train.jsonl", [
        {"id": 1, "text": "good", "image": "img/1.jpg", "label": 0},
        {"id": "2", "text": "bad", "image": str(elsewhere), "label": "Negative"},
    ])
    write_jsonl(tmp_path / "m/dev.jsonl", [{"id": "3", "text": "meh", "image": "img/3.jpg", "label": "1"}])
    write_jsonl(tmp_path / "m/test.jsonl", [{"id": "4", "text": "?", "image": "img/4.jpg", "label": None}])
    splits = {"train": "m/train.jsonl", "dev": "m/dev.jsonl", "test": "m/test.jsonl"}
    report = load_samples(make_cfg("manifest", splits), tmp_path)

    s = by_id(report)
    assert {k: (v.split, v.label) for k, v in s.items()} == {
        "1": ("train", 0), "2": ("train", 2), "3": ("dev", 1), "4": ("test", None)
    }
    assert s["1"].image == tmp_path / "m" / "img" / "1.jpg"
    assert s["2"].image == elsewhere
    assert any("test" in n and "no labels" in n for n in report.notes)


def test_manifest_single_csv_with_split_column(tmp_path):
    (tmp_path / "all.csv").write_text(
        "\ufeffid,text,image,label,split\n"
        "a,\"hello, world\",a.jpg,positive,train\n"
        "b,meh,b.jpg,NEUTRAL,train\n"
        "c,ugh,b.jpg,2,dev\n"
        "d,who knows,d.jpg,,test\n",
        encoding="utf-8",
    )
    report = load_samples(make_cfg("manifest", {"train": "all.csv"}), tmp_path)

    s = by_id(report)
    assert {k: (v.split, v.label) for k, v in s.items()} == {
        "a": ("train", 0), "b": ("train", 1), "c": ("dev", 2), "d": ("test", None)
    }
    assert s["a"].text == "hello, world"
    assert s["c"].image == tmp_path / "b.jpg"


def test_manifest_csv_without_split_column_uses_mapping(tmp_path):
    (tmp_path / "train.csv").write_text("id,text,image\nx,t,x.jpg\n")
    report = load_samples(make_cfg("manifest", {"predict": "train.csv"}), tmp_path)
    assert [(s.id, s.split, s.label) for s in report.samples] == [("x", "predict", None)]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("t.csv", "id,text\n1,a\n", r"t\.csv: line 1 \(header\): missing column\(s\) image"),
        ("t.csv", "id,text,image\n1,a,1.jpg\n2,b\n", r"t\.csv: line 3: missing 'image'"),
        ("t.jsonl", '{"id": "1", "text": "a", "image": "1.jpg"}\n{"id": "2", "image": "2.jpg"}\n',
         r"t\.jsonl: line 2: missing 'text'"),
        ("t.jsonl", '{"id": "1", "text": "a", "image": "1.jpg"}\n{"id": \n', r"t\.jsonl: line 2: not valid JSON"),
        ("t.jsonl", '["1", "a", "1.jpg"]\n', r"t\.jsonl: line 1: expected a JSON object"),
        ("t.jsonl", '{"id": "1", "text": "a", "image": "1.jpg", "label": "happy"}\n',
         r"t\.jsonl: line 1 \(id 1\): label 'happy' is neither an index nor one of the classes"),
        ("t.csv", "id,text,image,label\n1,a,1.jpg,0\n2,b,2.jpg,\n",
         r"t\.csv: split 'train' has labels on some rows .*: 2$"),
        ("t.txt", "id,text,image\n", r"t\.txt: manifest must be \.jsonl or \.csv"),
    ],
)
def test_manifest_malformed_names_file_and_row(tmp_path, name, content, pattern):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_samples(make_cfg("manifest", {"train": name}), tmp_path)


def test_manifest_not_utf8_names_file(tmp_path):
    (tmp_path / "t.jsonl").write_bytes(b'{"id": "1", "text": "a", "image": "1.jpg"}\n{"id": "2", "text": "\xff"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl: line 2: not UTF-8 text"):
        load_samples(make_cfg("manifest", {"train": "t.jsonl"}), tmp_path)


def test_manifest_image_under_an_unknown_users_home_is_a_data_error(tmp_path):
    # pathlib raises RuntimeError for ~name when no such user exists; found by the property tests
    (tmp_path / "t.csv").write_text("id,text,image\n1,a,~no-such-user-sppscl/1.jpg\n")
    with pytest.raises(DataError, match=r"t\.csv: line 2 \(id 1\): 'image': path '~no-such-user-sppscl/1\.jpg' cannot be expanded"):
        load_samples(make_cfg("manifest", {"train": "t.csv"}), tmp_path)


def test_manifest_split_column_contradicting_mapping_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("id,text,image,split\n1,a,1.jpg,train\n")
    (tmp_path / "dev.csv").write_text("id,text,image,split\n2,b,2.jpg,test\n")
    pattern = r"dev\.csv: line 2 \(id 2\): split 'test' disagrees with the file's split 'dev'"
    with pytest.raises(DataError, match=pattern):
        load_samples(make_cfg("manifest", {"train": "train.csv", "dev": "dev.csv"}), tmp_path)


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(DataError, match="dataset.format='tfrecord'"):
        load_samples(make_cfg("tfrecord", {"train": "x"}), tmp_path)


# --- real data ----------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_mvsa_single_split_and_class_counts():
    if not REAL_MVSA_SINGLE.is_dir():
        pytest.skip(f"{REAL_MVSA_SINGLE} is absent")
    report = load_samples(load_config("mvsa-single"), REAL_MVSA_SINGLE)

    assert report.split_counts() == {"train": 3611, "dev": 450, "test": 450}
    labels = {split: Counter(s.label for s in report.samples if s.split == split) for split in ("train", "dev", "test")}
    assert labels["train"] == {0: 2147, 1: 376, 2: 1088}
    assert labels["dev"] == {0: 268, 1: 47, 2: 135}
    assert labels["test"] == {None: 450}
    assert all(s.image.is_absolute() and s.image.name == f"{s.id}.jpg" for s in report.samples)
