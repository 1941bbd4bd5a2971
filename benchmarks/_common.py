"""What the benchmark scripts share: their options, their one output format, the real data and the CLI.

Every script builds its parser with :func:`parser` (which adds ``--json PATH``), measures, and
ends with ``return report(NAME, args, rows, checks)``: a table on stdout and, with ``--json``,
one JSON document of the same shape for every benchmark::

    {"benchmark": NAME, "version": collabcompress version, "settings": {option: value},
     "rows": [{column: number | string | bool | null}],
     "checks": [{"target": text, "value": number | string | null, "passed": bool | null}],
     "machine": {"cpu_count": int, "torch": version | null, "python": version}}

Rows are flat (nested dicts are flattened to ``outer.inner`` keys); ``passed`` is ``null`` for a
target that was not measured in this run. Exit codes: 0 every measured target met, 1 one was
missed, 2 the data or a tool the benchmark needs is missing (:data:`MISSING`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = 2  # exit code when the model, the corpus or an optional tool is not there

Scalar = int | float | str | bool | None


# --------------------------------------------------------------------------- options

def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring (first line, then the rest as the
    epilog), with the ``--json PATH`` option every benchmark takes."""
    first, _, rest = doc.strip().partition("\n")
    ap = argparse.ArgumentParser(description=first, epilog=rest.strip() or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the result as JSON (format: benchmarks/README.md)")
    return ap


# --------------------------------------------------------------------------- the one output format

def check(target: str, value: Scalar, passed: bool | None) -> dict[str, Any]:
    """One target of a benchmark: what it asks, the measured value, whether it was met
    (``None``: not measured in this run)."""
    return {"target": target, "value": value, "passed": None if passed is None else bool(passed)}


def flat(row: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other containers are refused (rows are flat)."""
    out: dict[str, Scalar] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            raise TypeError(f"row value {name!r} is a {type(value).__name__}: rows hold numbers, strings, "
                            "booleans or null")
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on (no host names, no machine models)."""
    try:
        torch_version: str | None = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"cpu_count": os.cpu_count(), "torch": torch_version, "python": platform.python_version()}


def version() -> str:
    """The version of the collabcompress these scripts import (the source tree's, when run from it)."""
    import collabcompress

    return collabcompress.__version__


def settings(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The options of a run, JSON-ready (paths as strings), without ``--json`` itself."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in items if k != "json"}


def document(name: str, args: argparse.Namespace | Mapping[str, Any], rows: Iterable[Mapping[str, Any]],
             checks: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The JSON document of one run (the format in this module's docstring)."""
    return {"benchmark": name, "version": version(), "settings": settings(args), "rows": [flat(r) for r in rows],
            "checks": [dict(c) for c in checks], "machine": machine()}


def _cell(value: Scalar) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[Mapping[str, Scalar]]) -> list[str]:
    """Markdown tables of flat rows; consecutive rows with the same columns share one table."""
    lines: list[str] = []
    i = 0
    while i < len(rows):
        keys = list(rows[i])
        j = i
        while j < len(rows) and list(rows[j]) == keys:
            j += 1
        if lines:
            lines.append("")
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows[i:j]]
        i = j
    return lines


def report(name: str, args: argparse.Namespace, rows: Iterable[Mapping[str, Any]],
           checks: Sequence[Mapping[str, Any]] = ()) -> int:
    """Print the rows as tables and the checks, write the JSON document to ``args.json`` when given,
    and return the exit code: 1 when a measured target was missed, else 0."""
    doc = document(name, args, rows, checks)
    print("\n".join(table(doc["rows"])) or "(no rows)")
    for c in doc["checks"]:
        mark = {True: "PASS", False: "FAIL", None: " -- "}[c["passed"]]
        print(f"[{mark}] {c['target']}: {_cell(c['value'])}")
    if getattr(args, "json", None) is not None:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"written: {args.json}")
    return 1 if any(c["passed"] is False for c in doc["checks"]) else 0


def log(msg: str) -> None:
    """Progress, to stderr (stdout is the table)."""
    print(msg, file=sys.stderr, flush=True)


def missing(what: str) -> int:
    """Say what is missing and how to get it; the exit code :data:`MISSING`."""
    log(f"{what} (the real data: python scripts/fetch_data.py)")
    return MISSING


# --------------------------------------------------------------------------- the real data

def cache_dir() -> Path:
    """The package's data cache (:func:`collabcompress.files.texts.cache_dir`), imported lazily
    so that scripts which only time the CLI do not import torch themselves."""
    from collabcompress.files.texts import cache_dir as package_cache_dir

    return package_cache_dir()


def minilm() -> Path:
    """The real all-MiniLM-L6-v2 fetched by scripts/fetch_data.py."""
    return cache_dir() / "all-MiniLM-L6-v2"


def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct fetched by scripts/fetch_data.py."""
    return cache_dir() / "smollm2-135m-instruct"


def lee() -> Path:
    """The Lee corpus directory (lee.cor, lee_background.cor, similarities0-1.txt)."""
    return cache_dir() / "lee"


def read_corpus(path: Path) -> list[str]:
    """One document per non-empty line; the Lee files are latin-1."""
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def utf8_copy(documents: Sequence[str], path: Path) -> Path:
    """``documents`` one per line in a UTF-8 file (what ``--texts`` reads)."""
    path.write_text("\n".join(documents) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the CLI

def collabcompress_command() -> list[str]:
    """The console script beside this interpreter (as a user runs it), else ``python -m``."""
    script = Path(sys.executable).with_name("collabcompress")
    if script.is_file():
        return [str(script)]
    found = shutil.which("collabcompress")
    return [found] if found else [sys.executable, "-m", "collabcompress.cli"]


def cli(*arguments: str | os.PathLike, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``collabcompress ARGUMENTS --json FILE`` as a fresh process and return its JSON result;
    a failure ends the benchmark with the command's message (its exit code)."""
    with tempfile.TemporaryDirectory(prefix="cc-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*collabcompress_command(), *map(str, arguments), "--json", str(out)]
        proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=None if env is None else {**os.environ, **env})
        if proc.returncode != 0:
            log(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
            raise SystemExit(proc.returncode)
        return json.loads(out.read_text(encoding="utf-8"))


def timed(cmd: Sequence[str | os.PathLike]) -> float:
    """Wall seconds of ``cmd`` as a fresh process, start-up included; a failure ends the benchmark."""
    cmd = [str(c) for c in cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        log(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
        raise SystemExit(proc.returncode)
    return elapsed


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a live process in bytes (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``cmd`` as a fresh process (killed if this one is interrupted): wall seconds, exit code,
    stderr, its own ``ru_maxrss`` (``peak_rss``, bytes) and the polled peaks of VmHWM, RssAnon and
    RssFile (``peak_vmhwm``, ``peak_anon``, ``peak_file``)."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in proc_status(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        stderr = proc.stderr.read() if proc.stderr else b""
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        done.set()
        poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - start, "returncode": proc.returncode,
            "stderr": stderr.decode(errors="replace"), "peak_rss": usage.ru_maxrss * 1024,
            "peak_vmhwm": peaks["VmHWM"], "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"]}


def shard_groups(shapes: Mapping[str, Sequence[int]], shard_bytes: int, element_bytes: int) -> list[list[str]]:
    """Tensor names split into shards as transformers splits them: in order, a new shard when the
    next tensor would pass ``shard_bytes``."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = element_bytes * math.prod(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups
