"""`sppscl report`: one self-contained HTML page for runs, a sweep (written by the sweep itself), a cv, a reproduce
folder or a study; every table row, chart and provenance item read from the files those commands wrote."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from html.parser import HTMLParser

import pytest

from sppscl.cli import main
from sppscl.report import content_security_policy, write_report
from sppscl.report.collect import ReportError, majority_reference, markdown_tables, Run


class Page(HTMLParser):
    """The parts of a page the tests look at: table bodies' rows, img sources, every URL-bearing attribute, the CSP."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.csp = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_body = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a["content"]
        if tag == "img":
            self.images.append(a["src"])
        self.urls += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "poster", "data") and v]
        if tag == "table":
            self.tables.append([])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_a_self_contained_report_of_its_tables(swept):
    out, argv, _ = swept
    html = (out / "report.html").read_text()
    page = Page(html)
    # nothing from any network: no URL but data: images and in-page anchors, and a CSP forbidding loads
    assert page.csp is not None and "default-src 'none'" in page.csp and "img-src data:" in page.csp
    assert all(u.startswith("data:image/png;base64,") or u.startswith("#") for u in page.urls), [u[:40] for u in page.urls]
    assert not re.search(r"https?://", html)
    # the configurations table: one row per configuration of summary.csv, in its order (best on dev first)
    summary = _csv(out / "summary.csv")
    configs = page.tables[0]
    assert [r[0] for r in configs] == [s["lr"] for s in summary]
    assert [r[1] for r in configs] == [s["n"] for s in summary] == ["2", "2"]
    assert configs[0][3] == f"{float(summary[0]['dev_accuracy_mean']):.4f} ± {float(summary[0]['dev_accuracy_std']):.4f}"
    # the seed ensembles table, the majority-class reference, curves and the best configuration's confusion matrices
    assert any(row[1].startswith("2 (ensemble") for t in page.tables for row in t)
    assert "majority-class reference" in html
    assert len(page.images) == 3 and "dev curves by configuration" in html and "best on dev: " + summary[0]["config"] in html
    # provenance and the command that made it
    assert "tiny-cnn" in html and "tiny-bert" in html and "precision fp32" in html
    assert "sppscl " + " ".join(argv[:2]) in html and (out / "commands.txt").read_text().count("sppscl sweep") == 1


def test_csp_names_exactly_the_inline_style_and_script(swept):
    import base64
    import hashlib

    out, _, _ = swept
    html = (out / "report.html").read_text()
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    assert Page(html).csp == content_security_policy(style, script)
    for text in (style, script):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in Page(html).csp


def test_report_of_runs_and_of_a_sweep_whose_runs_are_elsewhere(swept, tmp_path):
    out, _, _ = swept
    runs = sorted(p for p in (out / "runs").iterdir() if (p / "results.json").is_file())
    # one run: its splits, curves and a confusion matrix per labelled split
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "one.html")]) == 0
    page = Page((tmp_path / "one.html").read_text())
    res = json.loads((runs[0] / "results.json").read_text())
    assert [r[0] for r in page.tables[0]] == list(res["splits"])
    dev = page.tables[0][list(res["splits"]).index("dev")]
    assert dev[1:3] == [str(res["splits"]["dev"]["n"]), f"{res['splits']['dev']['accuracy']:.4f}"]
    assert len(page.images) == 1 + len(res["splits"])
    # several runs: one row each
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "many.html")]) == 0
    assert [r[0] for r in Page((tmp_path / "many.html").read_text()).tables[0]] == [p.name for p in runs]
    # the sweep's tables copied where its runs are not: the tables whole, the missing runs named, no curves
    moved = tmp_path / "copy"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("runs"))
    for row in _csv(moved / "runs.csv"):
        assert row["run_dir"]
    gone = tmp_path / "gone"
    shutil.move(str(out / "runs"), gone)
    try:
        write_report([moved], tmp_path / "moved.html")
    finally:
        shutil.move(str(gone), out / "runs")
    html = (tmp_path / "moved.html").read_text()
    page = Page(html)
    assert len(page.tables[0]) == 2 and "Runs not reachable here (4)" in html and not page.images
    for row in _csv(moved / "runs.csv"):
        assert row["run"] in html


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a run, sweep, cv or reproduce folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.txt")]) == 2
    assert "must end in .html" in capsys.readouterr().err
    with pytest.raises(ReportError, match="--storage needs --study"):
        write_report([], tmp_path / "r.html", storage="sqlite:///x.db")
    assert not (tmp_path / "r.html").exists()


