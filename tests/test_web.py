"""The web client in a real browser: headless Chromium from Debian (``/usr/bin/chromium``) driven
by Playwright, against the embedded stack (ephemeral ports, a tmp data dir, tokens from the stack's
signer) and a tiny digits task (n = 8 models, m = 16 records, 4 models per worker job).

Scenarios: a builder creates a task, uploads base model / strategy (hyperparameters edited) / data
and runs the preparation stage; a contributor submits records from the sample set and a file and
sees their scores after the round; the builder starts a round and reads the batch view; another
contributor's token sees none of it; forms refuse a POST without the CSRF token or from another
origin. A tabular task: created from a schema JSON, builder data and contributors' records as CSV
and Parquet, bad tables refused with their one-line message and nothing stored. A task with
contributor-level masks (16 contributors, n = 4): each whole contribution's score on the contributor's
page, the batch view and both reports; recipes compared and the round grown from the batch view. Screenshots go to ``$FTPS_WEB_SCREENS`` (or a tmp dir); look at them after a change.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ftps.common import archives
from tests.conftest import digits_records

CHROMIUM = os.environ.get("FTPS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROUND_TIMEOUT_MS = 120_000

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None



def _browser_missing() -> str:
    if sync_playwright is None:
        return ("browser tests need Playwright: pip install playwright (its driver is bundled; no "
                "`playwright install`: the browser is Debian's chromium)")
    if shutil.which(CHROMIUM) is None:
        return f"browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium"
    return ""


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from stack.embedded import EmbeddedStack

    s = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                      data_dir=tmp_path_factory.mktemp("web-data"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokens(stack):
    signer = stack.signer()
    return {"builder": signer.issue("acme", "builder"), "alice": signer.issue("alice", "contributor"),
            "bob": signer.issue("bob", "contributor"), "zed": signer.issue("zed", "contributor")}


@pytest.fixture(scope="module")
def web(stack):
    from clients.web import WebServer

    server = WebServer(stack.addresses, port=0)
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if missing := _browser_missing():
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("FTPS_WEB_SCREENS") or tmp_path_factory.mktemp("web_screens"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sign_in(browser, web: str, token: str):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(60_000)  # 2 CPU cores shared with training: be patient, not flaky
    page = ctx.new_page()
    page.goto(web + "/")
    page.fill("#token", token)
    page.click("form[action='/signin'] button")
    page.wait_for_url(web + "/tasks")
    return page


def press(page, label: str) -> None:
    """Click the button (or button-styled link) whose text contains ``label``."""
    page.locator("button, a.button", has_text=label).first.click()


def clean(page, *secrets: str) -> str:
    """The page's source: no token, no stack trace."""
    html = page.content()
    for s in secrets:
        assert s not in html
    assert "Traceback" not in html and 'File "' not in html
    return html


@pytest.fixture(scope="module")
def ready_task(browser, web, tokens, shots, digits_base_weights):
    """The builder's side up to the preparation stage, all through the pages: create a task,
    upload the base model (file), the shipped strategy with edited hyperparameters and the demo
    builder data, run the preparation stage."""
    page = sign_in(browser, web, tokens["builder"])
    with screenshot_on_failure(page, shots, "builder-setup"):
        tid = _builder_setup(page, tokens, shots, digits_base_weights)
    yield {"tid": tid, "page": page}
    page.context.close()


def _create_task(page, dataset: str, name: str, fields: dict[str, str], *, schema: dict | None = None,
                 mask_unit: str | None = None) -> str:
    """Fill in the create-task form, submit it, and return the new task's id."""
    page.select_option("#dataset", dataset)
    page.fill("#name", name)
    if schema is not None:
        page.set_input_files("#schema", {"name": "schema.json", "mimeType": "application/json",
                                         "buffer": json.dumps(schema).encode()})
    for field, value in fields.items():
        page.fill(f"#{field}", value)
    if mask_unit is not None:
        page.select_option("#mask_unit", mask_unit)
    press(page, "Create task")
    page.wait_for_url(re.compile(r".*/tasks/t-[0-9a-f]+$"))
    return page.url.rsplit("/", 1)[1]


def _builder_setup(page, tokens, shots, digits_base_weights) -> str:
    tid = _create_task(page, "digits", "digits web demo", {"n_models": "8", "batch_threshold": "16",
                                                           "shadow_models": "4", "models_per_job": "4"})
    assert "created" in page.inner_text(".flash.info")

    page.set_input_files("#base-file", {"name": "digits.safetensors", "mimeType": "application/octet-stream",
                                        "buffer": digits_base_weights})
    press(page, "Upload base model")
    page.wait_for_selector("text=base model v1 stored", timeout=60_000)
    page.select_option("#strategy", "digits_cnn.py")
    page.fill("#epochs", "12")
    page.fill("#lr", "0.005")
    press(page, "Upload strategy")
    page.wait_for_selector("text=strategy v1 stored (digits_cnn.py with lr=0.005, epochs=12)", timeout=60_000)
    press(page, "Use the demo builder split")
    page.wait_for_selector("text=builder data v1 stored", timeout=60_000)
    page.reload()
    press(page, "Run the preparation stage")
    page.wait_for_selector("img[alt='the offline Gaussian']", timeout=ROUND_TIMEOUT_MS)
    html = clean(page, tokens["builder"])
    assert "k (shadow models)" in html and "offline Gaussian fitted" in html
    assert "fits strategy v1: checked in a worker's sandbox (10 classes" in html
    _wait_images(page)
    page.screenshot(path=str(shots / "builder-1-prepared.png"), full_page=True)
    return tid


def _images_loaded(page) -> bool:
    try:
        return page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    except PlaywrightError:  # the page reloaded itself meanwhile (live updates): ask again
        return False


def _wait_images(page) -> None:
    # Polled from here: the pages' Content-Security-Policy forbids the string eval wait_for_function uses.
    deadline = time.monotonic() + 60
    while not _images_loaded(page):
        assert time.monotonic() < deadline, "images did not load"
        page.wait_for_timeout(100)


