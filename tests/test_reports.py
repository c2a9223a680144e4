"""Client tools end to end: records from an .npz and from a folder of images, a real digits round on
the embedded stack, the contributor's and the builder's HTML reports (headlined by the model-based
score, as the web client is), and where settings come from."""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from clients import reports
from clients.builder.cli import main as builder_main
from ftps.common.errors import InvalidArgument
from ftps.records.files import Expect
from ftps.records.files import load as load_file
from ftps.records.images import save_folder as save_image_folder
from ftps.records.tabular import Feature, Schema


def load_records(path, *, shape=None, num_classes=None):
    return load_file(path, Expect(shape=shape, num_classes=num_classes))
from clients.contributor.cli import build_parser as contributor_parser
from clients.contributor.cli import main as contributor_main
from clients.reports import reading
from ftps.common import archives
from stack.embedded import EmbeddedStack
from ftps.v1 import common_pb2
from tests.conftest import digits_records

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """No developer's ~/.config/ftps or FTPS_* address variables leak into the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ("FTPS_GATEWAY_ADDR", "FTPS_REGISTRY_ADDR", "FTPS_SCORER_ADDR", "FTPS_TOKEN",
                "FTPS_TLS_CA_FILE", "FTPS_CONTRIBUTOR"):
        monkeypatch.delenv(var, raising=False)


def _run(fn, argv, capsys, *, code=0) -> str:
    capsys.readouterr()
    rc = fn(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    return out if code == 0 else err


@pytest.fixture(scope="module")
def scored(tmp_path_factory, digits_splits, digits_strategy, digits_base_weights):
    """One finished round: 8 models, 16 records; alice submits an .npz, bob a folder of images."""
    tmp = tmp_path_factory.mktemp("reports")
    s = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                      data_dir=tmp / "data")
    s.start()
    signer = s.signer()
    a = s.addresses
    b = ["--registry", a["registry"], "--gateway", a["gateway"], "--scorer", a["scorer"],
         "--token", signer.issue("acme", "builder")]
    tokens = {who: signer.issue(who, "contributor") for who in ("alice", "bob", "carol")}

    def c(who):
        return ["--gateway", a["gateway"], "--registry", a["registry"], "--token", tokens[who]]

    def jcall(fn, argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert fn(argv + ["--json"]) == 0
        return json.loads(buf.getvalue())

    try:
        task = jcall(builder_main, b + ["create-task", "--name", "reports", "--record-shape", "1,8,8",
                                        "--models", "8", "--batch-threshold", "16", "--shadow-models", "4",
                                        "--models-per-job", "4"])["task_id"]
        (tmp / "w.safetensors").write_bytes(digits_base_weights)
        (tmp / "s.py").write_text(digits_strategy)
        (tmp / "d.npz").write_bytes(archives.records_to_npz(*digits_splits["builder"]))
        for kind, f in (("base-model", "w.safetensors"), ("strategy", "s.py"), ("data", "d.npz")):
            jcall(builder_main, b + ["upload", "--task", task, "--kind", kind, str(tmp / f)])
        jcall(builder_main, b + ["prepare", "--task", task])  # so offline-global is in the batch view

        x, y = digits_records(digits_splits, 16, seed=5)
        (tmp / "alice.npz").write_bytes(archives.records_to_npz(x[:8], y[:8]))
        save_image_folder(tmp / "bob_images", x[8:], y[8:])
        subs = {"alice": jcall(contributor_main, c("alice") + ["submit", "--task", task, str(tmp / "alice.npz")]),
                "bob": jcall(contributor_main, c("bob") + ["submit", "--task", task, str(tmp / "bob_images")])}
        deadline = time.time() + 30
        while not (sub := jcall(contributor_main, c("bob") + ["submission", subs["bob"]["submission_id"]]))["round_id"]:
            assert time.time() < deadline, "the 16th record did not start a round"
            time.sleep(0.2)
        assert builder_main(b + ["watch", "--round", sub["round_id"]]) == 0
        yield dict(task=task, round=sub["round_id"], b=b, c=c, tmp=tmp, subs=subs, x=x, y=y, addresses=a,
                   tokens=tokens)
    finally:
        s.stop()


def _ids(scored, who):
    return scored["subs"][who]["record_ids"]


def _check_pngs(files: dict) -> None:
    assert files["pngs"]
    for p in files["pngs"]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100, p


def _headline_reading(r: dict) -> str:
    """The reading a report shows for a record of ``--json`` output: of its model-based score."""
    return html.escape(reading(r["score"], r["score_ci_low"], r["score_ci_high"],
                               n_models=r["n_in"] + r["n_out"]))


def _card_order(page: str) -> list[str]:
    return re.findall(r'<section class="record" id="[^"]+" data-record="([^"]+)"', page)


def _self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    for src in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert src.startswith("#") or not re.match(r"^[a-z]+:|^/|\.\.", src), src


def test_images_folder_submission_round_trips(scored, capsys):
    # bob's images went through PNG (8-bit) and came back as the same records the service stored.
    c = scored["c"]
    bob = json.loads(_run(contributor_main, c("bob") + ["scores", "--task", scored["task"], "--json"], capsys))
    assert [r["record_id"] for r in bob["records"]] == _ids(scored, "bob")
    recs = load_records(scored["tmp"] / "bob_images", shape=(1, 8, 8))
    np.testing.assert_allclose(recs.x, scored["x"][8:], atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(recs.y, scored["y"][8:])


def test_contributor_report(scored, tmp_path, capsys):
    c, task = scored["c"], scored["task"]
    out = tmp_path / "alice"
    files = json.loads(_run(contributor_main, c("alice") + [
        "report", "--task", task, "--out", str(out), "--records", str(scored["tmp"] / "alice.npz"), "--json"], capsys))
    page = Path(files["html"]).read_text()
    scores = json.loads(_run(contributor_main, c("alice") + ["scores", "--task", task, "--json"], capsys))["records"]
    assert {r["record_id"] for r in scores} == set(_ids(scored, "alice")) and len(scores) == 8
    for r in scores:
        assert r["record_id"] in page
        assert r["n_in"] + r["n_out"] == 8 and r["score_ci_low"] <= r["score"] <= r["score_ci_high"]
        assert _headline_reading(r) in page
        # The counted P is still there, secondary, in the record's facts line.
        assert f"counted P {r['counted_p']:+.2f} [{r['counted_p_ci_low']:+.2f}, {r['counted_p_ci_high']:+.2f}]" in page
        assert (out / "records" / f"diag-{r['record_id']}.png").stat().st_size > 1000
        assert (out / "records" / f"thumb-{r['record_id']}.png").stat().st_size > 50  # from --records
    assert "more often than chance" in page and "Summary" in page
    # Highest model-based score first.
    assert _card_order(page) == [r["record_id"] for r in sorted(
        scores, key=lambda r: (-r["score"], -r["score_ci_low"], r["record_id"]))]
    for rid in _ids(scored, "bob"):  # another contributor's records never appear
        assert rid not in page
    assert len(files["pngs"]) == 1 + 2 * 8  # scores.png + diagnosis and thumbnail per record
    _check_pngs(files)
    _self_contained(page)
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith("record_id,contributor")
    assert not any(rid in "".join(rows) for rid in _ids(scored, "bob"))

    # bob reads his thumbnails from his image folder; the shape comes from the task (GetTask).
    bob_out = tmp_path / "bob"
    _run(contributor_main, c("bob") + ["report", "--task", task, "--out", str(bob_out),
                                       "--records", str(scored["tmp"] / "bob_images")], capsys)
    bob_page = (bob_out / "report.html").read_text()
    assert all(rid in bob_page for rid in _ids(scored, "bob"))
    assert not any(rid in bob_page for rid in _ids(scored, "alice"))
    assert len(list((bob_out / "records").glob("thumb-*.png"))) == 8

    # carol has no records in the task: an empty report, no one else's ids.
    carol = tmp_path / "carol"
    _run(contributor_main, c("carol") + ["report", "--task", task, "--out", str(carol)], capsys)
    carol_page = (carol / "report.html").read_text()
    assert "No scores yet" in carol_page
    assert not any(rid in carol_page for rid in _ids(scored, "alice") + _ids(scored, "bob"))

    if os.path.exists(CHROMIUM):  # look at it as a person would
        shot = tmp_path / "contributor.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,2400", f"--screenshot={shot}", files["html"]],
                       check=True, timeout=60, capture_output=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("FTPS_REPORT_SCREENSHOTS"):
            shutil.copy(shot, Path(os.environ["FTPS_REPORT_SCREENSHOTS"]) / "contributor.png")
            shutil.copytree(out, Path(os.environ["FTPS_REPORT_SCREENSHOTS"]) / "contributor", dirs_exist_ok=True)


def test_builder_report(scored, tmp_path, capsys):
    b, task = scored["b"], scored["task"]
    out = tmp_path / "batch"
    files = json.loads(_run(builder_main, b + ["report", "--task", task, "--out", str(out), "--json"], capsys))
    page = Path(files["html"]).read_text()
    everything = json.loads(_run(builder_main, b + ["scores", "--task", task, "--json"], capsys))
    assert len(everything["records"]) == 16
    ranked = sorted(everything["records"], key=lambda r: (-r["score"], -r["score_ci_low"], r["record_id"]))
    for r in ranked:
        assert r["record_id"] in page
        assert _headline_reading(r) in page  # the all-records table's reading column
    for method in ("offline-global", "offline-per-record", "online-per-record"):
        assert method in page
    assert (out / "scores.png").stat().st_size > 1000
    assert (out / f"roc-{scored['round']}.png").stat().st_size > 1000
    assert "TPR @ 1% FPR" in page and "TPR @ 0.1% FPR" in page and "Highest-risk records" in page
    assert _card_order(page) == [r["record_id"] for r in ranked[:10]]  # the top 10 by the model-based score
    table = page.split("<h2>All records")[1]
    assert re.findall(r'<td class="rid"><span class="mono">([^<]+)</span>', table) == [r["record_id"] for r in ranked]
    # No thumbnails without a local file, and the page says why.
    assert not list((out / "records").glob("thumb-*")) and "never gives a builder raw records" in page
    # No recipes were compared on the round (GetComparison: NOT_FOUND) and its masks are per record: neither section.
    assert "Recipes compared" not in page and "Whole contributions" not in page
    _check_pngs(files)
    _self_contained(page)

    # The builder's own local copy of alice's submission gives thumbnails of her records only.
    sub_id = scored["subs"]["alice"]["submission_id"]
    out2 = tmp_path / "batch2"
    _run(builder_main, b + ["report", "--task", task, "--round", scored["round"], "--out", str(out2), "--top", "16",
                            "--records", f"{sub_id}={scored['tmp'] / 'alice.npz'}"], capsys)
    thumbs = {p.name for p in (out2 / "records").glob("thumb-*.png")}
    assert thumbs == {f"thumb-{rid}.png" for rid in _ids(scored, "alice")}

    if os.path.exists(CHROMIUM) and os.environ.get("FTPS_REPORT_SCREENSHOTS"):
        dest = Path(os.environ["FTPS_REPORT_SCREENSHOTS"])
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,4000", f"--screenshot={dest / 'builder.png'}", str(out2 / "report.html")],
                       check=True, timeout=60, capture_output=True)
        shutil.copytree(out2, dest / "builder", dirs_exist_ok=True)


def test_reports_refuse_with_meaningful_exit_codes(scored, tmp_path, capsys):
    c, task = scored["c"], scored["task"]
    err = _run(contributor_main, c("alice") + ["report", "--task", task, "--out", str(tmp_path / "r"),
                                               "--records", str(tmp_path / "missing.npz")], capsys, code=2)
    assert err.strip().count("\n") == 0 and "not found" in err
    short = tmp_path / "short.npz"
    short.write_bytes(archives.records_to_npz(scored["x"][:3], scored["y"][:3]))
    err = _run(contributor_main, c("alice") + ["report", "--task", task, "--out", str(tmp_path / "r"),
                                               "--records", str(short)], capsys, code=2)
    assert "has 3 records" in err
    err = _run(contributor_main, c("alice") + ["report", "--task", "t-nope", "--out", str(tmp_path / "r")],
               capsys, code=1)
    assert err.startswith("ftps-contributor: error: ") and err.strip().count("\n") == 0
    other = ["--registry", scored["addresses"]["registry"], "--gateway", scored["addresses"]["gateway"],
             "--scorer", scored["addresses"]["scorer"], "--token", scored["tokens"]["alice"]]
    err = _run(builder_main, other + ["report", "--task", task, "--out", str(tmp_path / "b")], capsys, code=1)
    assert "PERMISSION_DENIED" in err


def test_image_folder_input(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 3, 5, 4)).astype(np.float32) / 255  # 3 records, C,H,W = 3,5,4
    y = np.array([0, 2, 1])
    save_image_folder(tmp_path / "rgb", rgb, y)
    back = load_records(tmp_path / "rgb", shape=(3, 5, 4))
    np.testing.assert_allclose(back.x, rgb, atol=1e-6)
    np.testing.assert_array_equal(back.y, y)
    assert back.x.dtype == np.float32 and back.y.dtype == np.int64
    gray = load_records(tmp_path / "rgb", shape=(1, 5, 4))  # converted to grayscale to fit the task
    assert gray.x.shape == (3, 1, 5, 4) and 0 <= gray.x.min() and gray.x.max() <= 1

    with pytest.raises(InvalidArgument, match="4x5 pixels, the task's records are 8x8"):
        load_records(tmp_path / "rgb", shape=(1, 8, 8))
    with pytest.raises(InvalidArgument, match="out of range: the task has 2 classes"):
        load_records(tmp_path / "rgb", shape=(3, 5, 4), num_classes=2)
    (tmp_path / "rgb" / "labels.csv").write_text("file,label\n00000.png,cat\n")
    with pytest.raises(InvalidArgument, match=r"line 2: label 'cat' is not a class index"):
        load_records(tmp_path / "rgb", shape=(3, 5, 4))
    (tmp_path / "rgb" / "labels.csv").write_text("file,label\nnope.png,1\n")
    with pytest.raises(InvalidArgument, match="nope.png not found"):
        load_records(tmp_path / "rgb", shape=(3, 5, 4))
    (tmp_path / "rgb" / "labels.csv").write_text("file,label\n../x.png,1\n")
    with pytest.raises(InvalidArgument, match="not a file inside"):
        load_records(tmp_path / "rgb", shape=(3, 5, 4))
    (tmp_path / "rgb" / "labels.csv").write_text("name,class\n")
    with pytest.raises(InvalidArgument, match="columns file,label"):
        load_records(tmp_path / "rgb", shape=(3, 5, 4))
    (tmp_path / "rgb" / "labels.csv").unlink()
    with pytest.raises(InvalidArgument, match="no labels.csv"):
        load_records(tmp_path / "rgb", shape=(3, 5, 4))
    # Through the tool: one line, exit 2, nothing sent.
    err = _run(contributor_main, ["--gateway", "127.0.0.1:1", "submit", "--task", "t-x", "--shape", "1,8,8",
                                  str(tmp_path / "rgb")], capsys, code=2)
    assert err == f"ftps-contributor: error: {tmp_path / 'rgb'}: no labels.csv (a CSV with columns file,label)\n"


def test_settings_precedence(tmp_path, monkeypatch, capsys):
    from clients.cli_common import resolve_settings

    def settings(argv):
        args = contributor_parser().parse_args(argv + ["scores", "--task", "t"])
        resolve_settings(args)
        return args

    assert settings([]).gateway == "127.0.0.1:50051"  # default
    cfg = tmp_path / "xdg" / "ftps" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('gateway = "cfg:1"\nregistry = "cfg:2"\ntoken = "from-config"\ntls_ca = "ca.pem"\n')
    cfg.chmod(0o600)
    args = settings([])
    assert (args.gateway, args.registry, args.token) == ("cfg:1", "cfg:2", "from-config")
    assert args.tls_ca == str(cfg.parent / "ca.pem")  # relative to the config file
    monkeypatch.setenv("FTPS_GATEWAY_ADDR", "env:1")
    assert settings([]).gateway == "env:1" and settings([]).registry == "cfg:2"
    assert settings(["--gateway", "flag:1"]).gateway == "flag:1"
    other = tmp_path / "other.toml"
    other.write_text('contributor = "zoe"\n')
    args = settings(["--config", str(other)])
    assert (args.contributor, args.registry, args.gateway) == ("zoe", "127.0.0.1:50052", "env:1")

    other.write_text('gatway = "x"\n')
    err = _run(contributor_main, ["--config", str(other), "scores", "--task", "t"], capsys, code=2)
    assert "unknown key 'gatway'" in err and err.count("\n") == 1
    other.write_text("gateway = \n")
    assert "not valid TOML" in _run(contributor_main, ["--config", str(other), "scores", "--task", "t"], capsys, code=2)
    err = _run(contributor_main, ["--config", str(tmp_path / "none.toml"), "scores", "--task", "t"], capsys, code=2)
    assert "not found" in err


def test_config_file_drives_the_real_tools(scored, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "alice.toml"
    cfg.write_text(f'gateway = "{scored["addresses"]["gateway"]}"\ntoken = "{scored["tokens"]["alice"]}"\n')
    cfg.chmod(0o600)
    out = json.loads(_run(contributor_main, ["--config", str(cfg), "scores", "--task", scored["task"], "--json"],
                          capsys))
    assert [r["record_id"] for r in out["records"]] == _ids(scored, "alice")
    # A flag beats the file: bob's token with alice's config reads bob's records.
    out = json.loads(_run(contributor_main, ["--config", str(cfg), "--token", scored["tokens"]["bob"], "scores",
                                             "--task", scored["task"], "--json"], capsys))
    assert [r["record_id"] for r in out["records"]] == _ids(scored, "bob")


def test_readings_say_what_the_interval_allows():
    assert reading(0.30, 0.05, 0.55).startswith(
        "An attacker who can train models like this one identifies this record's membership 30% more often "
        "than chance (95% interval +5% to +55%)")
    narrow = reading(0.02, -0.10, 0.15)
    assert narrow.startswith("No better than chance (the interval includes 0") and "not ruled out" not in narrow
    wide = reading(0.25, -0.40, 0.80, n_models=8)
    assert "No better than chance" in wide and "up to 80% is not ruled out with 8 models" in wide
    assert "worse than chance" in reading(-0.6, -0.9, -0.2) and "not a protection" in reading(-0.6, -0.9, -0.2)
    assert "+0.3%" in reading(0.5, 0.003, 0.9)  # a bound just above 0 is not printed as "0%"


def test_diagnosis_rule_matches_the_model_based_score():
    from scipy import stats

    from clients.report_plots import decision_rule, diagnosis_png, fitted_rates

    # Equal variances: the likelihood-ratio threshold is the midpoint and TPR - FPR = 2 Phi(d'/2) - 1.
    g = dict(mu_in=1.0, sigma_in=1.0, mu_out=0.0, sigma_out=1.0)
    rule = decision_rule("online-per-record", **g)
    np.testing.assert_allclose(rule.thresholds, [0.5])
    tpr, fpr = fitted_rates(rule, **g)
    np.testing.assert_allclose(tpr - fpr, 2 * stats.norm.cdf(0.5) - 1)
    off = decision_rule("offline-per-record", **g, alpha=0.05)
    np.testing.assert_allclose(fitted_rates(off, **g)[1], 0.05)  # the OUT p-value test's FPR is alpha
    assert decision_rule("rmia", **g) is None and decision_rule("offline-global", **g) is None
    for kwargs in (dict(g, sigma_in=0.0), dict(g, mu_in=float("nan")), dict(g, mu_in=40.0)):
        png = diagnosis_png(**kwargs, method="online-per-record", title="t")
        assert png[:4] == b"\x89PNG"
    assert diagnosis_png(**g, method="offline-global", title="t", note="builder only")[:4] == b"\x89PNG"


def _score(rid: str, p: tuple[float, float, float], model: tuple[float, float, float], *,
           contributor: str = "alice") -> common_pb2.RecordScore:
    return common_pb2.RecordScore(
        record_id=rid, contributor=contributor, round_id="r-1", index=int(rid.rsplit("-", 1)[1]),
        counted_p=p[0], counted_p_ci_low=p[1], counted_p_ci_high=p[2], score=model[0], score_ci_low=model[1],
        score_ci_high=model[2], n_in=16, n_out=16, auc=0.7, mu_in=1.0, sigma_in=1.0, mu_out=0.0, sigma_out=1.0,
        method=common_pb2.METHOD_ONLINE_PER_RECORD)


def test_reports_headline_the_model_based_score(tmp_path, monkeypatch):
    """A record whose model-based score differs from its counted P is ranked, read, counted and
    drawn by the model-based one, in both reports; its counted P stays on the page, secondary.
    A round scored before the model-based interval existed falls back to P."""
    from clients import report_plots
    from ftps.privacy import plots

    low_model = _score("s-a-0", (0.90, 0.70, 1.00), (0.10, -0.05, 0.25))  # counted P says high, model says not
    high_model = _score("s-a-1", (0.20, -0.10, 0.50), (0.60, 0.45, 0.75))  # the reverse
    legacy = _score("s-a-2", (0.40, 0.10, 0.70), (0.0, 0.0, 0.0))  # no model-based interval: P is the headline
    scores = [low_model, high_model, legacy]
    titles, figures = [], []
    diagnosis_png, scores_png = report_plots.diagnosis_png, plots.scores_with_intervals_png
    monkeypatch.setattr(report_plots, "diagnosis_png", lambda **kw: titles.append(kw["title"]) or diagnosis_png(**kw))
    monkeypatch.setattr(plots, "scores_with_intervals_png",
                        lambda *a, **kw: figures.append((a, kw)) or scores_png(*a, **kw))

    page = reports.contributor_report(tmp_path / "c", task_id="t-1", contributor="alice",
                                      scores=scores).html.read_text()
    order = ["s-a-1", "s-a-2", "s-a-0"]
    assert _card_order(page) == order
    card = page.split('data-record="s-a-1"')[1].split("</section>")[0]
    assert '<span class="score">+0.60</span><span class="ci">95% interval [+0.45, +0.75]</span>' in card
    assert '<span class="badge elevated">identifiable</span>' in card
    assert html.escape(reading(0.60, 0.45, 0.75, n_models=32)) in card
    assert "counted P +0.20 [-0.10, +0.50]" in card
    low = page.split('data-record="s-a-0"')[1].split("</section>")[0]
    assert '<span class="score">+0.10</span>' in low and "counted P +0.90 [+0.70, +1.00]" in low
    assert html.escape(reading(0.90, 0.70, 1.00, n_models=32)) not in page  # no reading of a counted P
    assert '<span class="badge high">' not in page  # P's interval [+0.70, +1.00] would have been "high risk"
    # Summary and cards: 2 of 3 have the headline interval above 0 (s-a-0's P interval would make 3).
    assert "<b>2 of your 3 records</b> are identifiable more often than chance" in page
    assert 'href="#r-s-a-1">s-a-1</a>, +0.60 [+0.45, +0.75] (counted P +0.20' in page
    assert "<b>+0.60</b><span>highest score</span>" in page and "<b>+0.40</b><span>median score</span>" in page
    assert "model-based" in page.split("How to read this page")[1]
    assert titles == ["score +0.60 [+0.45, +0.75] · counted P +0.20 · online-per-record",  # in card order
                      "score +0.40 [+0.10, +0.70] · counted P +0.40 · online-per-record",
                      "score +0.10 [-0.05, +0.25] · counted P +0.90 · online-per-record"]
    (values, lows, highs), kw = figures[0]
    assert sorted(values) == [0.10, 0.40, 0.60] and sorted(lows) == [-0.05, 0.10, 0.45]
    assert kw["what"] == "model-based score"

    page = reports.builder_report(tmp_path / "b", task_id="t-1", scores=scores, rounds={}, top=2).html.read_text()
    assert _card_order(page) == order[:2]
    assert '<span class="rank">#1</span><span class="mono">s-a-1</span>' in page
    assert "contributor <b>alice</b>" in page
    table = page.split("<h2>All records")[1]
    assert re.findall(r'<td class="rid"><span class="mono">([^<]+)</span>', table) == order
    row = table.split("s-a-0")[1].split("</tr>")[0]  # headline first, counted P secondary
    assert row.index("<b>+0.10</b>") < row.index("+0.90")
    assert html.escape(reading(0.10, -0.05, 0.25, n_models=32)) in row
    assert "<th class=\"num\">counted P [95%]</th>" in table
    # The CSV keeps every field of both scores.
    rows = (tmp_path / "b" / "scores.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["record_id", "contributor", "round_id"] and "score_ci_high" in rows[0]


def _tabular_task() -> tuple[common_pb2.TaskSettings, Schema]:
    schema = Schema((Feature("mean radius", mean=14.0, std=3.5), Feature("smoker", kind="categorical",
                                                                          levels=("no", "yes"),
                                                                          level_frequencies=(0.9, 0.1)),
                     Feature("age", mean=50.0, std=10.0)), label_column="diagnosis",
                    class_names=("benign", "malignant"))
    settings = common_pb2.TaskSettings(num_classes=2, record_shape=[schema.width], schema=schema.to_proto())
    return settings, schema


def test_tabular_reports_show_the_row_and_why_it_is_exposed(tmp_path):
    """A tabular task's record cards show the raw values and the columns that make the row unusual
    (z-score, percentile), most unusual first, with a bar plot of the z-scores; no thumbnail. The
    contributor's table is read as submitted (raw rows); a builder's local copy may be encoded rows,
    decoded with the schema."""
    from ftps.records import tables
    from ftps.v1 import registry_pb2

    settings, schema = _tabular_task()
    task = registry_pb2.Task(task_id="t-1", name="cancer", settings=settings)
    table = tmp_path / "mine.csv"
    table.write_bytes(tables.write_table({"mean radius": ["28.0", "14.0"], "smoker": ["no", "yes"],
                                          "age": ["45", "50"], "diagnosis": ["malignant", "benign"]}, "csv"))
    images = reports.load_record_images([str(table)], Expect.of(settings))
    scores = [_score("s-a-0", (0.5, 0.2, 0.8), (0.6, 0.4, 0.8)), _score("s-a-1", (0.1, -0.2, 0.4), (0.1, -0.1, 0.3))]
    out = reports.contributor_report(tmp_path / "c", task_id="t-1", contributor="alice", scores=scores, task=task,
                                     images=images)
    page = out.html.read_text()
    _self_contained(page)
    first = page.split('data-record="s-a-0"')[1].split("</section>")[0]
    assert "Why this row is exposed" in first and 'class="thumb"' not in first
    why = first.split('<table class="why">')[1].split("</table>")[0]
    # mean radius is 4 standard deviations out (z = (28 - 14) / 3.5), the top of the list; age next.
    cells = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">([^<]+)</td><td class=\"num\">([^<]+)</td>", why)
    assert cells[0] == ("mean radius", "28", "+4.00") and cells[1] == ("age", "45", "-0.50")
    assert '<td class="num">100.0</td>' in why  # Phi(4) of the builder's rows are at or below it
    assert "All 3 values of the row" in first
    assert (tmp_path / "c" / "records" / "unusual-s-a-0.png").read_bytes()[:4] == b"\x89PNG"
    assert 'src="records/unusual-s-a-0.png"' in first
    # The second row's rarest column is its category: "yes" is held by 10% of the builder's rows.
    second = page.split('data-record="s-a-1"')[1].split("</section>")[0]
    why = second.split('<table class="why">')[1].split("</table>")[0]
    assert re.findall(r"<tr><td>([^<]+)</td>", why)[0] == "smoker"
    assert "share 10.0%" in why
    assert "not an image" not in page and "No record images" not in page

    # The builder's copy in the services' encoding: decoded to the same values.
    from ftps.records.npz import Records

    rows = images.get("s-a-0")[None, :]
    local = reports.RecordImages()
    local.add(None, Records(schema.encode(rows), np.array([1]), record_ids=["s-a-0"], source="local"))
    page = reports.builder_report(tmp_path / "b", task_id="t-1", scores=scores, rounds={}, task=task,
                                  images=local).html.read_text()
    first = page.split('data-record="s-a-0"')[1].split("</section>")[0]
    assert "<tr><td>mean radius</td><td class=\"num\">28</td><td class=\"num\">+4.00</td>" in first
    missing = page.split('data-record="s-a-1"')[1].split("</section>")[0]
    assert "not in file" in missing and "Why this row is exposed" not in missing
    # Without a local table the report says how to get the values, not how to get images.
    page = reports.builder_report(tmp_path / "n", task_id="t-1", scores=scores, rounds={}, task=task).html.read_text()
    assert "No record values" in page and "Why this row is exposed" not in page


def _contribution(who: str, score: tuple[float, float, float], eps: tuple[float, float, float],
                  round_id: str = "r-1") -> common_pb2.ContributorScore:
    return common_pb2.ContributorScore(
        contributor=who, round_id=round_id, n_records=2, score=score[0], score_ci_low=score[1],
        score_ci_high=score[2], counted_p=score[0], empirical_mu=1.0, empirical_mu_ci_low=0.5,
        empirical_mu_ci_high=1.5, empirical_epsilon=eps[0], empirical_epsilon_ci_low=eps[1],
        empirical_epsilon_ci_high=eps[2], delta=1e-5, n_in=8, n_out=8)


def _variant(name: str, state: int, *, acc: float = 0.0, scores=(), auc: float = 0.0, mean: float = 0.0,
             dp: float = 0.0, done: int = 16, message: str = "") -> common_pb2.RecipeVariant:
    v = common_pb2.RecipeVariant(name=name, heldout_accuracy=acc, heldout_records=500, dp_epsilon=dp,
                                 status=common_pb2.RoundStatus(state=state, models_done=done, models_total=16,
                                                               message=message))
    v.scores.extend(scores)
    if state == common_pb2.ROUND_STATE_DONE:
        v.batch.CopyFrom(common_pb2.BatchMetrics(auc=auc, mean_score=mean, n_models=16))
    return v


def test_builder_report_shows_whole_contributions_and_the_recipe_comparison(tmp_path):
    """Contributor-level masks: each whole contribution's score and empirical epsilon with their
    intervals, in both reports (a contributor's: their own only). A recipe comparison: the
    risk/utility table, the plot and the records exposed under every recipe; one still running:
    its progress, no plot."""
    done = common_pb2.ROUND_STATE_DONE
    scores = [_score(f"s-a-{i}", (0.5, 0.2, 0.8), (0.6, 0.3, 0.9) if i < 2 else (0.1, -0.2, 0.4))
              for i in range(4)]
    result = common_pb2.RoundResult(status=common_pb2.RoundStatus(round_id="r-1", state=done))
    result.contributor_scores.extend([_contribution("alice", (0.62, 0.31, 0.85), (3.1, 0.9, 6.4)),
                                      _contribution("bob", (-0.05, -0.40, 0.33), (0.0, 0.0, 1.2))])
    comparison = common_pb2.RecipeComparison(round_id="r-1", exposed_everywhere=["s-a-0"])
    low = [_score(f"s-a-{i}", (0.1, -0.2, 0.4), (0.6, 0.3, 0.9) if i == 0 else (0.0, -0.3, 0.3)) for i in range(4)]
    comparison.variants.extend([
        _variant("current", done, acc=0.912, scores=scores, auc=0.781, mean=0.35),
        _variant("dp-eps-8", done, acc=0.846, scores=low, auc=0.556, mean=0.15, dp=8.0)])
    out = tmp_path / "b"
    files = reports.builder_report(out, task_id="t-1", scores=scores, rounds={"r-1": result},
                                   comparisons={"r-1": comparison})
    page = files.html.read_text()
    _self_contained(page)
    whole = page.split("Whole contributions (contributor-level masks)")[1].split("</table>")[0]
    assert "each contributor's whole" in whole and "not a guarantee" in whole
    # the most exposed first, each with its interval and epsilon at delta
    assert whole.index("<td>alice</td>") < whole.index("<td>bob</td>")
    assert "<b>+0.62</b><span class=\"minor\">[+0.31, +0.85]</span>" in whole
    assert "3.10 [0.90, 6.40]" in whole and "at δ = 1e-05" in whole
    assert '<span class="badge elevated">identifiable</span>' in whole
    section = page.split("Recipes compared on round")[1]
    table = section.split("</table>")[0]
    rows = re.findall(r"<tr><td><b>([^<]+)</b></td>(.*?)</tr>", table)
    assert [r[0] for r in rows] == ["current", "dp-eps-8"]
    assert "0.912" in rows[0][1] and "0.781" in rows[0][1] and "+0.350" in rows[0][1] and "2 of 4" in rows[0][1]
    assert "0.846" in rows[1][1] and "1 of 4" in rows[1][1] and "8.00" in rows[1][1] and "—" in rows[0][1]
    assert "1 record(s) identifiable above chance under every recipe" in section and "s-a-0" in section
    png = out / "comparison-r-1.png"
    assert png in files.pngs and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="comparison-r-1.png"' in page

    # Still running: the table says how far each recipe got, a failed one why; no plot, no list yet.
    running = common_pb2.RecipeComparison(round_id="r-1")
    running.variants.extend([_variant("current", done, acc=0.9, scores=scores, auc=0.7, mean=0.3),
                             _variant("fewer", common_pb2.ROUND_STATE_FINETUNING, done=6),
                             _variant("broken", common_pb2.ROUND_STATE_FAILED, done=0, message="the recipe raised")])
    page = reports.builder_report(tmp_path / "b2", task_id="t-1", scores=scores, rounds={"r-1": result},
                                  comparisons={"r-1": running}).html.read_text()
    section = page.split("Recipes compared on round")[1]
    assert "finetuning: 6 / 16 models" in section and "failed: the recipe raised" in section
    assert "comparison-r-1.png" not in page and "under every recipe" not in section
    assert not (tmp_path / "b2" / "comparison-r-1.png").exists()

    # The contributor's report: their own contribution.
    page = reports.contributor_report(tmp_path / "c", task_id="t-1", contributor="alice", scores=scores,
                                      contributions=[result.contributor_scores[0]]).html.read_text()
    whole = page.split("Whole contributions (contributor-level masks)")[1].split("</table>")[0]
    assert "your whole contribution" in whole and "<td>alice</td>" in whole and "bob" not in whole
    assert "3.10 [0.90, 6.40]" in whole
    page = reports.contributor_report(tmp_path / "c2", task_id="t-1", contributor="alice",
                                      scores=scores).html.read_text()
    assert "Whole contributions" not in page


def test_builder_report_fetches_the_rounds_recipe_comparison(scored, tmp_path, capsys, digits_strategy):
    """``ftps-builder report`` asks each round for its comparison (GetComparison) and shows it."""
    b, task, rid = scored["b"], scored["task"], scored["round"]
    fewer = tmp_path / "fewer.py"
    fewer.write_text(digits_strategy.replace('"epochs": 15', '"epochs": 2'))
    _run(builder_main, b + ["compare", "--round", rid, "--recipe", f"fewer-epochs={fewer}"], capsys)
    compared = json.loads(_run(builder_main, b + ["compare", "--round", rid, "--json"], capsys))
    out = tmp_path / "batch"
    files = json.loads(_run(builder_main, b + ["report", "--task", task, "--out", str(out), "--json"], capsys))
    page = Path(files["html"]).read_text()
    section = page.split(f'Recipes compared on round <span class="mono">{rid}</span>')[1].split("<h2>")[0]
    for r in compared["recipes"]:
        assert f"<b>{r['recipe']}</b>" in section and f"{r['heldout_accuracy']:.3f}" in section
        assert f"{r['above_chance']} of {len(r['scores'])}" in section
    assert str(out / f"comparison-{rid}.png") in files["pngs"]
    _check_pngs(files)