def test_markdown_tables_keep_every_column_and_their_notes():
    text = "# T\n\nabove\n\n| a | n | acc | ci95 |\n|---|---|---|---|\n| **x** | 2 | 0.5 ± 0.1 | [0.3, 0.7] |\n| y | 1 | 0.4 ± 0.0 | [0.4, 0.4] |\n\n- a note\n"
    (t,) = markdown_tables(text, "f.md")
    assert t.title == "T" and t.head == ["a", "n", "acc", "ci95"] and t.highlight_first
    assert t.rows == [["x", "2", "0.5 ± 0.1", "[0.3, 0.7]"], ["y", "1", "0.4 ± 0.0", "[0.4, 0.4]"]]
    assert t.notes == ["above", "a note"]


def test_curve_lines_name_the_runs_when_their_seeds_do_not_tell_them_apart():
    """A configuration's seeds are labelled by seed; runs compared side by side (often all seed 42) by their names."""
    from sppscl.report.collect import _line_labels

    def run(name, seed):
        return Run(name, Path(name), {}, [], {"config": {"train": {"seed": seed}}})

    assert _line_labels([run("lr-1-seed1", 1), run("lr-1-seed2", 2)]) == ["seed 1", "seed 2"]
    assert _line_labels([run("spp-scl", 42), run("text-only", 42)]) == ["spp-scl", "text-only"]