@pytest.fixture(scope="module")
def alice_scored(browser, web, tokens, shots, ready_task, digits_splits):
    """Alice picks 8 records from the sample set and uploads 8 more from a file: the 16th record
    reaches m, a round starts by itself, her page follows it live and then shows her scores."""
    tid = ready_task["tid"]
    page = sign_in(browser, web, tokens["alice"])
    with screenshot_on_failure(page, shots, "contributor"):
        yield from _alice_flow(page, web, tid, tokens, shots, digits_splits)
    page.context.close()


@contextlib.contextmanager
def screenshot_on_failure(page, shots: Path, name: str):
    try:
        yield
    except Exception:
        page.screenshot(path=str(shots / f"FAILED-{name}.png"), full_page=True)
        raise


def _alice_flow(page, web, tid, tokens, shots, digits_splits):
    page.click(f"a[href='/tasks/{tid}']")
    page.wait_for_url(f"{web}/tasks/{tid}")
    page.screenshot(path=str(shots / "contributor-1-task.png"), full_page=True)
    boxes = page.locator("input[name=pick]")
    for i in range(8):
        boxes.nth(i).check()
    press(page, "Submit the picked records")
    page.wait_for_selector("text=8 records stored")
    x, y = digits_records(digits_splits, 8, seed=11)
    page.set_input_files("#records", {"name": "alice.npz", "mimeType": "application/octet-stream",
                                      "buffer": archives.records_to_npz(x, y)})
    press(page, "Submit records")
    page.locator("[data-live^='sub-']").nth(1).wait_for(timeout=60_000)
    # The round is followed live (event stream fed by WatchRound): a progress row appears by itself.
    page.wait_for_selector("[data-live^='round-']", timeout=60_000)
    page.screenshot(path=str(shots / "contributor-2-round-running.png"), full_page=True)
    page.wait_for_selector("section.record", timeout=ROUND_TIMEOUT_MS)
    page.locator("section.record").nth(15).wait_for(timeout=60_000)
    page.locator("[data-live^='sub-'][data-state='scored']").nth(1).wait_for(timeout=60_000)
    assert page.locator("section.record").count() == 16
    _wait_images(page)
    html = clean(page, tokens["alice"])
    page.screenshot(path=str(shots / "contributor-3-scores.png"), full_page=True)
    ids = page.eval_on_selector_all("section.record", "els => els.map(e => e.dataset.record)")
    with page.expect_download() as dl:
        press(page, "Download the scores (CSV)")
    rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    with page.expect_download() as dl:
        press(page, "Download your submitted records")
    with np.load(dl.value.path(), allow_pickle=False) as z:
        mine = {"x": z["x"], "y": z["y"], "record_id": z["record_id"]}
    round_id = rows[0]["round_id"]
    yield {"page": page, "html": html, "ids": ids, "rows": rows, "round_id": round_id, "records": mine}


# -- scenarios ----------------------------------------------------------------------------------

def test_contributor_submits_records_and_sees_scores(alice_scored):
    page, rows, ids = alice_scored["page"], alice_scored["rows"], alice_scored["ids"]
    assert len(ids) == 16 and len(set(ids)) == 16
    assert {r["record_id"] for r in rows} == set(ids) and {r["contributor"] for r in rows} == {"alice"}
    for r in rows:
        assert -1 <= float(r["counted_p_ci_low"]) <= float(r["counted_p"]) <= float(r["counted_p_ci_high"]) <= 1
        assert -1 <= float(r["score_ci_low"]) <= float(r["score"]) <= float(r["score_ci_high"]) <= 1
        assert r["reading"] and int(r["n_in"]) + int(r["n_out"]) == 8
    cards = page.locator("section.record")
    first = cards.first
    assert re.search(r"[+-]\d\.\d\d", first.locator(".score").inner_text())
    assert "95% interval" in first.inner_text()
    assert first.locator("p.reading").inner_text().strip()  # the plain-language reading
    assert first.locator("img[alt^='diagnosis plot']").count() == 1
    assert first.locator("img.thumb").count() == 1  # her own records, kept in her session
    assert "identifiable more often than chance" in alice_scored["html"]
    assert len(alice_scored["records"]["record_id"]) == 16


def test_builder_starts_a_round_and_sees_the_batch_view(browser, web, tokens, shots, ready_task, alice_scored,
                                                        stack, digits_splits):
    from clients.api import ContributorClient

    tid, page = ready_task["tid"], ready_task["page"]
    bob = ContributorClient(gateway=stack.addresses["gateway"], token=tokens["bob"])
    try:
        x, y = digits_records(digits_splits, 6, seed=21)
        sub = bob.submit(tid, x, y)
    finally:
        bob.close()
    page.goto(f"{web}/tasks/{tid}")
    press(page, "Start a round now with the pending records")
    flash = page.locator(".flash.info", has_text="started with 6 records")
    flash.wait_for()
    rid = re.search(r"Round (r-[0-9a-f]+)", flash.inner_text()).group(1)
    page.screenshot(path=str(shots / "builder-2-round-started.png"), full_page=True)
    # The page follows the round live and reloads itself when it ends: then the round is in the table.
    page.locator("td.mono", has_text=rid).wait_for(timeout=ROUND_TIMEOUT_MS)
    assert page.get_attribute(f"[data-live='round-{rid}']", "data-state") == "done"
    press(page, "Open the batch view")
    page.wait_for_url(f"{web}/tasks/{tid}/batch")
    _wait_images(page)
    html = clean(page, tokens["builder"])
    # Every contributor's records, both rounds, ROC per round, the highest-risk records.
    assert alice_scored["round_id"] in html and all(rid in html for rid in sub.record_ids)
    assert page.locator("img[alt^='log-log ROC']").count() == 2
    assert page.locator("img[alt^='diagnosis plot']").count() == 10
    assert "online-per-record ★" in html and "offline-global" in html
    # Thumbnails only from the builder's own local copy of the records (here: Alice's file).
    assert page.locator("img.thumb").count() == 0
    mine = alice_scored["records"]
    page.set_input_files("input[name=records]", {"name": "alice-records.npz", "mimeType": "application/octet-stream",
                                                 "buffer": archives.records_to_npz(mine["x"], mine["y"],
                                                                                record_id=mine["record_id"])})
    press(page, "Load images")
    page.wait_for_selector("text=16 record images loaded")
    _wait_images(page)
    assert page.locator("img.thumb").count() >= 1
    page.screenshot(path=str(shots / "builder-3-batch-view.png"), full_page=True)
    with page.expect_download() as dl:
        press(page, "Download every score (CSV)")
    rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert len(rows) == 22 and {r["contributor"] for r in rows} == {"alice", "bob"}
    # Bob opens his page after his round ended (he never followed it live): it is there, done.
    bob_page = sign_in(browser, web, tokens["bob"])
    try:
        bob_page.goto(f"{web}/tasks/{tid}")
        assert bob_page.get_attribute(f"[data-live='round-{rid}']", "data-state") == "done"
        assert bob_page.locator("section.record").count() == 6
    finally:
        bob_page.context.close()


