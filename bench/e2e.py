"""End-to-end cost and scaling: a round through the services vs the same work on the bare engine.

Issue 7's cost evidence, on the demo task (``ftps-stack demo``: Fashion-MNIST, the demo's base
model and ``clients/strategies/fmnist_cnn.py``, records from the contributors' split, k = 16)::

    python -m bench.e2e            # m in {50..1000}, n in {8..128}, 2 repeats: ~20 min on 2 CPU cores
    python -m bench.e2e --quick    # m = 100 (50, 200), n = 8, 16 (4), 1 repeat: ~2 min, every figure

Services: the multi-process stack (``stack.processes.ProcessStack``, what ``ftps-stack up
--processes --workers N`` runs: the S3-protocol store and each service its own OS process, auth on,
the worker's sandboxed strategy in a warm child). Per configuration (m records, n models) the
builder registers a task as the demo does (base model, strategy, 4,000 builder records,
``models_per_job = min(8, n / 4)``) and runs the preparation stage; then, per repeat, contributors
``alice`` and ``bob`` submit m/2 records each and the batch threshold starts the round. The clock
runs from alice's submit until both contributors have read their scores (``GetScores``).

Bare engine: the same fine-tunes in this process, no gRPC, no object store, no sandbox: the masks
and model seeds the scorer derives from the batch (``ftps.privacy.masks.derive_seed`` of the batch npz's
sha256), all n models in one ``ftps.ml.engine.finetune_and_score`` call, then every method of
``ftps.privacy.scoring.score`` on PHI, as the scorer's ``score_all`` does (its protobuf
building is the services' overhead). The bare preparation stage is ``bench.attacks``'s
``offline_gaussian`` (the scorer's own masks and seeds). Bare and services run the same models, so
their scores must agree: the ``max abs d score`` column checks it (0 when phi is bit-identical;
``same Gaussian`` likewise for the preparation stage). Each bare run follows its services run at
once (side by side: the ratio is the figure, the machine is shared), after every stack process has
gone quiet. Rounds are warm on both sides: the preparation stage has started the task's sandbox
child (torch imported, first optimizer step taken) before the first round, and the bare engine
fine-tunes one untimed model first. ``--threads`` (default 1) sets torch's threads in the bare
engine and in each worker of the cost stack, so phi is the same on both sides.

Where each figure comes from:

- ``e2e``, ``submit``, ``dispatch`` (submit acknowledged -> round id seen, polled every 10 ms) and
  the preparation stage (``StartPreparation`` until READY): the client's clock (``OfflineGaussian.timings``
  has the scorer's side).
- ``fine-tune``, ``scoring``, ``scorer total``: ``RoundResult.timings`` (``finetune_s``,
  ``scoring_s``, ``total_s``), what the demo prints. ``overhead`` = e2e - fine-tune - scoring,
  split into submit, scorer bookkeeping (total - fine-tune - scoring: task lookup, masks, state
  and PHI writes) and gateway (e2e - submit - total: batching, StartRound, following the round,
  delivering the scores).
- ``sandbox jobs``: the workers' seconds per job (``RunJobResponse.seconds``) summed, which the
  scorer reports as ``RoundResult.timings["worker_jobs_s"]`` (and ``OfflineGaussian.timings``); the
  number of jobs from the worker's log line ``job ...: ... in X.Xs``.
  ``fan-out`` = fine-tune - sandbox jobs (one worker: jobs run one at a time).
- CPU seconds: every process of the stack and their children (``/proc``, sandbox children
  included) plus this process during the round, vs this process's CPU time for the bare run;
  less moved by other load on the machine than the wall times.

Scaling: cost vs n at the smallest m (a straight-line fit: fixed seconds + seconds per model) and
seconds per record vs m at the smallest n. Throughput: rounds of ``--throughput-models`` models on
stacks of 1 and 2 worker processes (``--throughput-stacks``, workers x torch threads each),
the rounds interleaved across the stacks; models per second of the fine-tuning stage
(n / ``finetune_s``) and end to end (n / e2e).

Outputs in ``--out`` (default ``bench/out/e2e/``): ``cost.csv`` (one row per configuration, medians
over repeats), ``rounds.csv`` (every round), ``prep.csv``, ``throughput.csv``, ``e2e.png`` (cost vs
n, cost per record vs m, throughput), ``results.md`` (the printed tables), ``meta.json``, and the
stacks' service logs in ``logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "out" / "e2e"
CONTRIBUTORS = ("alice", "bob")
JOB_LINE = re.compile(r"job (\S+): \d+ model\(s\) x \d+ record\(s\) in ([0-9.]+)s")


def models_per_job(n: int) -> int:
    """The demo's setting (``stack.demo.run_demo``)."""
    return max(1, min(8, n // 4))


# --------------------------------------------------------------------------------------------
# The stack: processes, clients, CPU accounting
# --------------------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its reaped children (utime + stime + cutime + cstime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2:].split()  # fields[0] is field 3 (state)
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Stack:
    """A ``ProcessStack`` with the builder's and the contributors' clients."""

    label: str  # "1 worker x 1 thread"
    workers: int
    threads: int
    ps: object  # stack.processes.ProcessStack
    builder: object = None
    contributors: dict = field(default_factory=dict)

    @classmethod
    def start(cls, workers: int, threads: int, *, data_dir: Path, log_dir: Path) -> "Stack":
        from clients.api import BuilderClient, ContributorClient
        from stack.processes import ProcessStack

        ps = ProcessStack(workers=workers, data_dir=data_dir, log_dir=log_dir,
                          worker_env={"FTPS_TORCH_THREADS": str(threads)})
        ps.start()
        st = cls(f"{workers} worker{'s' * (workers > 1)} x {threads} thread{'s' * (threads > 1)}",
                 workers, threads, ps)
        a, signer = ps.addresses, ps.signer()
        st.builder = BuilderClient(registry=a["registry"], gateway=a["gateway"], scorer=a["scorer"],
                                   token=signer.issue("bench", "builder", ttl_s=24 * 3600))
        st.contributors = {c: ContributorClient(gateway=a["gateway"], contributor=c,
                                                token=signer.issue(c, "contributor", ttl_s=24 * 3600))
                           for c in CONTRIBUTORS}
        return st

    def close(self) -> None:
        for c in [self.builder, *self.contributors.values()]:
            if c is not None:
                c.close()
        self.ps.stop()

    def pids(self) -> list[int]:
        from stack.processes import _descendants

        tops = [c.proc.pid for c in self.ps.children.values()]
        return tops + [d for p in tops for d in _descendants(p)]

    def cpu(self) -> float:
        """CPU seconds so far of every process of the stack (and the children they started)."""
        return sum(_proc_cpu(p) for p in self.pids())

    def job_seconds(self, prefix: str) -> tuple[float, int]:
        """(sum of the sandbox seconds, number) of the jobs whose id starts with ``prefix``, from
        the workers' logs; (NaN, 0) when none is found."""
        total, count = 0.0, 0
        for child in self.ps.children.values():
            if not child.name.startswith("worker"):
                continue
            with contextlib.suppress(OSError):
                for match in JOB_LINE.finditer(child.log_path.read_text(errors="replace")):
                    if match.group(1).startswith(prefix):
                        total += float(match.group(2))
                        count += 1
        return (total if count else float("nan")), count


def settle(stacks: list[Stack], *, timeout: float = 60.0, window: float = 0.5,
           busy: float = 0.1) -> None:
    """Wait until the stacks' processes use less than ``busy`` of a core (e.g. a worker's spare
    sandbox child importing torch), so a timed run does not share the CPU with them."""
    deadline = time.monotonic() + timeout
    last = sum(s.cpu() for s in stacks)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(s.cpu() for s in stacks)
        if now - last < busy * window:
            return
        last = now


# --------------------------------------------------------------------------------------------
# Through the services
# --------------------------------------------------------------------------------------------


@dataclass
class ServiceTask:
    task_id: str
    settings: object  # common_pb2.TaskSettings as the registry filled it in
    prep_s: float
    prep_cpu_s: float
    prep_jobs_s: float
    offline: tuple[float, float]


def register_task(stack: Stack, task, *, m: int, n: int, k: int) -> ServiceTask:
    """The demo's builder steps: task, uploads, preparation stage (timed from the client)."""
    from ftps.common import archives, serde
    from ftps.v1 import common_pb2, scorer_pb2

    settings = common_pb2.TaskSettings(
        n_models=n, batch_threshold=m, method=serde.method_enum("online-per-record"),
        shadow_models=k, record_shape=list(task.x.shape[1:]), num_classes=10, seed=task.seed,
        models_per_job=models_per_job(n))
    b = stack.builder
    created = b.create_task(f"bench e2e m={m} n={n}", settings)
    b.upload(created.task_id, common_pb2.BLOB_KIND_BASE_MODEL, task.base_weights)
    b.upload(created.task_id, common_pb2.BLOB_KIND_STRATEGY, task.strategy_source.encode())
    b.upload(created.task_id, common_pb2.BLOB_KIND_BUILDER_DATA,
             archives.records_to_npz(task.builder_x, task.builder_y))
    settle([stack])
    c, cpu, t = stack.cpu(), time.process_time(), time.perf_counter()
    prepared = b.prepare(created.task_id)
    if prepared.state != scorer_pb2.PREPARATION_STATE_READY:
        raise RuntimeError(f"preparation stage of {created.task_id} failed: {prepared.message}")
    offline = prepared.gaussian
    prep_s = time.perf_counter() - t
    prep_cpu = stack.cpu() - c + time.process_time() - cpu
    jobs_s, _ = stack.job_seconds(f"offline-{created.task_id}-j")
    jobs_s = offline.timings.get("worker_jobs_s", jobs_s)  # the scorer reports the workers' seconds
    return ServiceTask(created.task_id, created.settings, prep_s, prep_cpu, jobs_s,
                       (offline.mu, offline.sigma))


def service_round(stack: Stack, st: ServiceTask, x: np.ndarray, y: np.ndarray, tag: str) -> dict:
    """One round the users' way: submit -> threshold -> round -> both contributors read scores."""
    from ftps.v1 import common_pb2

    alice, bob = (stack.contributors[c] for c in CONTRIBUTORS)
    half = len(x) // 2
    settle([stack])
    cpu0, own0 = stack.cpu(), time.process_time()
    t0 = time.perf_counter()
    alice.submit(st.task_id, x[:half], y[:half], idempotency_key=f"{tag}-alice")
    sub = bob.submit(st.task_id, x[half:], y[half:], idempotency_key=f"{tag}-bob")
    t_ack = time.perf_counter()
    while not sub.round_id:
        if time.perf_counter() - t_ack > 120:
            raise RuntimeError(f"{tag}: the batch threshold was reached but no round started "
                               f"(logs in {stack.ps.log_dir})")
        time.sleep(0.01)
        sub = bob.get_submission(sub.submission_id)
    round_id, t_round = sub.round_id, time.perf_counter()
    for status in alice.watch_round(round_id):
        if status.state == common_pb2.ROUND_STATE_FAILED:
            raise RuntimeError(f"{tag}: round {round_id} failed: {status.message} "
                               f"(logs in {stack.ps.log_dir})")
        if status.state == common_pb2.ROUND_STATE_DONE:
            break
    scores = []
    for who, expect in ((alice, half), (bob, len(x) - half)):
        mine = who.scores(st.task_id, round_id)
        while len(mine) < expect:  # not expected (the gateway stores the result first): a guard
            time.sleep(0.01)
            mine = who.scores(st.task_id, round_id)
        scores += mine
    t_end = time.perf_counter()
    cpu = stack.cpu() - cpu0 + time.process_time() - own0
    timings = dict(stack.builder.get_round(round_id).timings)
    jobs_s, jobs = stack.job_seconds(f"{round_id}-j")
    jobs_s = timings.get("worker_jobs_s", jobs_s)  # the scorer reports the workers' own seconds
    scores.sort(key=lambda s: s.index)
    return {
        "round_id": round_id, "e2e_s": t_end - t0, "submit_s": t_ack - t0,
        "dispatch_s": t_round - t_ack, "finetune_s": timings.get("finetune_s", float("nan")),
        "scoring_s": timings.get("scoring_s", float("nan")),
        "scorer_total_s": timings.get("total_s", float("nan")),
        "sandbox_jobs_s": jobs_s, "jobs": jobs, "cpu_s": cpu,
        "first": scores[0].contributor,  # whose records open the batch (the gateway's order)
        "score": np.array([s.score for s in scores]),  # the headline, per record
    }


# --------------------------------------------------------------------------------------------
# The bare engine
# --------------------------------------------------------------------------------------------


def batch_order(x: np.ndarray, y: np.ndarray, first: str) -> tuple[np.ndarray, np.ndarray]:
    """The batch as the gateway concatenates it: one submission per contributor, ``first``'s
    first (the gateway orders submissions by time, then id)."""
    half = len(x) // 2
    if first == CONTRIBUTORS[0]:
        return x, y
    return np.concatenate([x[half:], x[:half]]), np.concatenate([y[half:], y[:half]])


def bare_round(task, x: np.ndarray, y: np.ndarray, settings, offline: tuple[float, float]) -> dict:
    """The round's fine-tunes and scoring in this process, with the scorer's masks and seeds."""
    from ftps.common import archives, serde
    from ftps.ml.engine import finetune_and_score
    from ftps.privacy import scoring
    from ftps.privacy.masks import derive_seed, make_masks, model_seeds

    n, m = settings.n_models, len(x)
    seed = derive_seed(settings.seed, hashlib.sha256(archives.records_to_npz(x, y)).hexdigest())
    masks, seeds = make_masks(n, m, seed=seed), model_seeds(seed, n)
    cpu0, t0 = time.process_time(), time.perf_counter()
    phi = finetune_and_score(strategy_source=task.strategy_source, base_weights=task.base_weights,
                             train_x=x, train_y=y, eval_x=x, eval_y=y,
                             models=list(zip(range(n), seeds, masks)), engine="auto").phi
    t1 = time.perf_counter()
    headline = None
    for name in scoring.METHODS:  # every method, as the scorer's score_all
        kw: dict = {}
        if name == "offline-global":
            kw = dict(offline_mu=offline[0], offline_sigma=offline[1])
        if name in ("offline-per-record", "online-per-record"):
            kw["fixed_variance"] = settings.fixed_variance
        res = scoring.score(phi, masks, method=name, alpha=settings.alpha, **kw)
        if name == serde.method_name(settings.method):
            headline = res
    t2 = time.perf_counter()
    return {"finetune_s": t1 - t0, "scoring_s": t2 - t1, "total_s": t2 - t0,
            "cpu_s": time.process_time() - cpu0, "score": headline.records.score}


def bare_prep(task, *, k: int, m: int) -> dict:
    """The preparation stage on the bare engine (``bench.attacks.offline_gaussian``, uncached)."""
    from bench.attacks import offline_gaussian

    with tempfile.TemporaryDirectory() as tmp:
        cpu0, t0 = time.process_time(), time.perf_counter()
        mu, sigma = offline_gaussian(task, k, records=m, cache_dir=Path(tmp))
        return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
                "offline": (mu, sigma)}


def warm_up(task) -> None:
    """One untimed model: the process's one-time costs (torch._dynamo imported at the first
    optimizer step, oneDNN kernels) are paid once, as the worker's warm sandbox child pays them
    in the preparation stage, before any round."""
    from ftps.ml.engine import finetune_and_score

    mask = np.arange(len(task.x)) % 2 == 0
    finetune_and_score(strategy_source=task.strategy_source, base_weights=task.base_weights,
                       train_x=task.x, train_y=task.y, eval_x=task.x, eval_y=task.y,
                       models=[(0, 1, mask)], engine="auto")


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _median(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def measure_cost(stack: Stack, tasks: dict, configs: list[tuple[int, int]], *, k: int,
                 repeats: int, log) -> tuple[list[dict], list[dict], list[dict]]:
    """Every (m, n): a task with its preparation stage, then ``repeats`` rounds, each followed by
    the bare engine's run of the same models. Returns (cost rows, round rows, prep rows)."""
    rounds, prep, cost = [], [], []
    bare_preps: dict[int, dict] = {}
    warm_up(tasks[configs[0][0]])
    for m, n in configs:
        task = tasks[m]
        st = register_task(stack, task, m=m, n=n, k=k)
        log(f"m={m} n={n}: task {st.task_id}, preparation stage {st.prep_s:.1f} s "
            f"(mu={st.offline[0]:.3f} sigma={st.offline[1]:.3f})")
        if m not in bare_preps:
            settle([stack])
            bare_preps[m] = bare_prep(task, k=k, m=m)
            log(f"  bare preparation stage {bare_preps[m]['s']:.1f} s")
        bp = bare_preps[m]
        prep.append({"m": m, "n": n, "k": k, "task": st.task_id, "services_s": st.prep_s,
                     "services_cpu_s": st.prep_cpu_s, "sandbox_jobs_s": st.prep_jobs_s,
                     "bare_s": bp["s"], "bare_cpu_s": bp["cpu_s"], "ratio": st.prep_s / bp["s"],
                     "same_gaussian": bool(np.allclose(st.offline, bp["offline"], rtol=1e-9,
                                                       atol=1e-12))})
        mine = []
        for r in range(repeats):
            sv = service_round(stack, st, task.x, task.y, tag=f"m{m}-n{n}-r{r}")
            settle([stack])
            bx, by = batch_order(task.x, task.y, sv["first"])
            bare = bare_round(task, bx, by, st.settings, st.offline)
            row = {"m": m, "n": n, "repeat": r, "round_id": sv["round_id"]}
            row |= {k_: v for k_, v in sv.items() if k_ not in ("round_id", "first", "score")}
            row |= {f"bare_{k_}": v for k_, v in bare.items() if k_ != "score"}
            row["max_abs_score_diff"] = float(np.max(np.abs(sv["score"] - bare["score"])))
            mine.append(row)
            log(f"  round {r + 1}/{repeats}: services {sv['e2e_s']:.1f} s (fine-tune "
                f"{sv['finetune_s']:.1f} s), bare {bare['total_s']:.1f} s, "
                f"max |d score| {row['max_abs_score_diff']:.1e}")
        rounds += mine
        cost.append(cost_row(m, n, mine))
    return cost, rounds, prep


def cost_row(m: int, n: int, rows: list[dict]) -> dict:
    med = {key: _median(r[key] for r in rows) for key in rows[0]
           if key not in ("m", "n", "repeat", "round_id")}
    e2e, bare = med["e2e_s"], med["bare_total_s"]
    return {
        "m": m, "n": n, "repeats": len(rows), "e2e_s": e2e, "finetune_s": med["finetune_s"],
        "scoring_s": med["scoring_s"], "overhead_s": e2e - med["finetune_s"] - med["scoring_s"],
        "submit_s": med["submit_s"], "dispatch_s": med["dispatch_s"],
        "scorer_bookkeeping_s": med["scorer_total_s"] - med["finetune_s"] - med["scoring_s"],
        "gateway_s": e2e - med["submit_s"] - med["scorer_total_s"],
        "sandbox_jobs_s": med["sandbox_jobs_s"], "jobs": int(med["jobs"]),
        "fanout_s": med["finetune_s"] - med["sandbox_jobs_s"],
        "s_per_record": e2e / m, "s_per_model": e2e / n, "cpu_s": med["cpu_s"],
        "bare_s": bare, "bare_finetune_s": med["bare_finetune_s"],
        "bare_scoring_s": med["bare_scoring_s"], "bare_s_per_record": bare / m,
        "bare_cpu_s": med["bare_cpu_s"], "ratio": e2e / bare,
        "finetune_ratio": med["finetune_s"] / med["bare_finetune_s"],
        "cpu_ratio": med["cpu_s"] / med["bare_cpu_s"],
        "max_abs_score_diff": max(r["max_abs_score_diff"] for r in rows),
    }


def measure_throughput(stacks: list[Stack], task, *, m: int, n: int, k: int, repeats: int,
                       log) -> list[dict]:
    """Rounds of n models on each stack, interleaved (round 1 on every stack, then round 2 ...)."""
    sts = []
    for s in stacks:
        settle(stacks)
        sts.append(register_task(s, task, m=m, n=n, k=k))
        log(f"{s.label}: preparation stage {sts[-1].prep_s:.1f} s")
    runs: list[list[dict]] = [[] for _ in stacks]
    for r in range(repeats):
        for i, (s, st) in enumerate(zip(stacks, sts)):
            settle(stacks)
            runs[i].append(service_round(s, st, task.x, task.y, tag=f"tp-{s.workers}x{s.threads}-r{r}"))
            log(f"  {s.label}, round {r + 1}/{repeats}: fine-tune {runs[i][-1]['finetune_s']:.1f} s, "
                f"e2e {runs[i][-1]['e2e_s']:.1f} s")
    out = []
    for s, st, rs in zip(stacks, sts, runs):
        ft, e2e = _median(r["finetune_s"] for r in rs), _median(r["e2e_s"] for r in rs)
        out.append({"stack": s.label, "workers": s.workers, "threads": s.threads, "m": m, "n": n,
                    "rounds": len(rs), "prep_s": st.prep_s, "finetune_s": ft, "e2e_s": e2e,
                    "models_per_s": n / ft, "e2e_models_per_s": n / e2e,
                    "cpu_s": _median(r["cpu_s"] for r in rs)})
    for row in out:
        row["speedup"] = row["models_per_s"] / out[0]["models_per_s"]
        row["e2e_speedup"] = row["e2e_models_per_s"] / out[0]["e2e_models_per_s"]
    return out


def linear_fit(x, y) -> tuple[float, float, float]:
    """y = a + b x by least squares -> (a, b, R^2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float("nan"), float("nan"), float("nan")
    b, a = np.polyfit(x, y, 1)
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - float(np.sum((y - (a + b * x)) ** 2)) / ss if ss > 0 else float("nan")
    return float(a), float(b), r2


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _f(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def tables(cost: list[dict], prep: list[dict], tp: list[dict], *, main: list[tuple[int, int]],
           n_scale: tuple[int, list[int]], m_scale: tuple[int, list[int]]) -> dict[str, str]:
    """The result tables as Markdown (what is printed and written to results.md)."""
    from bench.attacks import _md

    by = {(r["m"], r["n"]): r for r in cost}
    out = {}
    rows = []
    for m in sorted({p["m"] for p in prep}):
        ps = [p for p in prep if p["m"] == m]
        svc, bare = _median(p["services_s"] for p in ps), ps[0]["bare_s"]
        svc_cpu, bare_cpu = _median(p["services_cpu_s"] for p in ps), ps[0]["bare_cpu_s"]
        rows.append([m, ps[0]["k"], len(ps), _f(svc, ".1f"),
                     _f(_median(p["sandbox_jobs_s"] for p in ps), ".1f"), _f(bare, ".1f"),
                     _f(svc / bare) + "x", _f(svc_cpu, ".1f"), _f(bare_cpu, ".1f"),
                     _f(svc_cpu / bare_cpu) + "x",
                     "yes" if all(p["same_gaussian"] for p in ps) else "NO"])
    out["prep"] = _md(["m (shadow pool)", "k", "tasks", "services s", "sandbox jobs s", "bare s",
                       "services / bare", "services CPU s", "bare CPU s", "CPU ratio",
                       "same Gaussian"], rows)
    out["cost"] = _md(
        ["m", "n", "e2e s", "fine-tune s", "scoring s", "overhead s", "s / record",
         "CPU s / record", "bare s", "bare fine-tune s", "bare scoring s", "bare s / record",
         "bare CPU s / record", "services / bare", "fine-tune ratio", "CPU ratio",
         "max abs d score"],
        [[m, n, _f(r["e2e_s"]), _f(r["finetune_s"]), _f(r["scoring_s"]), _f(r["overhead_s"]),
          _f(r["s_per_record"], ".4f"), _f(r["cpu_s"] / m, ".4f"), _f(r["bare_s"]),
          _f(r["bare_finetune_s"]), _f(r["bare_scoring_s"]), _f(r["bare_s_per_record"], ".4f"),
          _f(r["bare_cpu_s"] / m, ".4f"), _f(r["ratio"]) + "x", _f(r["finetune_ratio"]) + "x",
          _f(r["cpu_ratio"]) + "x", _f(r["max_abs_score_diff"], ".1e")]
         for m, n in main for r in [by[(m, n)]]])
    out["overhead"] = _md(
        ["m", "n", "overhead s", "submit s", "dispatch s", "scorer bookkeeping s", "gateway s",
         "jobs", "sandbox jobs s", "fan-out s", "overhead share of e2e"],
        [[m, n, _f(r["overhead_s"]), _f(r["submit_s"]), _f(r["dispatch_s"]),
          _f(r["scorer_bookkeeping_s"]), _f(r["gateway_s"]), r["jobs"], _f(r["sandbox_jobs_s"]),
          # the log gives each job's seconds to 0.1 s: +-0.05 s per job
          f"{_f(r['fanout_s'])} ± {_f(0.05 * r['jobs'])}",
          f"{_f(100 * r['overhead_s'] / r['e2e_s'], '.0f')}%"]
         for m, n in main for r in [by[(m, n)]]])
    m0, ns = n_scale
    rs = [by[(m0, n)] for n in ns]
    base = rs[0]
    out["scale_n"] = _md(
        ["n", "e2e s", "e2e / e2e(n0)", "n / n0", "fine-tune s / model", "CPU s", "CPU s / model",
         "bare s", "bare fine-tune s / model", "bare CPU s", "bare CPU s / model",
         "services / bare", "CPU ratio"],
        [[r["n"], _f(r["e2e_s"]), _f(r["e2e_s"] / base["e2e_s"]), _f(r["n"] / base["n"]),
          _f(r["finetune_s"] / r["n"], ".3f"), _f(r["cpu_s"]), _f(r["cpu_s"] / r["n"], ".3f"),
          _f(r["bare_s"]), _f(r["bare_finetune_s"] / r["n"], ".3f"), _f(r["bare_cpu_s"]),
          _f(r["bare_cpu_s"] / r["n"], ".3f"), _f(r["ratio"]) + "x", _f(r["cpu_ratio"]) + "x"]
         for r in rs])
    out["scale_n_fit"] = "\n".join(
        f"- {label}: {_f(a)} s + {_f(b, '.3f')} s x n (R^2 = {_f(r2, '.3f')})"
        for label, key in (("services e2e, wall", "e2e_s"),
                           ("services fine-tune stage, wall", "finetune_s"),
                           ("services, CPU (every process)", "cpu_s"),
                           ("bare engine, wall", "bare_s"), ("bare engine, CPU", "bare_cpu_s"))
        for a, b, r2 in [linear_fit(ns, [r[key] for r in rs])])
    n0, ms = m_scale
    rs = [by[(m, n0)] for m in ms]
    out["scale_m"] = _md(
        ["m", "e2e s", "s / record", "CPU s / record", "fine-tune s / model", "bare s",
         "bare s / record", "bare CPU s / record", "bare fine-tune s / model", "services / bare",
         "CPU ratio"],
        [[r["m"], _f(r["e2e_s"]), _f(r["s_per_record"], ".4f"), _f(r["cpu_s"] / r["m"], ".4f"),
          _f(r["finetune_s"] / n0, ".3f"), _f(r["bare_s"]), _f(r["bare_s_per_record"], ".4f"),
          _f(r["bare_cpu_s"] / r["m"], ".4f"), _f(r["bare_finetune_s"] / n0, ".3f"),
          _f(r["ratio"]) + "x", _f(r["cpu_ratio"]) + "x"] for r in rs])
    out["throughput"] = _md(
        ["stack", "m", "n", "rounds", "preparation s", "fine-tune s", "models / s (fine-tune)",
         "speed-up", "e2e s", "models / s (e2e)", "e2e speed-up", "CPU s / model"],
        [[r["stack"], r["m"], r["n"], r["rounds"], _f(r["prep_s"], ".1f"), _f(r["finetune_s"]),
          _f(r["models_per_s"]), _f(r["speedup"]) + "x", _f(r["e2e_s"]), _f(r["e2e_models_per_s"]),
          _f(r["e2e_speedup"]) + "x", _f(r["cpu_s"] / r["n"], ".3f")]
         for r in tp]) if tp else "(skipped: --throughput-stacks none)"
    return out


def write_png(cost: list[dict], tp: list[dict], *, n_scale, m_scale, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["m"], r["n"]): r for r in cost}
    panels = 3 if tp else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8))
    m0, ns = n_scale
    rs = [by[(m0, n)] for n in ns]
    ax = axes[0]
    for key, label, style in (("e2e_s", "services, submit -> scores", "o-C0"),
                              ("finetune_s", "services, fine-tune stage", "s--C1"),
                              ("bare_s", "bare engine (fine-tune + scoring)", "^-C2"),
                              ("cpu_s", "services, CPU s (every process)", "o:C0"),
                              ("bare_cpu_s", "bare engine, CPU s", "^:C2")):
        ax.plot(ns, [r[key] for r in rs], style, label=label, alpha=0.6 if ":" in style else 1)
    ax.set_xlabel("n (models per round)")
    ax.set_ylabel("seconds per round")
    ax.set_title(f"Cost vs n (m = {m0})", fontsize=9)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    n0, ms = m_scale
    rs = [by[(m, n0)] for m in ms]
    ax = axes[1]
    ax.plot(ms, [r["s_per_record"] for r in rs], "o-C0", label="services, e2e / m")
    ax.plot(ms, [r["finetune_s"] / r["m"] for r in rs], "s--C1", label="services, fine-tune / m")
    ax.plot(ms, [r["bare_s_per_record"] for r in rs], "^-C2", label="bare engine / m")
    ax.plot(ms, [r["cpu_s"] / r["m"] for r in rs], "o:C0", alpha=0.6,
            label="services, CPU s / m")
    ax.plot(ms, [r["bare_cpu_s"] / r["m"] for r in rs], "^:C2", alpha=0.6,
            label="bare engine, CPU s / m")
    ax.set_xscale("log")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.minorticks_off()
    ax.set_xlabel("m (records per round)")
    ax.set_ylabel("seconds per record")
    ax.set_title(f"Cost per record vs m (n = {n0})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    if tp:
        ax = axes[2]
        xs = np.arange(len(tp))
        ax.bar(xs - 0.2, [r["models_per_s"] for r in tp], 0.4, label="fine-tune stage")
        ax.bar(xs + 0.2, [r["e2e_models_per_s"] for r in tp], 0.4, label="end to end")
        ax.set_xticks(xs, [r["stack"].replace(" x ", "\nx ") for r in tp], fontsize=7)
        ax.set_ylabel("models per second")
        ax.set_title(f"Throughput (m = {tp[0]['m']}, n = {tp[0]['n']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _ints(text: str, *, even: bool = False, least: int = 1) -> list[int]:
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < least or (even and v % 2) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected {'even ' if even else ''}integers >= {least}, got {text!r}")
    return values


def _stacks(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() == "none":
        return []
    out = []
    for part in text.split(","):
        try:
            w, t = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected WORKERSxTHREADS[,...] (e.g. 1x1,2x1) or none, got {text!r}") from None
        if w < 1 or t < 1:
            raise argparse.ArgumentTypeError(f"workers and threads must be >= 1, got {part!r}")
        out.append((w, t))
    return out


QUICK = dict(records="100", sizes="8,16", scale_records="50,100,200", scale_sizes="4,8,16",
             throughput_records=100, throughput_models=16, throughput_stacks="1x1,2x1", repeats=1)
FULL = dict(records="100,500", sizes="16,64", scale_records="50,100,200,500,1000",
            scale_sizes="8,16,32,64,128", throughput_records=500, throughput_models=64,
            throughput_stacks="1x1,2x1,1x2", repeats=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="m = 100 (50, 200 for the scaling), n = 8, 16 (4 for the scaling); one "
                        "repeat; 1 vs 2 workers (~3 min)")
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    p.add_argument("--records", "-m", default=None,
                   help="m of the cost table, comma-separated (default 100,500; --quick 100)")
    p.add_argument("--sizes", "-n", default=None,
                   help="n of the cost table, even (default 16,64; --quick 8,16)")
    p.add_argument("--scale-sizes", default=None,
                   help="n of the scaling in n, at the smallest m (default 8,16,32,64,128; "
                        "--quick 4,8,16)")
    p.add_argument("--scale-records", default=None,
                   help="m of the scaling in m, at the smallest n (default 50,100,200,500,1000; "
                        "--quick 50,100,200)")
    p.add_argument("--throughput-records", type=int, default=None,
                   help="m of the throughput rounds (default 500; --quick 100)")
    p.add_argument("--throughput-models", type=int, default=None,
                   help="n of the throughput rounds (default 64; --quick 16)")
    p.add_argument("--throughput-stacks", default=None,
                   help="stacks compared, WORKERSxTHREADS each (default 1x1,2x1,1x2; --quick "
                        "1x1,2x1; none skips)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds per configuration (default 2; --quick 1); medians are reported")
    p.add_argument("--shadow-models", "-k", type=int, default=16,
                   help="shadow models of the preparation stage (default 16, as the demo)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the bare engine and of each worker of the cost stack "
                        "(default 1)")
    p.add_argument("--seed", type=int, default=0, help="demo seed: data splits, base model, records")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output directory (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, default in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        args.records = _ints(str(args.records), least=4)
        args.sizes = _ints(str(args.sizes), even=True, least=4)
        args.scale_records = _ints(str(args.scale_records), least=4)
        args.scale_sizes = _ints(str(args.scale_sizes), even=True, least=4)
        args.throughput_stacks = _stacks(args.throughput_stacks)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.throughput_models < 4 or args.throughput_models % 2 or args.throughput_records < 4:
        p.error("--throughput-models must be even and >= 4, --throughput-records >= 4")
    if args.repeats < 1 or args.shadow_models < 2 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --shadow-models >= 2")
    return args


def grid(args: argparse.Namespace) -> tuple[list, tuple, tuple, list]:
    """(cost table configs, (m0, n values), (n0, m values), every config to run, in order)."""
    main_ = [(m, n) for m in args.records for n in args.sizes]
    n_scale = (min(args.records), sorted(set(args.scale_sizes) | set(args.sizes)))
    m_scale = (min(args.sizes), sorted(set(args.scale_records) | set(args.records)))
    every = sorted(set(main_) | {(n_scale[0], n) for n in n_scale[1]}
                   | {(m, m_scale[0]) for m in m_scale[1]})
    return main_, n_scale, m_scale, every


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["FTPS_TORCH_THREADS"] = str(args.threads)  # the bare engine's (and phi's) threads

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    from bench.attacks import _write_csv, load_task
    from bench.finetune import _machine

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    main_, n_scale, m_scale, every = grid(args)
    log(f"demo task: {args.dataset}; {len(every)} configurations (m, n): "
        + ", ".join(f"({m}, {n})" for m, n in every))
    tasks = {m: load_task(args.dataset, m, seed=args.seed)
             for m in sorted({m for m, _ in every} | {args.throughput_records})}
    args.out.mkdir(parents=True, exist_ok=True)
    stacks: list[Stack] = []
    tp: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ftps-bench-e2e-") as data_dir:

        def start(workers: int, threads: int) -> Stack:
            t = time.perf_counter()
            s = Stack.start(workers, threads, data_dir=Path(data_dir),
                            log_dir=args.out / "logs" / f"{workers}x{threads}")
            stacks.append(s)
            log(f"stack up: {s.label} ({time.perf_counter() - t:.1f} s; logs in {s.ps.log_dir})")
            return s

        try:
            cost_stack = start(1, args.threads)
            t_cost = time.perf_counter()
            cost, rounds, prep = measure_cost(cost_stack, tasks, every, k=args.shadow_models,
                                              repeats=args.repeats, log=log)
            t_cost = time.perf_counter() - t_cost
            t_tp = time.perf_counter()
            if args.throughput_stacks:
                tp_stacks = [cost_stack if (w, t) == (1, args.threads) else start(w, t)
                             for w, t in args.throughput_stacks]
                log(f"throughput: m={args.throughput_records}, n={args.throughput_models} on "
                    + ", ".join(s.label for s in tp_stacks))
                tp = measure_throughput(tp_stacks, tasks[args.throughput_records],
                                        m=args.throughput_records, n=args.throughput_models,
                                        k=args.shadow_models, repeats=args.repeats, log=log)
            t_tp = time.perf_counter() - t_tp
        finally:
            for s in stacks:
                s.close()

    t = tables(cost, prep, tp, main=main_, n_scale=n_scale, m_scale=m_scale)
    command = "python -m bench.e2e " + " ".join(sys.argv[1:] if argv is None else argv)
    total = time.perf_counter() - t0
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
            "torch": torch.__version__, "threads": args.threads, "dataset": args.dataset,
            "shadow_models": args.shadow_models, "repeats": args.repeats, "seed": args.seed,
            "configs": every, "cost_table": main_, "n_scale": n_scale, "m_scale": m_scale,
            "throughput_stacks": args.throughput_stacks,
            "seconds": {"total": total, "cost": t_cost, "throughput": t_tp}}
    text = "\n\n".join([
        f"# bench.e2e\n\n`{meta['command']}`\n\n"
        f"{args.dataset} demo task (the demo's base model and strategy, builder data, k = "
        f"{args.shadow_models} shadow models), models per job min(8, n/4) as the demo; services: "
        f"`ProcessStack` (store and each service its own process, auth on, sandboxed worker), "
        f"{args.threads} torch thread(s) per worker and in the bare engine; medians of "
        f"{args.repeats} round(s) per configuration.\n"
        f"Machine: {meta['machine']} ({load0:.1f} at the start); torch {torch.__version__}; "
        f"{meta['date']}. Wall times move with other load on the machine; CPU seconds much "
        "less: compare the ratios and the CPU columns.",
        "## Preparation stage (once per task and base model, cached afterwards; not part of a "
        "round's cost)\n\n"
        "Services: `StartPreparation` until READY (client clock); sandbox jobs: the worker's own "
        "seconds (its log); bare: k shadow fine-tunes + the Gaussian fit in-process.\n\n" + t["prep"],
        "## Cost of a round: submit -> scores available, through the services vs the bare engine\n\n"
        "e2e: alice's submit until both contributors read their scores; fine-tune / scoring: the "
        "scorer's `RoundResult.timings`; overhead = e2e - fine-tune - scoring. Bare: the same "
        "models (the scorer's masks and seeds) in one `finetune_and_score` call + every scoring "
        "method. Ratios are services / bare (wall; CPU ratio: every stack process + the client "
        "vs the bare process). max abs d score: services vs bare headline scores (0 = the same "
        "phi).\n\n" + t["cost"],
        "## Where the services' overhead goes\n\n"
        "submit: the two SubmitRecords calls; dispatch: acknowledged -> round id seen (part of "
        "gateway); scorer bookkeeping: scorer total - fine-tune - scoring; gateway: e2e - submit - "
        "scorer total (batching, StartRound, following the round, delivering the scores); "
        "sandbox jobs: the worker's seconds per job summed (its log); fan-out: the fine-tune "
        "stage - sandbox jobs (gRPC, blob fetch, serialisation; one worker).\n\n" + t["overhead"],
        f"## Scaling in n (m = {n_scale[0]})\n\n" + t["scale_n"] + "\n\nStraight-line fits "
        "(fixed seconds + seconds per model):\n\n" + t["scale_n_fit"],
        f"## Scaling in m (n = {m_scale[0]})\n\n" + t["scale_m"],
        "## Throughput: worker processes (rounds interleaved across the stacks)\n\n"
        "models / s: n over the scorer's fine-tune stage (the worker pool's throughput) and over "
        "e2e; speed-up over the first stack.\n\n" + t["throughput"],
        f"Total {total:.0f} s (cost {t_cost:.0f} s, throughput {t_tp:.0f} s).",
    ]) + "\n"
    print(text)
    _write_csv(args.out / "cost.csv", cost)
    _write_csv(args.out / "rounds.csv", rounds)
    _write_csv(args.out / "prep.csv", prep)
    if tp:
        _write_csv(args.out / "throughput.csv", tp)
    write_png(cost, tp, n_scale=n_scale, m_scale=m_scale, path=args.out / "e2e.png")
    (args.out / "results.md").write_text(text)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    log(f"wrote {args.out}/: cost.csv rounds.csv prep.csv{' throughput.csv' if tp else ''} "
        "e2e.png results.md meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
