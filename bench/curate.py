"""Stage curate at scale: loading N samples into FiftyOne and Brain signals on N embeddings.

Data: the full Fashion-MNIST version in data/ingest (`paths.data`/ingest; 70,000 images; make it
with `make run` or `python -m tasks.ingest`). Its rows are shuffled once (seed 0), so every scale
N is the first N rows of the same order and holds train and test in the version's 6:1 mix.
Scales: SCALES (10,000, 35,000, 70,000); `--size N` runs N/7, N/2 and N.

Database: the benchmark starts its own mongod with tasks.fo_service in a temp folder (free port,
the WiredTiger cache of `curate.database.cache_size_gb`), sets FIFTYONE_DATABASE_URI before
anything imports FiftyOne, and stops it at the end; the project's .fiftyone is never touched.
`run(database_uri=...)` reuses a running server instead (the tests' session mongod).

Steps, each in its own fresh Python process (so a peak is that step's, not an earlier one's):
  embed    tasks.curate.signal_embeddings on the largest N, once, into a temp cache (the time
           is "embedding N images", model build + image decode + forward passes, all cores)
  load     tasks.curate.sync_fiftyone of the curated manifest (find_exclusions + apply, as the
           stage builds it) into a new dataset: action "created"
  resync   the same call again: action "unchanged" (reads the dataset back and compares)
  signals  tasks.curate_signals.compute on tasks.embeddings.reduce(first N cached vectors,
           curate.signals.embedding_dim), with each fiftyone.brain call wrapped and timed:
           compute_uniqueness, compute_representativeness, compute_near_duplicates,
           compute_leaky_splits; "other" is alignment and writing fields/tags (set_values)
Memory: a step's Python peak is VmHWM of its process, reset (/proc/self/clear_refs) right before
the timed call; each Brain call gets its own peak the same way. mongod's peak per step is its
VmHWM, reset before the step's process starts (pid from fo_service's pidfile, or by port when
reusing a server); its VmRSS after the step is what it keeps (mostly WiredTiger cache).
Ratios: re-sync ÷ first load per N, and the fitted exponent b of time ∝ N^b per step.

How FiftyOne Brain's sklearn backend finds neighbors (fiftyone-brain 0.25, scikit-learn 1.9;
fiftyone/brain/internal/core/sklearn.py, NeighborsHelper._build):
  N <= _MAX_PRECOMPUTE_DISTS = 15,000: it materializes the full N×N distance matrix
    (sklearn pairwise_distances; float32 for our float32 vectors). Uniqueness then takes its
    k = 4 neighbors with a full np.argsort of every row (_nanargmin: an N×N int64 array), so
    it needs 12·N² bytes (1.15 GB measured at 10,000, ≈2.7 GB at 15,000) and O(N² log N)
    time; near-duplicates slices the matrix again for the unique subset (dists[keep][:, keep],
    two more near-N×N float32 copies, +1.05 GB at 10,000). Memory is O(N²) up to 15,000.
  N > 15,000: sklearn.neighbors.NearestNeighbors, which for D = 64 > 15 features picks brute
    force: each query set is compared with all N (chunked ArgKmin / RadiusNeighbors
    reductions), so memory stays O(N) but time is O(N²·D). Uniqueness (k = 4 for all N) and
    near-duplicates (a radius query for all N, then k = 1 for the duplicates against the
    unique set) each build their own index and pay it. Representativeness is KMeans(20), O(N);
    leaky splits reuses the near-duplicate index and only reads split ids.
  So the dense path is a memory peak that ends at 15,000 (and is slower: uniqueness took
  10.1 s at 10,000 dense against 5.6 s at 35,000 brute force), and above it time grows
  quadratically while memory grows linearly.

Measured (run of 2026-11-28 on this machine: 2 cores, 23 GiB, shared with other work, so
±30 % between runs; 2 repeats per step, fastest kept; embedding_dim 64, threshold 0.025):
       N  load s  re-sync s  signals s (uniq / near-dup / repr / other)  signals peak MB  mongod MB
  10,000     3.0        0.9  13.6 (10.1 / 0.6 / 1.1 / 1.7)                      2,016        161
  35,000     9.2        2.5  17.0 ( 5.6 / 4.3 / 2.3 / 4.6)                      1,470        220
  70,000    18.1        5.0  46.0 (15.7 / 16.0 / 4.8 / 8.9)                     2,135        289
  embedding 70,000 images: 140–310 s across runs (226–500 images/s), peak 2.1–2.5 GB.
  Load is linear (b ≈ 1.0, 0.26 s per 1,000); the Brain step has b ≈ 1.2–1.4 between 35k and
  70k and its quadratic term already dominates near-duplicates and uniqueness at 70k.
Where it stops being practical (fits in `scaling`): time, not memory. With t = a·N + c·N²
through 35k and 70k, the Brain signals step passes 10 minutes at about 0.3–0.45 M samples
(three runs: 0.32, 0.42, 0.44 M), uniqueness and near-duplicates alone each at ≈0.45–0.55 M.
Memory above 15,000 grows ≈19 MB per 1,000 samples in the signals step (mostly the PCA in
tasks.embeddings.reduce over the 1,536-d features), so 20 GiB only at ≈1 M; the embedding step
(every image and feature held in memory) reaches 20 GiB at ≈0.6–0.75 M and 10 minutes at
≈0.14–0.3 M images, but is cached per (version, model). mongod stays under its 1 GB WiredTiger
cache plus ≈1.7 MB per 1,000 samples; loading stays under 10 minutes to ≈2 M samples.
Beyond ≈0.3 M samples on 2 cores the sklearn backend should give way to an approximate-neighbor
index (another Brain similarity backend) or sampling.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCALES = (10_000, 35_000, 70_000)
MEMORY_LIMIT_GIB = 20.0  # "stops being practical": peak memory above this on a 24 GiB machine ...
TIME_LIMIT_S = 600.0  # ... or one step longer than 10 minutes
PROJECT_AT_MOST = 100  # projections beyond 100× the largest scale are reported as None
BRAIN_CALLS = ("compute_uniqueness", "compute_representativeness", "compute_near_duplicates",
               "compute_leaky_splits")
RESULT_MARK = "BENCH-CURATE-RESULT "  # FiftyOne logs to stdout; the figures line is marked
CHILD_TIMEOUT_S = 3600
REPEATS = 2  # load, re-sync and signals per scale, each time on a new dataset; the faster run counts


# --------------------------------------------------------------------------- memory of a process


def _status_mb(key: str, pid: int | str = "self") -> float | None:
    """VmHWM / VmRSS of a process from /proc, in MB (None when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's VmHWM to its current RSS (Linux clear_refs 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Meter:
    """Peaks of successive parts of one process: VmHWM read and reset around each part."""

    def __init__(self) -> None:
        self.resettable = _reset_peak()
        self.max_mb = _status_mb("VmHWM") or 0.0

    def part(self, fn, *args, **kwargs):
        """Call fn; returns (result, {seconds, peak_rss_mb, peak_above_start_mb})."""
        self.max_mb = max(self.max_mb, _status_mb("VmHWM") or 0.0)
        start_mb = _status_mb("VmRSS") or 0.0
        _reset_peak()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        peak = _status_mb("VmHWM") or 0.0
        self.max_mb = max(self.max_mb, peak)
        return out, {"seconds": round(seconds, 3), "peak_rss_mb": round(peak, 1),
                     "peak_above_start_mb": round(peak - start_mb, 1)}


# --------------------------------------------------------------------------- the measured steps (children)


def _curated_rows(rows_path: str, n: int):
    """The first n rows as the stage builds them for FiftyOne: rules, then no decisions."""
    from tasks import curation
    from tasks.curate import find_exclusions
    from tasks.io import load_table

    df = find_exclusions(load_table(rows_path).slice(0, n), exclude_duplicates=True, exclude_leakage=True)
    return curation.apply(df, curation.empty())


def _step_embed(a: dict, meter: _Meter) -> dict:
    from tasks.curate import signal_embeddings
    from tasks.io import load_table
    from tasks.params import TrainParams

    rows = load_table(a["rows"]).to_pandas()
    emb, m = meter.part(signal_embeddings, rows, Path(a["images_root"]), version=a["version"],
                        n_classes=len(a["classes"]), train=TrainParams(**a["train"]), cache_dir=Path(a["cache_dir"]),
                        batch_size=a["batch_size"], seed=a["seed"])
    return {"n": len(rows), **m, "images_per_s": round(len(rows) / m["seconds"], 1), "cached": emb.cached,
            "cache_file": str(emb.cache_file), "raw_dim": int(emb.vectors.shape[1])}


def _step_sync(a: dict, meter: _Meter, expect: str) -> dict:
    from tasks import curate_fiftyone
    from tasks.curate import sync_fiftyone
    from tasks.params import DatabaseParams

    database = DatabaseParams(uri=a["uri"], timeout_s=a["timeout_s"])
    t0 = time.perf_counter()
    manifest_df = _curated_rows(a["rows"], a["n"])
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    curate_fiftyone.import_fiftyone(database)  # import fiftyone + ping; not part of the sync time
    connect_s = time.perf_counter() - t0
    report, m = meter.part(sync_fiftyone, manifest_df, images_root=Path(a["images_root"]),
                           dataset_name=a["dataset"], classes=a["classes"], database=database)
    if report["action"] != expect or report["n_samples"] != a["n"]:
        raise RuntimeError(f"sync of {a['n']} rows: expected action {expect!r} with {a['n']} samples, got {report}")
    return {"n": a["n"], **m, "action": report["action"], "prep_s": round(prep_s, 3),
            "connect_s": round(connect_s, 3), "n_excluded": int(manifest_df["excluded"].sum())}


def _step_signals(a: dict, meter: _Meter) -> dict:
    from tasks import curate_fiftyone, curate_signals
    from tasks.embeddings import reduce
    from tasks.params import DatabaseParams

    fo = curate_fiftyone.import_fiftyone(DatabaseParams(uri=a["uri"], timeout_s=a["timeout_s"]))
    import fiftyone.brain as fob
    from fiftyone.brain.internal.core import sklearn as brain_sklearn

    dataset = fo.load_dataset(a["dataset"])
    try:
        with np.load(a["cache_file"], allow_pickle=False) as z:
            sample_ids = z["sample_ids"][: a["n"]]
            raw = z["vectors"][: a["n"]].astype(np.float32)
        vectors, reduce_m = meter.part(reduce, raw, a["dim"], seed=a["seed"])
        calls: dict[str, dict] = {}

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                out, calls[name] = meter.part(fn, *args, **kwargs)
                return out
            return wrapper

        for name in BRAIN_CALLS:  # curate_signals.compute looks these up on the module at call time
            setattr(fob, name, timed(name, getattr(fob, name)))
        t0 = time.perf_counter()
        signals = curate_signals.compute(fo, dataset, sample_ids, vectors, threshold=a["threshold"])
        total = time.perf_counter() - t0
    finally:
        dataset.delete()  # not timed; the next scale starts from an empty database
    limit = getattr(brain_sklearn, "_MAX_PRECOMPUTE_DISTS", None)
    return {
        "n": a["n"], "seconds": round(total, 3), "peak_rss_mb": round(meter.max_mb, 1),
        "reduce": reduce_m, "calls": calls,
        "other_s": round(total - sum(c["seconds"] for c in calls.values()), 3),
        "dense_limit": limit, "dense_matrix": limit is not None and a["n"] <= limit,
        "n_near_duplicate": int(signals["near_duplicate_of"].notna().sum()),
        "n_leaks": int(signals["leaks_with"].notna().sum()),
    }


def _child(step: str, a: dict) -> None:
    """One measured step in this (fresh) process; prints its figures as one marked JSON line."""
    t0 = time.perf_counter()
    meter = _Meter()
    if step == "embed":
        out = _step_embed(a, meter)
    elif step in ("load", "resync"):
        out = _step_sync(a, meter, expect="created" if step == "load" else "unchanged")
    elif step == "signals":
        out = _step_signals(a, meter)
    else:
        raise ValueError(f"unknown step {step!r}; expected embed, load, resync or signals")
    out.update(process_s=round(time.perf_counter() - t0, 2), peak_reset=meter.resettable,
               process_peak_rss_mb=round(max(meter.max_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), 1))
    print(RESULT_MARK + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mongod_by_port(uri: str) -> int | None:
    """The pid of a local mongod started with --port <the URI's port> (None if not found)."""
    port = str(urlparse(uri).port or 27017)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and Path(argv[0]).name == "mongod" and any(
                x == "--port" and y == port for x, y in itertools.pairwise(argv)):
            return int(proc.name)
    return None


@contextmanager
def _database(uri: str | None, folder: Path, cache_size_gb: float, timeout_s: float):
    """(uri, mongod pid, cache GB): a fresh mongod of our own in `folder`, or the server at `uri`.

    FIFTYONE_DATABASE_URI is set for the duration so every child reaches the same server.
    """
    from tasks import fo_service
    from tasks.params import DatabaseParams

    saved = os.environ.pop("FIFTYONE_DATABASE_URI", None)
    spec = None
    try:
        if uri is None:
            spec = fo_service.spec_for(DatabaseParams(port=_free_port(), dir=folder / "db",
                                                      cache_size_gb=cache_size_gb, timeout_s=timeout_s))
            fo_service.start(spec)
            uri, pid = spec.uri, fo_service._pid(spec)
        else:
            pid, cache_size_gb = _mongod_by_port(uri), None
        os.environ["FIFTYONE_DATABASE_URI"] = uri
        yield uri, pid, cache_size_gb
    finally:
        if spec is not None:
            fo_service.stop(spec)
        os.environ.pop("FIFTYONE_DATABASE_URI", None)
        if saved is not None:
            os.environ["FIFTYONE_DATABASE_URI"] = saved


def _measure(step: str, args: dict, mongod_pid: int | None) -> dict:
    """Run one step in a fresh process; its figures plus mongod's peak and resident MB."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    reset = mongod_pid is not None and _reset_peak(mongod_pid)
    print(f"curate bench: {step} N={args.get('n', 'all rows')} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "bench.curate", step, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"curate bench step {step} (N={args.get('n')}) failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout)[-3000:]}")
    out = json.loads(lines[-1][len(RESULT_MARK):])
    if mongod_pid is not None:
        out["mongod"] = {"peak_rss_mb": _status_mb("VmHWM", mongod_pid), "rss_after_mb": _status_mb("VmRSS", mongod_pid),
                         "peak_is_this_step": reset}
    return out


def scales_for(size: int | None) -> tuple[int, ...]:
    """SCALES, or N/7, N/2, N for `--size N` (70,000 gives SCALES)."""
    if size is None:
        return SCALES
    return tuple(sorted({max(2, round(size / 7)), max(2, round(size / 2)), size}))


def _exponent(ns: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log N (None with fewer than two usable points)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if y and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


def _n_at_time(ns: list[int], ts: list[float], limit_s: float) -> tuple[dict | None, int | None]:
    """(model, N where t = a·N + c·N² through the two largest scales reaches limit_s).

    Linear plus quadratic because that is the cost model read from the code (database reads
    and writes per sample; exhaustive neighbor search over all pairs); a and c are kept >= 0
    (a negative one is dropped and the other refitted through the largest scale).
    """
    if len(ns) < 2 or ns[-1] == ns[-2] or not ts[-1] or ts[-1] <= 0:
        return None, None
    (n1, n2), (t1, t2) = ns[-2:], ts[-2:]
    c = (t2 / n2 - t1 / n1) / (n2 - n1)
    a = t2 / n2 - c * n2
    if c < 0:
        a, c = t2 / n2, 0.0
    elif a < 0:
        a, c = 0.0, t2 / n2**2
    n = limit_s / a if c == 0 else (-a + math.sqrt(a * a + 4 * c * limit_s)) / (2 * c)
    model = {"a_s_per_1000": round(a * 1000, 4), "c_s_per_1000_squared": round(c * 1e6, 6)}
    return model, int(n) if n <= PROJECT_AT_MOST * ns[-1] else None


def _n_at_memory(ns: list[int], ms: list[float], limit_mb: float) -> tuple[float | None, int | None]:
    """(MB per 1,000 samples, N where the line through the two largest scales reaches limit_mb)."""
    if len(ns) < 2 or ns[-1] == ns[-2]:
        return None, None
    k = (ms[-1] - ms[-2]) / (ns[-1] - ns[-2])
    if k <= 0:
        return round(k * 1000, 2), None
    n = ns[-1] + (limit_mb - ms[-1]) / k
    return round(k * 1000, 2), int(n) if n <= PROJECT_AT_MOST * ns[-1] else None


def _scaling(scales: list[int], per: dict, limit_mb: float) -> dict:
    """Exponents and the projected N where each step hits TIME_LIMIT_S or limit_mb."""
    big = [n for n in scales if n > (per[scales[-1]]["signals"]["dense_limit"] or 0)]
    out: dict = {"time_limit_s": TIME_LIMIT_S, "memory_limit_mb": round(limit_mb),
                 "fit": "time_exponent: b of t ∝ N^b between the two largest scales (also over all scales); "
                        "n_at_time_limit: t = a·N + c·N² (a, c >= 0) through the two largest scales; "
                        "n_at_memory_limit: a straight line through the two largest scales; None: not "
                        f"reached within {PROJECT_AT_MOST}× the largest scale (or not growing)",
                 "brute_force_scales": big, "steps": {}}
    series = {
        "load": ([per[n]["load"]["seconds"] for n in scales], [per[n]["load"]["peak_rss_mb"] for n in scales]),
        "resync": ([per[n]["resync"]["seconds"] for n in scales], [per[n]["resync"]["peak_rss_mb"] for n in scales]),
        "signals": ([per[n]["signals"]["seconds"] for n in scales], [per[n]["signals"]["peak_rss_mb"] for n in scales]),
        "reduce": ([per[n]["signals"]["reduce"]["seconds"] for n in scales],
                   [per[n]["signals"]["reduce"]["peak_rss_mb"] for n in scales]),
        **{f"signals.{c}": ([per[n]["signals"]["calls"][c]["seconds"] for n in scales],
                            [per[n]["signals"]["calls"][c]["peak_rss_mb"] for n in scales])
           for c in BRAIN_CALLS if all(c in per[n]["signals"]["calls"] for n in scales)},
    }
    mongod = [per[n]["load"].get("mongod", {}).get("peak_rss_mb") for n in scales]
    if all(mongod):
        series["load+mongod"] = ([per[n]["load"]["seconds"] for n in scales],
                                 [m + p for m, p in zip(mongod, series["load"][1])])
    for name, (ts, ms) in series.items():
        model, n_time = _n_at_time(scales, ts, TIME_LIMIT_S)
        per_k, n_mem = _n_at_memory(scales, ms, limit_mb)
        out["steps"][name] = {"time_exponent": _round(_exponent(scales[-2:], ts[-2:]), 2),
                              "time_exponent_all_scales": _round(_exponent(scales, ts), 2),
                              "time_model": model, "n_at_time_limit": n_time,
                              "mb_per_1000_samples": per_k, "n_at_memory_limit": n_mem}
    return out


def _embed_scaling(embed: dict, limit_mb: float) -> dict:
    """Embedding is linear by construction (every image decoded and held, one forward each)."""
    s_per, mb_per = embed["seconds"] / embed["n"], max(embed["peak_above_start_mb"], 1e-9) / embed["n"]
    return {"measured_at": embed["n"], "fit": "linear through the origin from the one measured scale",
            "n_at_time_limit": int(TIME_LIMIT_S / s_per),
            "n_at_memory_limit": int((limit_mb - (embed["peak_rss_mb"] - embed["peak_above_start_mb"])) / mb_per)}


def _best(runs: list[dict]) -> dict:
    """The fastest run of a step, with every run's time (and each Brain call's) alongside."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["seconds_all"] = [r["seconds"] for r in runs]
    if "calls" in best:
        best["calls"] = {c: {**v, "seconds_all": [r["calls"].get(c, {}).get("seconds") for r in runs]}
                         for c, v in best["calls"].items()}
    return best


def _round(x: float | None, d: int) -> float | None:
    return None if x is None else round(x, d)


def _machine_gib() -> float | None:
    mb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mb = int(line.split()[1]) / 1024
    except OSError:
        return None
    return None if mb is None else round(mb / 1024, 1)


def _table(scales: list[int], per: dict) -> str:
    head = ["N", "load s", "load MB", "mongod MB", "resync s", "resync MB", "reduce s",
            *(c.removeprefix("compute_")[:14] + " s" for c in BRAIN_CALLS), "other s", "signals s", "signals MB"]
    rows = []
    for n in scales:
        p = per[n]
        s = p["signals"]
        rows.append([f"{n:,}", p["load"]["seconds"], p["load"]["peak_rss_mb"],
                     p["load"].get("mongod", {}).get("peak_rss_mb"), p["resync"]["seconds"], p["resync"]["peak_rss_mb"],
                     s["reduce"]["seconds"], *(s["calls"].get(c, {}).get("seconds") for c in BRAIN_CALLS), s["other_s"],
                     s["seconds"], s["peak_rss_mb"]])
    cells = [head] + [[v if isinstance(v, str) else "-" if v is None else f"{v:,.1f}" for v in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, width)) for r in cells)