def test_another_contributors_token_sees_none_of_it(browser, web, tokens, shots, ready_task, alice_scored):
    tid, ids, round_id = ready_task["tid"], alice_scored["ids"], alice_scored["round_id"]
    page = sign_in(browser, web, tokens["zed"])
    try:
        page.goto(f"{web}/tasks/{tid}")
        html = clean(page, tokens["zed"], tokens["alice"], tokens["builder"])
        assert "No scores yet" in html and page.locator("section.record").count() == 0
        assert not any(rid in html for rid in ids)
        page.screenshot(path=str(shots / "contributor-4-other-sees-nothing.png"), full_page=True)
        # Alice's figures and downloads by URL: the services answer for Zed's token.
        r = page.request.get(f"{web}/tasks/{tid}/records/{ids[0]}/diagnosis.png")
        assert r.status == 404
        r = page.request.get(f"{web}/tasks/{tid}/records/{ids[0]}/thumb.png")
        assert r.status == 404
        r = page.request.get(f"{web}/tasks/{tid}/rounds/{round_id}/roc.png")
        assert r.status == 403 and "PERMISSION_DENIED" in r.text()
        r = page.request.get(f"{web}/tasks/{tid}/scores.csv")
        assert r.status == 200 and len(r.text().strip().splitlines()) <= 1
        page.goto(f"{web}/tasks/{tid}/batch")
        html = clean(page, tokens["zed"])
        assert not any(rid in html for rid in ids)
        # A builder's action from a contributor's session: the service refuses, the page says why.
        page.goto(f"{web}/tasks/{tid}")
        csrf = page.get_attribute("input[name=csrf]", "value")
        r = page.request.post(f"{web}/tasks/{tid}/rounds", form={"csrf": csrf, "force": "1"})
        assert r.ok
        assert "PERMISSION_DENIED" in r.text() and "may not start rounds" in r.text()
    finally:
        page.context.close()