def test_majority_reference_is_the_constant_classifier(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    res = {"classes": ["a", "b", "c"], "splits": {"train": {"confusion_matrix": [[5, 0, 0], [1, 1, 1], [0, 0, 2]]}, "dev": {"confusion_matrix": [[1, 0, 0], [2, 0, 0], [0, 1, 0]]}}}
    table = majority_reference(Run("r", tmp_path, res, [], {}))
    dev = next(r for r in table.rows if r[0] == "dev")
    y = [0, 1, 1, 2]  # dev's true classes (row sums 1, 2, 1); the constant prediction is train's majority, 'a'
    pred = [0] * 4
    assert dev[1:] == ["4", f"{accuracy_score(y, pred):.4f}", f"{f1_score(y, pred, average='weighted', zero_division=0):.4f}", f"{f1_score(y, pred, average='macro', zero_division=0):.4f}"]


def test_report_from_a_study_names_the_runs_not_reachable(swept, tmp_path):
    out, _, storage = swept
    assert main(["report", "--storage", storage, "--study", "r19", "--out", str(tmp_path / "study.html")]) == 0
    page = Page((tmp_path / "study.html").read_text())
    assert [r[0] for r in page.tables[0]] == [s["lr"] for s in _csv(out / "summary.csv")] and len(page.images) == 3
    gone = tmp_path / "gone"
    shutil.move(str(out / "runs"), gone)
    try:
        assert main(["report", "--storage", storage, "--study", "r19", "--out", str(tmp_path / "away.html")]) == 0
    finally:
        shutil.move(str(gone), out / "runs")
    html = (tmp_path / "away.html").read_text()
    assert len(Page(html).tables[0]) == 2 and "Runs not reachable here (4)" in html and not Page(html).images


# ------------------------------------------------------------------------------------ in a real browser


class DevTools:
    """Headless Chromium driven over the DevTools protocol (one websocket, flattened target sessions)."""

    FLAGS = ["--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-port=0"]

    def __init__(self, binary: str, profile):
        import os
        import subprocess
        import time

        import websocket

        flags = [*self.FLAGS, f"--user-data-dir={profile}"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox
        self.proc = subprocess.Popen([binary, *flags, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def wait_for(self, method: str) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = json.loads(self.ws.recv())
            self.events.append(e)
            if e.get("method") == method:
                return e

    def evaluate(self, expression: str):
        res = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - a browser that will not stop is killed
            self.proc.kill()
            self.proc.wait()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make test installs Debian's chromium when run as root)")
def test_report_in_headless_chromium_renders_sorts_and_loads_nothing(swept, tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    pytest.importorskip("websocket", reason="websocket-client (the test extra) is needed to talk to chromium")
    out, _, _ = swept
    report = out / "report.html"
    summary = _csv(out / "summary.csv")
    browser = DevTools(_chromium(), tmp_path / "profile")
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.page(f"{domain}.enable")
        browser.page("Emulation.setDeviceMetricsOverride", width=1280, height=1600, deviceScaleFactor=1, mobile=False)
        browser.page("Page.navigate", url=report.as_uri())
        browser.wait_for("Page.loadEventFired")
        # the expected table rows, as the browser's DOM has them
        rows = browser.evaluate("[...document.querySelector('table.sortable').tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent.trim()))")
        assert [r[0] for r in rows] == [s["lr"] for s in summary]
        # every chart decoded (an image that failed to load has naturalWidth 0)
        widths = browser.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : -1)")
        assert len(widths) == 3 and all(w > 100 for w in widths), widths
        # the sortable table: clicking 'lr' sorts ascending as numbers, a second click descending
        browser.evaluate("document.querySelector('table.sortable th').click()")
        asc = browser.evaluate("[...document.querySelector('table.sortable').tBodies[0].rows].map(r => r.cells[0].textContent)")
        browser.evaluate("document.querySelector('table.sortable th').click()")
        desc = browser.evaluate("[...document.querySelector('table.sortable').tBodies[0].rows].map(r => r.cells[0].textContent)")
        assert [float(x) for x in asc] == sorted(float(s["lr"]) for s in summary) and desc == asc[::-1]
        # a screenshot that is not blank: many colours, and not one flat background
        shot = browser.page("Page.captureScreenshot", format="png")["data"]
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB"))
        assert pixels.shape[0] >= 1000 and pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
        problems = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",)
                    or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                    or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not problems, problems
        # nothing fetched but the page itself and its data: images
        fetched = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        assert report.as_uri() in fetched
        assert all(u == report.as_uri() or u.startswith("data:") for u in fetched), [u[:60] for u in fetched]
        # and the page's CSP is enforced: a load its script attempts is refused before any request leaves
        before = len(browser.events)
        browser.evaluate("new Promise(done => { const i = new Image(); i.onerror = done; i.onload = done; i.src = 'http://127.0.0.1:9/x.png'; })")
        browser.evaluate("new Promise(done => setTimeout(done, 200))")
        later = browser.events[before:]
        ids = {e["params"]["requestId"] for e in later if e.get("method") == "Network.requestWillBeSent" and "127.0.0.1:9" in e["params"]["request"]["url"]}
        blocked = {e["params"]["requestId"] for e in later if e.get("method") == "Network.loadingFailed" and e["params"].get("blockedReason") == "csp"}
        assert ids and ids <= blocked, later
        assert not [e for e in later if e.get("method") == "Network.responseReceived" and e["params"]["requestId"] in ids]
    finally:
        browser.close()


def test_cv_confusions_sum_each_variants_held_out_folds(tmp_path):
    from sppscl.report.collect import held_out_confusions, variant_of

    assert variant_of("cv_fold-0__cv_folds-2") == "cv_folds-2" and variant_of("alpha-0.5__cv_fold-3__cv_folds-5") == "alpha-0.5__cv_folds-5"

    def run(fold: int, m):
        return Run(f"f{fold}", tmp_path, {"classes": ["a", "b"], "splits": {"test": {"confusion_matrix": m}}}, [], {})

    groups = {f"{v}cv_fold-{k}__cv_folds-2": [run(k, [[k + 1, 0], [0, 1]])] for v in ("", "alpha-0.5__") for k in range(2)}
    charts = held_out_confusions(groups)
    # one chart per variant, each summing both folds
    assert [c.title for c in charts] == ["confusion: cv_folds-2, held-out folds", "confusion: alpha-0.5__cv_folds-2, held-out folds"]


def test_text_from_data_is_html_escaped_and_its_control_characters_shown():
    """Autoescape is on for every field: a run name, path, class name or command holding HTML stays text; control
    characters and bidirectional overrides are shown escaped, as on the console."""
    from sppscl.report import render
    from sppscl.report.collect import Section, Table

    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>\x1b[31m\u202e"'
    sec = Section(evil, "run", evil, tables=[Table(evil, [evil], [[evil]], [evil], evil)], notes=[evil],
                  provenance=[(evil, evil)], commands=[evil], missing=[evil])
    html = render([sec], evil, [evil])
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "\x1b" not in html and "\u202e" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 10
    assert "\\x1b[31m\\u202e" in html
    assert Page(html).tables[0] == [[evil.replace("\x1b", "\\x1b").replace("\u202e", "\\u202e")]]


def test_report_out_that_is_no_file_is_refused_before_the_report_is_built(tmp_path, monkeypatch, capsys):
    import os

    from sppscl import report

    monkeypatch.setattr(report, "build_report", lambda *a, **k: pytest.fail("built a report for a target that is refused"))
    os.mkfifo(tmp_path / "r.html")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "r.html is a FIFO" in capsys.readouterr().err
