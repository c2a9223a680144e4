"""The web client in a real browser: headless Chromium from Debian (``/usr/bin/chromium``) driven
by Playwright, against the embedded stack (ephemeral ports, a tmp data dir, tokens from the stack's
signer) and a tiny digits task (n = 8 models, m = 16 records, 4 models per worker job).

Scenarios: a builder creates a task, uploads base model / strategy (hyperparameters edited) / data
and runs the preparation stage; a contributor submits records from the sample set and a file and
sees their scores after the round; the builder starts a round and reads the batch view; another
contributor's token sees none of it; forms refuse a POST without the CSRF token or from another
origin. Screenshots go to ``$FTPS_WEB_SCREENS`` (or a tmp dir); look at them after a change.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ftps.common import serde
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


def _builder_setup(page, tokens, shots, digits_base_weights) -> str:
    page.select_option("#dataset", "digits")
    page.fill("#name", "digits web demo")
    for field, value in (("n_models", "8"), ("batch_threshold", "16"), ("shadow_models", "4"),
                         ("models_per_job", "4")):
        page.fill(f"#{field}", value)
    press(page, "Create task")
    page.wait_for_url(re.compile(r".*/tasks/t-[0-9a-f]+$"))
    tid = page.url.rsplit("/", 1)[1]
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
                                      "buffer": serde.records_to_npz(x, y)})
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
                                                 "buffer": serde.records_to_npz(mine["x"], mine["y"],
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
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 1, 8, 8)))
    with pytest.raises(assets.AssetError, match="arrays x"):
        assets.load_npz_upload(buf.getvalue())
    with pytest.raises(assets.AssetError, match="empty"):
        assets.load_npz_upload(b"")
    buf = io.BytesIO()
    np.savez(buf, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(assets.AssetError, match="pickle"):
        assets.load_npz_upload(buf.getvalue())


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