def test_forms_refuse_posts_without_the_csrf_token_or_from_another_origin(browser, web, tokens, ready_task):
    tid = ready_task["tid"]
    page = sign_in(browser, web, tokens["alice"])
    try:
        cookie = next(c for c in page.context.cookies() if c["name"] == "ftps_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.goto(f"{web}/tasks/{tid}")
        csrf = page.get_attribute("input[name=csrf]", "value")
        r = page.request.post(f"{web}/tasks/{tid}/submit", form={"source": "sample", "random_n": "2"})
        assert r.status == 403 and "CSRF" in r.text()
        r = page.request.post(f"{web}/tasks/{tid}/submit",
                              form={"csrf": "x" * len(csrf), "source": "sample", "random_n": "2"})
        assert r.status == 403
        r = page.request.post(f"{web}/tasks/{tid}/submit", form={"csrf": csrf, "source": "sample", "random_n": "2"},
                              headers={"Origin": "http://evil.example"})
        assert r.status == 403 and "cross-origin" in r.text()
        # Nothing was stored by the refused posts.
        page.goto(f"{web}/tasks/{tid}")
        assert "No submissions from this session yet" in clean(page, tokens["alice"])
    finally:
        page.context.close()


def test_errors_read_as_messages_not_stack_traces(browser, web, tokens, shots):
    page = sign_in(browser, web, tokens["builder"])
    try:
        page.select_option("#dataset", "digits")
        page.fill("#name", "odd")
        page.fill("#n_models", "5")
        # Past the browser's own checks (min/step), to the service's: its refusal is what the page shows.
        page.locator("form[action='/tasks']").evaluate("f => { f.noValidate = true; }")
        press(page, "Create task")
        text = page.inner_text(".flash.error")
        assert "INVALID_ARGUMENT" in text and "n_models" in text
        clean(page, tokens["builder"])
        page.screenshot(path=str(shots / "builder-0-error.png"))
        r = page.request.get(f"{web}/tasks/t-doesnotexist")
        assert r.status == 403 and "PERMISSION_DENIED" in r.text() and "Traceback" not in r.text()
    finally:
        page.context.close()
    # A forged token does not sign in; the service's refusal is shown.
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(web + "/")
    forged = tokens["alice"][:-4] + ("AAAA" if not tokens["alice"].endswith("AAAA") else "BBBB")
    page.fill("#token", forged)
    page.click("form[action='/signin'] button")
    assert "UNAUTHENTICATED" in page.inner_text(".flash.error")
    assert forged not in page.content()
    page.screenshot(path=str(shots / "signin-refused.png"))
    ctx.close()


# -- the web client's own helpers, without a browser --------------------------------------------

def test_multipart_forms_keep_binary_files_intact():
    from clients.web.server import parse_multipart

    blob = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\nabc\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"C:\\dir\\w.safetensors\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + blob + b"\r\n--XyZ--\r\n")
    fields, files = parse_multipart(body, "multipart/form-data; boundary=XyZ")
    assert fields == {"csrf": ["abc"]}
    assert files["file"] == ("w.safetensors", blob)


def test_strategy_hyperparameters_are_rewritten_in_the_recipe_literal_only():
    from clients.web import assets

    src = assets.shipped_source("digits_cnn.py")
    out = assets.rewrite_recipe(src, assets.parse_overrides({"lr": "0.01", "epochs": "3", "batch_size": ""}))
    recipe = assets.read_recipe(out)
    assert recipe["lr"] == 0.01 and recipe["epochs"] == 3 and recipe["batch_size"] == 16
    assert out.split("RECIPE")[0] == src.split("RECIPE")[0]  # nothing else changed
    assert "def build_model" in out and "PRETRAIN" in out
    with pytest.raises(assets.AssetError, match="epochs"):
        assets.rewrite_recipe(src, {"epochs": 0})
    with pytest.raises(assets.AssetError, match="whole number"):
        assets.parse_overrides({"epochs": "2.5"})
    with pytest.raises(assets.AssetError, match="no RECIPE"):
        assets.rewrite_recipe("def build_model():\n    pass\n", {"lr": 0.1})


def test_sample_picks_and_npz_uploads_are_checked():
    from clients.web import assets

    x, y, idx = assets.pick_samples("digits", ["3", "5"], "4", seed=0)
    assert x.shape == (6, 1, 8, 8) and y.shape == (6,) and idx[:2] == [3, 5] and len(set(idx)) == 6
    with pytest.raises(assets.AssetError):
        assets.pick_samples("digits", ["999999"], "", seed=0)
    with pytest.raises(assets.AssetError):
        assets.pick_samples("digits", [], "", seed=0)
    # Uploads are read by the one records reader, against the task's settings.
    from ftps.common.errors import InvalidArgument
    from ftps.records import files

    expect = files.Expect(shape=(1, 8, 8), num_classes=10)
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 1, 8, 8)))
    with pytest.raises(InvalidArgument, match="arrays x"):
        files.parse(buf.getvalue(), "a.npz", expect)
    with pytest.raises(InvalidArgument, match="empty"):
        files.parse(b"", "a.npz", expect)
    buf = io.BytesIO()
    np.savez(buf, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(InvalidArgument, match="pickle"):
        files.parse(buf.getvalue(), "a.npz", expect)
    with pytest.raises(InvalidArgument, match="not tabular"):
        files.parse(b"x,label\n1,0\n", "a.csv", expect)


def test_token_claims_label_the_session_without_trusting_it():
    from clients.web.session import token_claims

    assert token_claims("not a token") is None
    assert token_claims("") is None
    assert token_claims("e30.sig") is None  # {} has no subject or role


def test_demo_base_model_is_pretrained_once_then_cached(tmp_path, monkeypatch):
    from clients.web import assets

    monkeypatch.setenv("FTPS_CACHE_DIR", str(tmp_path))
    seen = []
    weights, cached = assets.demo_base_model("digits", lambda done, total, text: seen.append((done, total)))
    assert not cached and weights[:8] and seen and seen[-1][0] == seen[-1][1] > 0
    again, cached = assets.demo_base_model("digits", lambda *a: pytest.fail("no pretraining when cached"))
    assert cached and again == weights


def test_long_result_pages_are_paginated():
    """A contributor's results come 20 record cards a page, highest score first, with links between
    pages (50 records on one page were over 15,000 pixels tall)."""
    from clients.web import pages
    from clients.web.session import Session
    from ftps.v1 import common_pb2, registry_pb2

    session = Session("s-test")
    session.subject, session.role = "alice", "contributor"
    task = registry_pb2.Task(task_id="t-1", name="digits", settings=common_pb2.TaskSettings(record_shape=[1, 8, 8]))
    scores = [common_pb2.RecordScore(record_id=f"rec-{j:02d}", contributor="alice", round_id="r-1", index=j,
                                     score=j / 50, score_ci_low=j / 50 - 0.1, score_ci_high=j / 50 + 0.1,
                                     n_in=4, n_out=4) for j in range(45)]

    def render(results_page: int) -> str:
        return pages.contributor_task_page(session, task, scores, dataset=None, page=3, subs=[], rounds=[],
                                           results_page=results_page)

    def shown(html: str) -> set[int]:  # the summary above the cards names the top record on every page
        return {j for j in range(45) if f"rec-{j:02d}" in html} - {44}

    first = render(0)
    assert shown(first) == set(range(25, 44))  # highest scores first: 44 .. 25
    assert "records 1–20 of 45" in first and 'href="/tasks/t-1?page=3&amp;results=1#results"' in first
    last = render(2)
    assert shown(last) == set(range(5)) and "records 41–45 of 45" in last
    beyond = render(99)  # past the end: the last page
    assert shown(beyond) == set(range(5)) and "records 41–45 of 45" in beyond
    few = pages.contributor_task_page(session, task, scores[:12], dataset=None, page=0, subs=[], rounds=[])
    assert "results=" not in few and all(f"rec-{j:02d}" in few for j in range(12))


# -- tabular tasks: CSV and Parquet through the pages --------------------------------------------

TABULAR_SCHEMA = {"label_column": "diagnosis", "class_names": ["benign", "malignant"], "features": [
    {"name": "mean radius", "kind": "numeric", "mean": 14.0, "std": 3.5},
    {"name": "smoker", "kind": "categorical", "levels": ["no", "yes"], "level_frequencies": [0.9, 0.1]},
    {"name": "age", "kind": "numeric", "mean": 50.0, "std": 10.0}]}


def _table(n: int, fmt: str, *, seed: int = 0, **replace) -> bytes:
    """``n`` raw rows of the tabular test task (``replace``: columns to swap in or, given None, drop)."""
    from ftps.records import tables

    rng = np.random.default_rng(seed)
    cols = {"mean radius": [round(float(v), 2) for v in rng.normal(14.0, 3.5, n)],
            "smoker": [["no", "yes"][int(v)] for v in rng.random(n) < 0.1],
            "age": [int(v) for v in rng.integers(20, 90, n)],
            "diagnosis": [["benign", "malignant"][int(v)] for v in rng.integers(0, 2, n)]}
    for name, col in replace.items():
        if col is None:
            cols.pop(name.replace("_", " "))
        else:
            cols[name.replace("_", " ")] = col
    return tables.write_table(cols, fmt)


def _csrf_and_leave(page, url: str) -> str:
    """The session's CSRF token from ``url``'s form; then off the page, since a live page reloads
    itself as the session's state changes and would show (and so take) a flash message first."""
    page.goto(url)
    csrf = page.get_attribute("input[name=csrf]", "value")
    page.goto("about:blank")
    return csrf


def _post_file(page, url: str, csrf: str, field: str, name: str, data: bytes, **form: str) -> str:
    """A form's POST with one file, as the page's upload script sends it -> the text of the page it
    lands on (where the flash message is), unescaped."""
    import html as html_mod

    r = page.request.post(url, multipart={"csrf": csrf, **form, field: {
        "name": name, "mimeType": "application/octet-stream", "buffer": data}}, timeout=120_000)
    assert r.ok, r.status
    return html_mod.unescape(r.text())


def _flash_error(text: str) -> str:
    """The page's error message as one line, "STATUS: message" (the page shows the status as a label)."""
    m = re.search(r'<div class="flash error"[^>]*>(?:<span class="code">([^<]*)</span>)?([^<]*)</div>', text)
    if m is None:
        return ""
    return f"{m.group(1)}: {m.group(2)}" if m.group(1) else m.group(2)


@pytest.fixture(scope="module")
def tabular_task(browser, web, tokens, shots, stack):
    """The builder creates a tabular task on the create form from a schema JSON and uploads builder
    data as a CSV: the rows go through UploadBuilderData, raw, and the registry encodes them."""
    from clients.api import BuilderClient

    page = sign_in(browser, web, tokens["builder"])
    b = BuilderClient(registry=stack.addresses["registry"], gateway=stack.addresses["gateway"],
                      scorer=stack.addresses["scorer"], token=tokens["builder"])
    try:
        with screenshot_on_failure(page, shots, "tabular-builder"):
            tid = _create_task(page, "tabular", "tabular web", {"n_models": "8", "batch_threshold": "5000",
                                                                "shadow_models": "4", "models_per_job": "4"},
                               schema=TABULAR_SCHEMA)
            t = b.get_task(tid)
            assert t.settings.HasField("schema") and list(t.settings.record_shape) == [4]  # 2 numeric + 2 levels
            assert t.settings.num_classes == 2 and not t.settings.HasField("value_range")
            html = clean(page, tokens["builder"])
            assert "Rows (.csv or .parquet" in html
            yield {"tid": tid, "page": page, "builder": b}
    finally:
        b.close()
        page.context.close()


def test_tabular_builder_data_from_csv_and_bad_tables_store_nothing(web, tokens, tabular_task):
    tid, page, b = tabular_task["tid"], tabular_task["page"], tabular_task["builder"]
    csrf = _csrf_and_leave(page, f"{web}/tasks/{tid}")
    url = f"{web}/tasks/{tid}/upload"
    text = _post_file(page, url, csrf, "file", "builder.csv", _table(40, "csv"), kind="data")
    assert "uploading builder data: builder.csv" in text
    page.goto(f"{web}/tasks/{tid}")
    page.wait_for_selector("text=builder data v1 stored (builder.csv): 40 records", timeout=60_000)
    assert b.get_task(tid).builder_data.version == 1
    # A table with a column missing is refused on the page, before any upload starts.
    page.goto("about:blank")
    text = _post_file(page, url, csrf, "file", "builder.parquet", _table(40, "parquet", age=None), kind="data")
    assert _flash_error(text).startswith("INVALID_ARGUMENT: builder.parquet: missing column(s) 'age'")
    assert "uploading builder data: builder.parquet" not in text
    assert b.get_task(tid).builder_data.version == 1


def test_tabular_contributor_uploads_csv_and_parquet_and_bad_files_store_nothing(browser, web, tokens, stack,
                                                                                tabular_task, shots):
    from clients.api import ContributorClient

    tid = tabular_task["tid"]
    page = sign_in(browser, web, tokens["zed"])
    zed = ContributorClient(gateway=stack.addresses["gateway"], token=tokens["zed"])
    try:
        with screenshot_on_failure(page, shots, "tabular-contributor"):
            page.goto(f"{web}/tasks/{tid}")
            html = clean(page, tokens["zed"])
            assert "the label column <code>diagnosis</code> (benign, malignant)" in html
            assert page.get_attribute("#records", "accept") == ".csv,.parquet,.pq,.npz"
            url = f"{web}/tasks/{tid}/submit"
            csrf = _csrf_and_leave(page, f"{web}/tasks/{tid}")
            text = _post_file(page, url, csrf, "records", "mine.csv", _table(5, "csv", seed=1), source="file")
            assert "5 records stored" in text
            page.goto("about:blank")
            text = _post_file(page, url, csrf, "records", "mine.parquet", _table(7, "parquet", seed=2), source="file")
            assert "7 records stored" in text

            def stored() -> list[int]:
                return sorted(len(s.record_ids) for s in zed.list_submissions(tid))

            assert stored() == [5, 7]
            bad = [
                ("cols.csv", _table(3, "csv", smoker=None), "cols.csv: missing column(s) 'smoker'"),
                ("text.csv", _table(3, "csv", mean_radius=["12.5", "abc", "13"]),
                 "text.csv row 2, column 'mean radius': 'abc' is not a number"),
                ("text.parquet", _table(3, "parquet", mean_radius=[12.5, "n/a", 13.0]),
                 "text.parquet row 2, column 'mean radius': 'n/a' is not a number"),
                ("level.parquet", _table(3, "parquet", smoker=["no", "sometimes", "yes"]),
                 "level.parquet row 2, column 'smoker': 'sometimes' is not one of its levels ('no', 'yes')"),
                ("label.csv", _table(3, "csv", diagnosis=["benign", "unsure", "benign"]),
                 "label.csv row 2, column 'diagnosis': 'unsure' is not a class"),
                ("empty.csv", b"", "INVALID_ARGUMENT: empty.csv is empty"),
                ("header.csv", b"mean radius,smoker,age,diagnosis\n", "INVALID_ARGUMENT: header.csv holds no rows"),
                # 100,001 rows, about 1.3 MB: past the row limit, refused before any row is checked.
                ("huge.csv", b"mean radius,smoker,age,diagnosis\n" + b"14,no,50,benign\n" * 100_001,
                 "RESOURCE_EXHAUSTED: huge.csv has 100001 rows or more; at most 100000 per file"),
            ]
            for name, data, message in bad:
                page.goto("about:blank")
                text = _post_file(page, url, csrf, "records", name, data, source="file")
                assert message in _flash_error(text), (name, _flash_error(text))
                assert "records stored" not in text
            assert stored() == [5, 7]  # nothing stored by any refused file
            # The bar plot of a row's z-scores, from this session's own copy of the row only.
            rid = zed.list_submissions(tid)[0].record_ids[0]
            r = page.request.get(f"{web}/tasks/{tid}/records/{rid}/unusual.png")
            assert r.status == 200 and r.body()[:4] == b"\x89PNG"
            r = page.request.get(f"{web}/tasks/{tid}/records/{rid[:-1]}9/unusual.png")
            assert r.status == 404
            page.goto(f"{web}/tasks/{tid}")
            page.screenshot(path=str(shots / "tabular-contributor.png"), full_page=True)
    finally:
        zed.close()
        page.context.close()


def test_tabular_record_cards_show_the_row_and_why_it_is_exposed():
    """A tabular task's record cards, on the contributor's page (their own raw rows) and in the
    builder's batch view (rows from their local table): the values and the most unusual columns
    with z-scores, no thumbnail."""
    from clients.web import pages
    from clients.web.session import Session, SubmissionView
    from ftps.records.tabular import Schema
    from ftps.v1 import common_pb2, gateway_pb2, registry_pb2

    schema = Schema.from_json(json.dumps(TABULAR_SCHEMA))
    task = registry_pb2.Task(task_id="t-1", name="tab", settings=common_pb2.TaskSettings(
        record_shape=[schema.width], num_classes=2, schema=schema.to_proto()))
    x = np.array([[28.0, 0, 45], [14.0, 1, 50]])
    sub = gateway_pb2.Submission(submission_id="s-a", task_id="t-1", record_ids=["s-a-0", "s-a-1"])
    session = Session("s-test")
    session.subject, session.role = "alice", "contributor"
    scores = [common_pb2.RecordScore(record_id=f"s-a-{j}", contributor="alice", round_id="r-1", index=j,
                                     score=0.5 - j / 4, score_ci_low=0.1, score_ci_high=0.7, n_in=4, n_out=4)
              for j in range(2)]
    html = pages.contributor_task_page(session, task, scores, dataset=None, page=0,
                                       subs=[SubmissionView(sub, x, np.array([1, 0]), "mine.csv")], rounds=[])
    first = html.split('data-record="s-a-0"')[1].split("</section>")[0]
    assert "Why this row is exposed" in first and "thumb.png" not in first
    assert "<tr><td>mean radius</td><td class=\"num\">28</td><td class=\"num\">+4.00</td>" in first
    assert 'src="/tasks/t-1/records/s-a-0/unusual.png"' in first
    second = html.split('data-record="s-a-1"')[1].split("</section>")[0]
    assert "<tr><td>smoker</td><td class=\"num\">yes</td><td class=\"num\">—</td>" in second
    assert "a <code>.csv</code> or <code>.parquet</code> table" in html.lower()

    # The builder's batch view: only rows the builder loaded from their own copy, here encoded ones.
    session.role, session.subject = "builder", "acme"
    session.local_records["s-a-1"] = (schema.encode(x[1:])[0], 0)
    scored = gateway_pb2.GetScoresResponse(scores=scores)
    html = pages.batch_page(session, task, scored, {})
    assert "Why this row is exposed" not in html.split('data-record="s-a-0"')[1].split("</section>")[0]
    second = html.split('data-record="s-a-1"')[1].split("</section>")[0]
    assert "<tr><td>smoker</td><td class=\"num\">yes</td>" in second and "thumb.png" not in second
    assert "Load rows" in html


def test_breast_cancer_demo_task_through_the_pages(browser, web, tokens, stack, shots):
    """The tabular demo data set on the create form: the task gets ftps-stack demo's schema, the
    builder's demo split goes up as raw rows, and a contributor picks rows from the sample set
    (a table of rows, not thumbnails)."""
    from clients.api import BuilderClient
    from clients.web import assets

    page = sign_in(browser, web, tokens["builder"])
    b = BuilderClient(registry=stack.addresses["registry"], gateway=stack.addresses["gateway"],
                      scorer=stack.addresses["scorer"], token=tokens["builder"])
    contributor = sign_in(browser, web, tokens["bob"])
    try:
        with screenshot_on_failure(page, shots, "breast-cancer-builder"):
            tid = _create_task(page, "breast-cancer", "breast cancer web",
                               {"n_models": "8", "batch_threshold": "5000", "shadow_models": "4",
                                "models_per_job": "4"})
            t = b.get_task(tid)
            assert [f.name for f in t.settings.schema.features] == assets.demo_schema("breast-cancer").names
            assert t.settings.num_classes == 2 and list(t.settings.record_shape) == [30]
            press(page, "Use the demo builder split")
            page.wait_for_selector("text=builder data v1 stored (demo builder split of breast-cancer): 150 records",
                                   timeout=60_000)
            assert b.get_task(tid).builder_data.version == 1
        with screenshot_on_failure(contributor, shots, "breast-cancer-contributor"):
            contributor.goto(f"{web}/tasks/{tid}")
            rows = contributor.locator(".samplerows tr:has(input[name=pick])")
            assert rows.count() == assets.SAMPLE_PAGE
            assert "mean radius" in contributor.inner_text(".samplerows th:nth-child(3)")
            assert contributor.locator(".gallery img").count() == 0
            for i in range(2):
                rows.nth(i).locator("input").check()
            contributor.fill("#random_n", "1")
            press(contributor, "Submit the picked records")
            contributor.wait_for_selector("text=3 records stored")
            contributor.screenshot(path=str(shots / "breast-cancer-contributor.png"), full_page=True)
    finally:
        b.close()
        contributor.context.close()
        page.context.close()


def test_tabular_demo_assets_are_raw_rows_and_found_by_schema():
    from clients.web import assets
    from ftps.records.tabular import Schema
    from ftps.v1 import common_pb2

    schema = assets.demo_schema("breast-cancer")
    demo = common_pb2.TaskSettings(num_classes=2, schema=schema.to_proto())
    assert assets.dataset_for_task(demo) == "breast-cancer"
    own = common_pb2.TaskSettings(num_classes=2, schema=Schema.from_json(json.dumps(TABULAR_SCHEMA)).to_proto())
    assert assets.dataset_for_task(own) is None
    assert assets.dataset_for_task(common_pb2.TaskSettings(record_shape=[1, 8, 8])) == "digits"
    x, y, idx = assets.pick_samples("breast-cancer", ["0"], "2", seed=0)
    assert x.shape == (3, 30) and idx[0] == 0 and set(y) <= {0, 1}
    schema.check_rows(x)  # raw values, inside the schema's ranges
    bx, _ = assets.builder_data("breast-cancer")
    assert bx.shape == (150, 30) and float(bx[:, 0].mean()) > 5  # mean radius in millimetres, not standardised


# -- issue 15: contributor-level masks, growing a round, comparing recipes ------------------------

@pytest.fixture(scope="module")
def masked_round(browser, web, tokens, shots, stack, digits_splits, digits_strategy, digits_base_weights):
    """A task created on the form with contributor-level masks (digits, n = 4, m = 16); its assets
    uploaded and 16 contributors' records (one each, Alice's among them) submitted through the
    client library, which starts its round; the round DONE."""
    from clients.api import BuilderClient, ContributorClient
    from ftps.common.task_rules import MIN_CONTRIBUTORS
    from ftps.v1 import common_pb2

    page = sign_in(browser, web, tokens["builder"])
    a = stack.addresses
    b = BuilderClient(registry=a["registry"], gateway=a["gateway"], scorer=a["scorer"], token=tokens["builder"])
    signer = stack.signer()
    names = ["alice"] + [f"user{k:02d}" for k in range(1, MIN_CONTRIBUTORS)]
    clients = {who: ContributorClient(gateway=a["gateway"], contributor=who,
                                      token=tokens["alice"] if who == "alice" else signer.issue(who, "contributor"))
               for who in names}
    try:
        with screenshot_on_failure(page, shots, "masks-builder"):
            assert "at least 16 contributors" in page.inner_text("form[action='/tasks']")
            tid = _create_task(page, "digits", "whole contributions",
                               {"n_models": "4", "batch_threshold": "16", "shadow_models": "2",
                                "models_per_job": "4"}, mask_unit="contributor")
            assert b.get_task(tid).settings.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR
            assert "contributor-level masks" in page.locator("p.sub").nth(1).inner_text()
            b.upload(tid, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
            b.upload(tid, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
            b.upload(tid, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
            x, y = digits_records(digits_splits, len(names), seed=31)
            subs = {who: clients[who].submit(tid, x[k:k + 1], y[k:k + 1]) for k, who in enumerate(names)}
            deadline = time.monotonic() + 60
            while not (sub := clients["alice"].get_submission(subs["alice"].submission_id)).round_id:
                assert time.monotonic() < deadline, "16 contributors' records did not start a round"
                time.sleep(0.2)
            for status in b.watch_round(sub.round_id, timeout=300):
                pass
            assert status.state == common_pb2.ROUND_STATE_DONE, status.message
            yield {"tid": tid, "rid": sub.round_id, "page": page, "builder": b, "names": names}
    finally:
        for c in [b, *clients.values()]:
            c.close()
        page.context.close()


def _zip_page(page, url: str) -> tuple[str, list[str]]:
    """A report.zip download -> (its report.html, its file names)."""
    import zipfile

    r = page.request.get(url, timeout=120_000)
    assert r.ok, r.text()
    with zipfile.ZipFile(io.BytesIO(r.body())) as z:
        names = z.namelist()
        return z.read(next(n for n in names if n.endswith("report.html"))).decode(), names


def test_a_contributor_and_the_builder_see_whole_contribution_scores(browser, web, tokens, shots, masked_round):
    tid, rid, b = masked_round["tid"], masked_round["rid"], masked_round["builder"]
    whole = {c.contributor: c for c in b.get_round(rid).contributor_scores}
    assert sorted(whole) == sorted(masked_round["names"])
    mine = whole["alice"]
    page = sign_in(browser, web, tokens["alice"])
    try:
        with screenshot_on_failure(page, shots, "masks-contributor"):
            page.goto(f"{web}/tasks/{tid}")
            page.wait_for_selector("h3#contribution")
            rows = page.locator("table.contributions tr:has(td)")
            assert rows.count() == 1  # her own contribution only
            row = rows.first.inner_text()
            assert "alice" in row and rid in row and f"{mine.score:+.2f}" in row
            assert f"[{mine.score_ci_low:+.2f}, {mine.score_ci_high:+.2f}]" in row
            assert f"{mine.empirical_epsilon:.2f} [{mine.empirical_epsilon_ci_low:.2f}, " in row
            assert f"at δ = {mine.delta:g}" in row
            html = clean(page, tokens["alice"])
            assert not any(f">{who}<" in html for who in masked_round["names"] if who != "alice")
            page.screenshot(path=str(shots / "masks-contributor.png"), full_page=True)
            report, _ = _zip_page(page, f"{web}/tasks/{tid}/report.zip")
            section = report.split("Whole contributions (contributor-level masks)")[1]
            assert "your whole" in section and f"{mine.score:+.2f}" in section and "user01" not in section
    finally:
        page.context.close()
    # The builder: everyone's, in the batch view and its report.
    bpage = masked_round["page"]
    bpage.goto(f"{web}/tasks/{tid}/batch")
    assert bpage.locator("table.contributions tr:has(td)").count() == len(whole)
    report, _ = _zip_page(bpage, f"{web}/tasks/{tid}/report.zip")
    section = report.split("Whole contributions (contributor-level masks)")[1]
    assert all(f"<td>{who}</td>" in section for who in whole)


def test_builder_compares_recipes_on_the_batch_view(browser, web, tokens, shots, masked_round,
                                                    digits_strategy):
    from ftps.v1 import common_pb2

    tid, rid, b, page = masked_round["tid"], masked_round["rid"], masked_round["builder"], masked_round["page"]
    with screenshot_on_failure(page, shots, "compare"):
        # Refused before anything runs: the service's message on the page, as other refusals are.
        csrf = _csrf_and_leave(page, f"{web}/tasks/{tid}/batch")
        text = _post_file(page, f"{web}/tasks/{tid}/rounds/{rid}/compare", csrf, "recipe_file_1", "broken.py",
                          b"def build_model(:\n", recipe_name_1="broken")
        assert "INVALID_ARGUMENT" in text and "syntax error at line 1" in text
        fewer = digits_strategy.replace('"epochs": 15', '"epochs": 3')
        assert fewer != digits_strategy
        page.goto(f"{web}/tasks/{tid}/batch")
        page.fill(f"#recipe-name-{rid}-1", "fewer-epochs")
        page.set_input_files(f"#recipe-file-{rid}-1", {"name": "fewer.py", "mimeType": "text/x-python",
                                                     "buffer": fewer.encode()})
        press(page, "Compare recipes")
        # Progress while it runs (a job following GetComparison), then the page reloads itself with the plot.
        page.wait_for_selector("[data-live^='job-']", timeout=60_000)
        page.wait_for_selector("img[alt^='risk against utility']", timeout=ROUND_TIMEOUT_MS)
        _wait_images(page)
        c = b.get_comparison(rid)
        assert [v.name for v in c.variants] == ["current", "fewer-epochs"]
        assert all(v.status.state == common_pb2.ROUND_STATE_DONE for v in c.variants)
        table = page.inner_text("table.comparison")
        for v in c.variants:
            assert f"{v.heldout_accuracy:.3f}" in table and f"{v.batch.auc:.3f}" in table
            assert f"{sum(s.score_ci_low > 0 for s in v.scores)} of {len(v.scores)}" in table
        assert "under every recipe" in page.inner_text("main")
        assert all(r in page.inner_text("main") for r in c.exposed_everywhere)
        page.screenshot(path=str(shots / "compare-batch-view.png"), full_page=True)
        r = page.request.get(f"{web}/tasks/{tid}/rounds/{rid}/comparison.png")
        assert r.ok and r.body()[:8] == b"\x89PNG\r\n\x1a\n"
        report, files = _zip_page(page, f"{web}/tasks/{tid}/report.zip")
        assert f"report-{tid}/comparison-{rid}.png" in files
        section = report.split("Recipes compared on round")[1]
        assert "fewer-epochs" in section and f"{c.variants[1].heldout_accuracy:.3f}" in section
    # Not a contributor's to see: GetComparison refuses their token, and the page says so.
    alice = sign_in(browser, web, tokens["alice"])
    try:
        r = alice.request.get(f"{web}/tasks/{tid}/rounds/{rid}/comparison.png")
        assert r.status == 403 and "PERMISSION_DENIED" in r.text()
    finally:
        alice.context.close()


def test_builder_grows_a_round_from_the_batch_view(web, tokens, shots, masked_round):
    tid, rid, b, page = masked_round["tid"], masked_round["rid"], masked_round["builder"], masked_round["page"]
    with screenshot_on_failure(page, shots, "grow"):
        csrf = _csrf_and_leave(page, f"{web}/tasks/{tid}/batch")
        r = page.request.post(f"{web}/tasks/{tid}/rounds/{rid}/grow", form={"csrf": csrf, "add_models": "3"})
        assert r.ok and r.url.endswith(f"/tasks/{tid}/batch")  # back on the batch view, with the refusal
        assert "INVALID_ARGUMENT" in r.text() and "even" in r.text()
        assert b.get_round(rid).batch.n_models == 4
        page.goto(f"{web}/tasks/{tid}/batch")
        assert page.input_value(f"#add-{rid}") == "4"  # the task's n by default
        page.fill(f"#add-{rid}", "2")
        press(page, "Add models")
        page.wait_for_selector("text=is growing to 6 models")
        page.wait_for_selector(f"[data-live='round-{rid}']")
        # The page follows the growth live and reloads itself when it ends.
        page.locator("h3", has_text="16 records, 6 models").wait_for(timeout=ROUND_TIMEOUT_MS)
        assert page.get_attribute(f"[data-live='round-{rid}']", "data-state") == "done"
        result = b.get_round(rid)
        assert result.batch.n_models == 6 and all(s.n_in + s.n_out == 6 for s in result.scores)
        assert all(c.n_in + c.n_out == 6 for c in result.contributor_scores)
        clean(page, tokens["builder"])
        page.screenshot(path=str(shots / "grow-batch-view.png"), full_page=True)
