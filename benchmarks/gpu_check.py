"""GPU validation in one prepared run (issue 17): bf16 training, the sampling forward, ONNX Runtime CUDA, NCCL.

    python benchmarks/gpu_check.py [--only PART[,PART]] [--run DIR] [--loop FILE] [--ort-path DIR] [--out DIR]
                                   [--cap SECONDS] [--no-docs] [--rehearse]
    python benchmarks/gpu_check.py --report benchmarks/results/gpu_check.json   # the table again, nothing run

Parts, in order (each in its own process, killed at --cap seconds, 60 by default; the whole run stops starting
parts after 240 s): tests (the gpu-marked tests), train-fpdm and train-dit (XL/2, bf16, batch 64, checkpointing
on and off, against REFERENCE.md's official H200 figures), forward (FPDM-XL/2 sampling forward, batch 64, 26 and
8 iterations, eager and torch.compile), ort (the XL step graph at K = 8, fp16, ONNX Runtime CUDA with IO
binding, against the forward part's torch.compile at 8), nccl (a 1-process torchrun training a few steps) and
demo (the demo model's best sampling plan in images/s per backend; --run DIR names the model, else a fresh one;
--loop FILE adds a whole-loop export of it, carried in because an XL whole loop is too big to carry).

A part that fails, crashes or times out is recorded and the others still run; `--only PART` reruns it and merges
it into the earlier JSON. Writes benchmarks/results/gpu_check.json and .md and, on a GPU, the table between the
`bench:gpu_check` markers of docs/benchmarks.md (not with --no-docs). `--ort-path DIR` (or FPDM_ORT_PATH) puts
an onnxruntime-gpu assembled from pieces first on every part's path.

Without CUDA (or with --rehearse) it rehearses: every part runs at tiny sizes on the CPU, the JSON goes to
gpu_check_rehearsal.json (under --out) and docs are never touched. Exit status 1 when a part did not pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _gpu_check_demo
import _gpu_check_parts as parts
from _gpu_check_parts import Settings
from _gpu_check_report import markdown
from _report import RESULTS, ROOT, update_doc, write_results

CAP_S, TOTAL_S, MIN_START_S = 60.0, 240.0, 10.0


@dataclasses.dataclass(frozen=True)
class Part:
    run: Callable[[Settings], dict[str, Any]]
    claim: str  # what the part establishes, for the table
    needs: str  # what about it needs a GPU, for the rehearsal's one line


PARTS = {
    "tests": Part(parts.tests, "the gpu-marked tests pass", "the gpu tests skip here"),
    "train-fpdm": Part(lambda s: parts.train("FPDM-XL/2", s), "FPDM-XL/2 training", "bf16, CUDA peak memory"),
    "train-dit": Part(lambda s: parts.train("DiT-XL/2", s), "DiT-XL/2 training", "bf16, CUDA peak memory"),
    "forward": Part(parts.forward, "FPDM-XL/2 sampling forward", "bf16, inductor"),
    "ort": Part(parts.ort, "ONNX Runtime CUDA step", "CUDA provider, IO binding; CPU provider here"),
    "nccl": Part(parts.nccl, "1-process torchrun, NCCL", "NCCL; gloo here"),
    "demo": Part(_gpu_check_demo.demo, "demo model, best sampling plan", "CUDA speed"),
}
WORKERS = {"nccl-worker": parts.nccl_worker}  # started by a part, never by the parent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return child(args.part, Settings(**json.loads(args.settings)))
    if args.report:
        results = json.loads(args.report.read_text())
        return publish(
            args.report.parent, args.report.stem, results, docs=not results["rehearsal"] and not args.no_docs
        )
    names = selected(args.only)
    rehearsal = args.rehearse or not torch.cuda.is_available()
    settings = Settings(rehearsal=rehearsal, run=args.run, loop=args.loop)
    name = "gpu_check_rehearsal" if rehearsal else "gpu_check"
    out = args.out or RESULTS
    if rehearsal:
        needs = "; ".join(f"{n} ({p.needs})" for n, p in PARTS.items())
        print(f"no CUDA: rehearsing every part at tiny sizes on the CPU, docs untouched; a GPU is needed for: {needs}")
    previous = out / f"{name}.json"
    results = json.loads(previous.read_text()) if args.only and previous.is_file() else {"parts": {}}
    results.update(command=command_line(argv), rehearsal=rehearsal, machine=machine(rehearsal))
    deadline = time.monotonic() + TOTAL_S
    for part in names:
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            record = {"status": "skipped", "seconds": 0.0, "error": f"the run's {TOTAL_S:.0f} s were spent"}
        else:
            record = run_part(part, settings, cap=min(args.cap, left), env=child_env(args.ort_path, rehearsal))
        results["parts"][part] = record
        error = f" ({record['error']})" if record.get("error") else ""
        print(f"{part}: {record['status']} in {record['seconds']:.1f} s{error}", flush=True)
    results["parts"] = {n: results["parts"][n] for n in PARTS if n in results["parts"]}  # the table's order
    return publish(out, name, results, docs=not rehearsal and not args.no_docs)


def publish(out: Path, name: str, results: dict[str, Any], *, docs: bool) -> int:
    """JSON, markdown and (docs) the docs table. A table that fails to render still leaves the JSON, and
    `--report FILE` renders it again: the measurements of a GPU run are worth more than its table."""
    try:
        table = markdown(results, {n: p.claim for n, p in PARTS.items()})
    except Exception:
        traceback.print_exc()
        write_results(out, name, results, "the table failed to render: `python benchmarks/gpu_check.py --report`\n")
        return 1
    write_results(out, name, results, table)
    if docs:
        update_doc("gpu_check", table)
    print(table)
    return 0 if all(r["status"] == "ok" for r in results["parts"].values()) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma list of parts to (re)run: {', '.join(PARTS)}")
    parser.add_argument("--run", help="the demo model: a run, checkpoint or packed folder (default: a fresh one)")
    parser.add_argument("--loop", help="a whole-loop .onnx export of the demo model to time as well")
    parser.add_argument("--ort-path", default=os.environ.get("FPDM_ORT_PATH"), help="put first on sys.path")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--cap", type=float, default=CAP_S, help="seconds a part may run (default 60)")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md as it is")
    parser.add_argument("--rehearse", action="store_true", help="rehearse on the CPU even where CUDA is present")
    parser.add_argument(
        "--report", type=Path, help="render the table (and docs) again from a results JSON; run nothing"
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_path and not Path(args.ort_path).is_dir():
        parser.error(f"--ort-path {args.ort_path} is not a folder")
    if args.loop:
        check_loop(parser, args.loop)
    if args.report and not args.report.is_file():
        parser.error(f"--report {args.report} is not a file")
    return args


def check_loop(parser: argparse.ArgumentParser, path: str) -> None:
    """--loop must be a whole-loop export: said now, not after minutes of other parts."""
    from fpdm.errors import UsageError
    from fpdm.export.onnx import read_metadata

    try:
        kind = read_metadata(path)["kind"]
    except UsageError as exc:
        parser.error(f"--loop: {exc}")
    if kind != "loop":
        parser.error(f"--loop {path} holds one denoising step, not a whole loop: export with --whole-loop")


def selected(only: str | None) -> list[str]:
    if not only:
        return list(PARTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise SystemExit(f"unknown part {unknown[0] if unknown else only!r}; the parts are {', '.join(PARTS)}")
    return names


def command_line(argv: list[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return " ".join(["python benchmarks/gpu_check.py", *given])


def machine(rehearsal: bool) -> dict[str, Any]:
    card = None if rehearsal else torch.cuda.get_device_name()
    return {
        "card": card,
        "gpus": 0 if rehearsal else torch.cuda.device_count(),
        "cuda": None if rehearsal else torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def child_env(ort_path: str | None, rehearsal: bool) -> dict[str, str]:
    """Every part's environment: onnxruntime's folder first on the path (PYTHONPATH also reaches the pytest and
    torchrun processes a part starts). A rehearsal sees no CUDA device and runs one thread per process: its
    models are tiny, and on a shared machine OpenMP threads that wait for a busy core stall it tenfold."""
    env = dict(os.environ)
    if ort_path:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(ort_path).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    if rehearsal:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def run_part(name: str, settings: Settings, *, cap: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one part in a new process session, killed with everything it started after `cap` seconds."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", name]
    command += ["--settings", json.dumps(dataclasses.asdict(settings))]
    start = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # the part's own session: pytest, torchrun, their workers
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status, error = "timeout", f"still running after {cap:.0f} s: killed"
    else:
        result = parts.parse_result(stdout)
        if proc.returncode == 0 and result is not None:
            return {"status": "ok", "seconds": time.monotonic() - start, "cap_s": cap, "result": result}
        lines = [line for line in stderr.splitlines() if line.strip()]
        status, error = "failed", lines[-1][:400] if lines else f"exit {proc.returncode} with no message"
    # what the part printed before it stopped (a part prints each row as it measures it) and its traceback
    return {
        "status": status,
        "seconds": time.monotonic() - start,
        "cap_s": cap,
        "error": error,
        "stdout": stdout[-3000:],
        "stderr": stderr[-3000:],
    }


def child(name: str, settings: Settings) -> int:
    """Inside a part's process: run it and print its result as one line; an error is the last stderr line."""
    run = WORKERS.get(name) or PARTS[name].run
    try:
        result = run(settings)
    except Exception as exc:
        traceback.print_exc()
        print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", file=sys.stderr)
        return 1
    print(parts.RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