def run(size: int | None = None, *, scales: tuple[int, ...] | None = None, params=None,
        ingest_dir: Path | None = None, database_uri: str | None = None, repeats: int = REPEATS) -> dict:
    """Measure load, re-sync and Brain signals at each scale; returns the figures.

    Args:
        size: the largest scale (N/7, N/2, N); ignored when `scales` is given.
        scales: sample counts to measure (default SCALES).
        params: a loaded Params (default params.yaml): curate.signals and train are used.
        ingest_dir: the ingested version (default `paths.data`/ingest).
        database_uri: reuse this running MongoDB instead of starting a fresh mongod.
        repeats: runs of (load, resync, signals) per scale, each on a new dataset; per step
            the fastest counts (all times are kept as seconds_all).
    """
    from tasks.io import load_table, read_json
    from tasks.params import load_params, section_dict

    params = params or load_params()
    ingest_dir = Path(ingest_dir or Path(params.paths.data) / "ingest").resolve()
    missing = [f for f in ("manifest.parquet", "classes.json", "version.json") if not (ingest_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{ingest_dir}: {', '.join(missing)} not found; the curate benchmark needs the ingested "
            f"Fashion-MNIST version there. Create it with `make run` or `python -m tasks.ingest`.")
    scales = sorted(set(scales or scales_for(size)))
    manifest = load_table(ingest_dir / "manifest.parquet")
    if scales[-1] > manifest.num_rows or scales[0] < 2:
        raise ValueError(f"scales {scales}: each must be within 2..{manifest.num_rows:,} "
                         f"(the rows of {ingest_dir / 'manifest.parquet'})")
    classes = read_json(ingest_dir / "classes.json")
    version = read_json(ingest_dir / "version.json")["version"]
    sig = params.curate.signals
    order = np.random.default_rng(0).permutation(manifest.num_rows)[: scales[-1]]
    figures: dict = {
        "version": version, "scales": scales, "repeats": repeats, "machine_memory_gib": _machine_gib(),
        "signals": {"embedding_dim": sig.embedding_dim, "threshold": sig.near_duplicate_threshold,
                    "model": params.train.model, "image_size": params.train.image_size},
        "memory": "VmHWM of each step's own process, reset just before the timed call; mongod VmHWM reset "
                  "before each step",
    }
    per: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pixelops-bench-curate-") as tmp:
        tmp = Path(tmp)
        rows_path = tmp / "rows.parquet"
        from tasks.io import save_table

        save_table(manifest.take(order), rows_path)
        with _database(database_uri, tmp, params.curate.database.cache_size_gb,
                       max(params.curate.database.timeout_s, 30.0)) as (uri, pid, cache_gb):
            figures["database"] = {"own_mongod": database_uri is None, "mongod_pid_found": pid is not None,
                                   "wiredtiger_cache_gb": cache_gb}
            common = {"rows": str(rows_path), "images_root": str(ingest_dir), "classes": classes, "uri": uri,
                      "timeout_s": max(params.curate.database.timeout_s, 30.0), "seed": params.seed}
            embed = _measure("embed", {**common, "version": version, "train": section_dict(params, "train"),
                                       "cache_dir": str(tmp / "cache"), "batch_size": sig.batch_size}, pid)
            figures["embedding"] = embed
            for n in scales:
                runs = []
                for _ in range(repeats):
                    step = {**common, "n": n, "dataset": f"pixelops-bench-curate-{n}-{uuid.uuid4().hex[:8]}"}
                    runs.append({
                        "load": _measure("load", step, pid), "resync": _measure("resync", step, pid),
                        "signals": _measure("signals", {**step, "cache_file": embed["cache_file"],
                                                        "dim": sig.embedding_dim,
                                                        "threshold": sig.near_duplicate_threshold}, pid)})
                per[n] = {k: _best([r[k] for r in runs]) for k in ("load", "resync", "signals")}
    figures["per_scale"] = {str(n): per[n] for n in scales}
    limit_mb = MEMORY_LIMIT_GIB * 1024
    figures["scaling"] = _scaling(scales, per, limit_mb)
    figures["scaling"]["steps"]["embed"] = _embed_scaling(embed, limit_mb)
    ratios = {f"re-sync / first load, N={n:,}": per[n]["resync"]["seconds"] / per[n]["load"]["seconds"]
              for n in scales}
    for name in ("load", "resync", "signals"):
        b = figures["scaling"]["steps"][name]["time_exponent"]
        if b is not None:
            ratios[f"{name}: b in time ∝ N^b ({scales[-2]:,}→{scales[-1]:,})"] = b
    top = per[scales[-1]]["signals"]
    name, call = max(top["calls"].items(), key=lambda kv: kv[1]["seconds"])
    ratios[f"{name} / all signals time, N={scales[-1]:,}"] = call["seconds"] / top["seconds"]
    figures["ratios"] = ratios
    table = _table(scales, per)
    figures["table"] = table.splitlines()
    print(f"embedding {embed['n']:,} images: {embed['seconds']:.1f} s ({embed['images_per_s']:.0f} images/s), "
          f"peak {embed['peak_rss_mb']:.0f} MB")
    print(table)
    return figures


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
