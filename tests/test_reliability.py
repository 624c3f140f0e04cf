"""Reliability: crash safety of training (SIGKILL, torn writes, disk full, a second run), untrusted files,
non-finite numbers, misbehaving plugins and long sampling runs. The crash tests run `fpdm` in subprocesses
and kill them for real; their counts go to README's Reliability section (see reliability_support)."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import fpdm
from fakedist import fake_dist
from fpdm.errors import FpdmRuntimeError, UsageError
from fpdm.interfaces import Solver, SolverResult
from fpdm.io.checkpoint import LOCK_NAME, RunLock, list_checkpoints, load_checkpoint
from fpdm.models.transformer import FPDM
from fpdm.registry import Registry, default_registry
from fpdm.training.loop import train
from reliability_support import COUNTS, assert_one_line_error, cli, flush_counts
from support import REGISTRY, ROOT, run_cli

STEPS, EVERY = 12, 2  # the crash run: 12 steps, a checkpoint every 2, so at most 2 steps may be lost


@pytest.fixture(scope="module", autouse=True)
def _report_counts():  # type: ignore[no-untyped-def]
    yield
    flush_counts()


def tiny_args(images: Path, run: Path, *extra: str) -> list[str]:
    """`fpdm train` arguments of a run small enough to train a step in a few milliseconds."""
    sets = [
        "model.arch=FPDM-XS/2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "data.name=image_folder",
        f"data.path={json.dumps(str(images))}",
        "data.image_size=8",
        "train.batch_size=8",
        "train.no_grad_iters=[0, 3]",
        "train.grad_iters=[1, 2]",
        "train.lr=1e-3",
        *extra,
    ]
    return ["--out", str(run), "--no-progress", *[a for s in sets for a in ("--set", s)]]


def tiny_config(images: Path, run: Path, *extra: str):  # type: ignore[no-untyped-def]
    from fpdm.apps.presets import resolve_config
    from fpdm.config import load_config

    sets = tiny_args(images, run, *extra)[3:][1::2]
    return load_config(resolve_config("fashion_mnist"), [*sets, f"train.out_dir={json.dumps(str(run))}"])


# ------------------------------------------------------------------------------------------------------ 1. crashes

CHILD = r"""
import os, sys, time
import torch
torch.set_num_threads(int(os.environ["FPDM_TEST_THREADS"]))
import fpdm.io.checkpoint as ck

stage = os.environ.get("FPDM_TEST_PAUSE", "")

def pause():
    print("PAUSED", stage, flush=True)
    time.sleep(600)

if stage == "torn":  # the first weights file is written, then cut in half, then the process stalls
    real_save = ck.save_file
    def torn(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        pause()
    ck.save_file = torn
elif stage.startswith("fsync:"):  # stall after the N-th fsync of this process (inside a checkpoint write)
    target, calls, real_fsync = int(stage[6:]), [0], ck.fsync
    def counted(path):
        real_fsync(path)
        calls[0] += 1
        if calls[0] == target:
            pause()
    ck.fsync = counted
elif stage == "prune":  # the new checkpoint is renamed in; stall before the oldest is pruned
    ck._discard = lambda path: pause()

from fpdm.apps.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _metrics_steps(path: Path, offset: int) -> list[int]:
    """Steps logged after byte `offset` of metrics.jsonl (a line torn by the kill is skipped)."""
    if not path.is_file():
        return []
    steps = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode(errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return steps


class Child:
    """One `fpdm train` process of the crash run, optionally stalled at a stage of a checkpoint write."""

    def __init__(self, script: Path, args: list[str], run: Path, pause: str = "") -> None:
        self.metrics = run / "metrics.jsonl"
        self.offset = self.metrics.stat().st_size if self.metrics.is_file() else 0
        env = {
            **os.environ,
            "FPDM_LOAD_PLUGINS": "",
            "FPDM_TEST_PAUSE": pause,
            "FPDM_TEST_THREADS": str(torch.get_num_threads()),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def wait_paused(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith("PAUSED"):
                return
        raise AssertionError(f"child ended without pausing: {self.proc.wait()} {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def wait_step(self, step: int, jitter: float) -> None:
        deadline = time.monotonic() + 120
        while max(self.steps(), default=0) < step:
            assert self.proc.poll() is None, f"child ended early: {self.proc.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(jitter)

    def steps(self) -> list[int]:
        return _metrics_steps(self.metrics, self.offset)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()  # type: ignore[union-attr]
        COUNTS["sigkills_survived"] += 1


def _check_after_kill(run: Path, child: Child, start: int) -> int:
    """Every listed checkpoint is whole (checksums verify), and at most one interval of work was lost."""
    found = list_checkpoints(run / "checkpoints")
    for path in found:
        load_checkpoint(path)  # verify=True: a torn file would fail its sha256
    newest = load_checkpoint(found[-1]).step if found else 0
    reached = max(child.steps(), default=start)
    assert reached - newest <= EVERY, (reached, newest)
    return newest


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(images, tmp_path):
    run, script = tmp_path / "run", tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(8)
    fresh = tiny_args(
        images,
        run,
        f"train.steps={STEPS}",
        f"train.ckpt_every={EVERY}",
        "train.log_every=1",
        "train.keep_checkpoints=2",
    )
    resume = ["--resume", "--out", str(run), "--no-progress"]
    plan = ["random", "torn", f"fsync:{rng.randint(2, 9)}", "prune", "random", "random"]
    newest = 0
    for k, stage in enumerate(plan):
        if newest >= STEPS:
            break
        COUNTS["stale_locks_taken_over"] += (run / LOCK_NAME).is_file()  # the child below proceeds: it took it
        child = Child(script, fresh if k == 0 else resume, run, "" if stage == "random" else stage)
        if stage == "random":
            child.wait_step(rng.randint(newest + 1, STEPS - 1), rng.uniform(0.0, 0.03))
        else:
            child.wait_paused()
            if stage == "torn":  # a live run holds the folder: a second one is refused, naming the holder
                code, _, err = cli("train", *resume)
                assert_one_line_error(
                    code,
                    err,
                    expect=f"in use by a live fpdm run (pid {child.proc.pid}",
                    codes=(2,),
                    kind="second_run_refused",
                )
        child.kill()
        assert (run / LOCK_NAME).is_file()  # left by the dead holder: the next run must take it over
        newest = _check_after_kill(run, child, newest)
    if newest < STEPS:
        COUNTS["stale_locks_taken_over"] += 1
        last = Child(script, resume, run)
        assert last.proc.wait() == 0, last.proc.stderr.read()  # type: ignore[union-attr]
        last.proc.stdout.close()  # type: ignore[union-attr]
        last.proc.stderr.close()  # type: ignore[union-attr]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not (run / LOCK_NAME).exists()
    assert _metrics_steps(run / "metrics.jsonl", 0) == list(range(1, STEPS + 1))  # each step once, none torn

    reference = train(
        tiny_config(images, tmp_path / "straight", f"train.steps={STEPS}", f"train.ckpt_every={EVERY}"),
        registry=REGISTRY,
        progress=False,
    )
    want, got = load_checkpoint(reference.checkpoint), load_checkpoint(run)
    assert got.step == want.step == STEPS
    for a, b in ((want.model, got.model), (want.ema, got.ema)):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    opt_a, opt_b = want.training_state()[0], got.training_state()[0]
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[name], opt_b["state"][key][name]) for name in ("exp_avg", "exp_avg_sq"))


def test_a_lock_from_a_dead_process_is_taken_over_and_a_live_one_refuses(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_NAME).write_text(dead.stdout)  # a pid that no longer runs, and no flock held
    with RunLock(run):
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(UsageError, match=f"in use by a live fpdm run \\(pid {os.getpid()}"):
            RunLock(run).acquire()  # a second taker in this very process is refused too
    assert not (run / LOCK_NAME).exists()
    COUNTS["stale_locks_taken_over"] += 1


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *tiny_args(images, run, "train.steps=3", "train.ckpt_every=3"))
    assert code == 0, err
    limit = (list_checkpoints(run / "checkpoints")[-1] / "model.safetensors").stat().st_size // 2

    def full_disk() -> None:  # every file this process writes stops at `limit` bytes (EFBIG, like ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "FPDM_LOAD_PLUGINS": "", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpdm.apps.cli",
            "train",
            "--resume",
            "--steps",
            "6",
            "--out",
            str(run),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=full_disk,
        timeout=300,
    )
    assert_one_line_error(
        result.returncode, result.stderr, codes=(1,), kind="disk_full", expect="could not write checkpoint step 6"
    )
    assert "File too large" in result.stderr and "step-00000003" in result.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]
    assert load_checkpoint(run).step == 3


# ------------------------------------------------------------------------------------------ 2. untrusted files


class Exploit:
    """Unpickling this creates a marker file: the code execution a checkpoint loader must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": Exploit(marker)}, path)


def _reseal(ckpt: Path) -> None:
    """Recompute meta.json's checksums, as an attacker who hands over a whole folder would."""
    from fpdm.io.checkpoint import sha256_file

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"] = {name: sha256_file(ckpt / name) for name in meta["sha256"]}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_a_planted_pickle_never_runs(trained, tmp_path):
    import shutil

    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "trainer.pt"):
        run = tmp_path / name
        shutil.copytree(trained, run)
        ckpt = list_checkpoints(run / "checkpoints")[-1]
        _plant(ckpt / name, marker)
        _reseal(ckpt)
        code, _, err = cli("train", "--resume", "--steps", "99", "--out", str(run), "--no-progress")
        assert_one_line_error(
            code,
            err,
            codes=(2,),
            kind="code_execution_refused",
            expect=f"unreadable checkpoint file {ckpt / name}: UnpicklingError",
        )
    weights = tmp_path / "weights"
    shutil.copytree(trained, weights)
    ckpt = list_checkpoints(weights / "checkpoints")[-1]
    _plant(ckpt / "model.safetensors", marker)  # a pickle where safetensors belong is not even parsed as one
    _reseal(ckpt)
    code, _, err = cli("sample", str(weights), "--n", "1", "--steps", "2", "--no-progress")
    assert_one_line_error(code, err, codes=(2,), kind="code_execution_refused", expect="unreadable weights")
    official = tmp_path / "official.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "args": Exploit(marker)}, official)
    code, _, err = cli("import-official", str(official), str(tmp_path / "imported"))
    assert_one_line_error(code, err, codes=(2,), kind="code_execution_refused", expect=str(official))
    assert not marker.exists()


def _onnx_file(path: Path, props: dict[str, str]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_foreign_and_newer_onnx_files_are_refused(tmp_path):
    from fpdm.export.onnx import FORMAT, FORMAT_VERSION, read_metadata

    foreign = _onnx_file(tmp_path / "foreign.onnx", {})
    newer = _onnx_file(tmp_path / "newer.onnx", {"fpdm.format": FORMAT, "fpdm.format_version": str(FORMAT_VERSION + 1)})
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf" * 5)
    cases = [
        (foreign, "has no fpdm metadata"),
        (newer, f"format version {FORMAT_VERSION + 1}; this fpdm reads up to"),
        (garbage, "not a readable ONNX model"),
    ]
    for path, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            read_metadata(path)
        code, _, err = cli("sample", str(path), "--n", "1", "--no-progress")
        assert_one_line_error(code, err, codes=(2,), kind="onnx_refused", expect=message)


# ------------------------------------------------------------------------------------------ 3. numerical faults


class Faulty(FPDM):
    """An FPDM whose forward goes wrong on chosen calls (one call per training step): `how` says what."""

    bad_calls: ClassVar[set[int]] = set()  # the test sets it per case on the class; instances only read it
    how = "loss"
    calls = 0

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        Faulty.calls += 1
        if Faulty.calls not in Faulty.bad_calls:
            return out
        if Faulty.how == "state":
            return type(out)(out.pred + out.z.mean() * float("nan"), out.z * float("nan"), out.stats, out.blocks)
        if Faulty.how == "grad":  # finite forward, infinite backward: the optimizer step would poison the weights
            out.pred.register_hook(lambda g: g * float("inf"))
            return out
        return type(out)(out.pred * float("nan"), out.z, out.stats, out.blocks)


@pytest.fixture
def faulty_registry() -> Registry:
    registry = Registry.load(only=[])
    hook = fpdm.hookimpl(lambda register: register("faulty", Faulty))
    registry.add_plugin(types.SimpleNamespace(register_denoisers=hook), name="faulty")
    Faulty.calls = 0
    return registry


def _all_finite(run: Path) -> None:
    for path in list_checkpoints(run / "checkpoints"):
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in (*ckpt.model.values(), *ckpt.ema.values())), path


@pytest.mark.parametrize(
    "how, part", [("loss", "the loss"), ("state", "the fixed-point state"), ("grad", "the gradients (loss")]
)
def test_non_finite_stops_within_the_step_and_names_the_part(images, tmp_path, faulty_registry, how, part):
    Faulty.bad_calls, Faulty.how = {3}, how
    config = tiny_config(images, tmp_path / how, "model.arch=faulty-XS/2", "train.steps=6", "train.ckpt_every=1")
    with pytest.raises(
        FpdmRuntimeError,
        match=rf"non-finite values in {part.replace('(', '.')}.* at step 3 .*"
        r"training stopped .*last good checkpoint: .*step-00000002",
    ):
        train(config, registry=faulty_registry, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / how / "checkpoints")] == ["step-00000001", "step-00000002"]
    _all_finite(tmp_path / how)
    COUNTS["nonfinite_faults_caught"] += 1


def test_skip_nonfinite_skips_up_to_n_batches_then_stops(images, tmp_path, faulty_registry):
    Faulty.bad_calls, Faulty.how = {2, 4}, "grad"
    config = tiny_config(
        images,
        tmp_path / "skip",
        "model.arch=faulty-XS/2",
        "train.steps=6",
        "train.ckpt_every=1",
        "train.log_every=1",
        "train.skip_nonfinite=2",
    )
    result = train(config, registry=faulty_registry, progress=False)
    assert result.step == 6 and [r["step"] for r in result.history] == [1, 3, 5, 6]
    assert sum(r.get("skipped", 0) for r in result.history) == 2
    _all_finite(tmp_path / "skip")
    Faulty.calls, Faulty.bad_calls, Faulty.how = 0, {2, 3}, "loss"
    config = tiny_config(images, tmp_path / "stop", "model.arch=faulty-XS/2", "train.steps=6", "train.skip_nonfinite=1")
    with pytest.raises(FpdmRuntimeError, match="at step 3 .*training stopped after 1 skipped batch"):
        train(config, registry=faulty_registry, progress=False)
    COUNTS["nonfinite_faults_caught"] += 2


class Diverging(Solver):
    """Each iteration doubles z far past any fixed point: the solve blows up to inf."""

    def solve(self, f, z0, *, max_iter, tol=0.0, check_every=1):  # type: ignore[no-untyped-def]
        from fpdm.interfaces import SolverStats

        z = z0 * 1e30
        for _ in range(max_iter):
            z = z * 1e30
        b = z0.shape[0]
        residual = torch.full((b,), float("inf"))
        stats = SolverStats(torch.full((b,), max_iter), residual, torch.zeros(b, dtype=torch.bool))
        return SolverResult(z, stats)


class Raising(Solver):
    def solve(self, f, z0, *, max_iter, tol=0.0, check_every=1):  # type: ignore[no-untyped-def]
        raise RuntimeError("solver exploded on purpose")


class WrongType(Solver):
    def solve(self, f, z0, *, max_iter, tol=0.0, check_every=1):  # type: ignore[no-untyped-def]
        return z0, None


@pytest.fixture
def bad_solvers():  # type: ignore[no-untyped-def]
    """Three third-party solvers in the CLI's own registry for one test, removed afterwards."""
    registry = default_registry()

    def hook(register):  # type: ignore[no-untyped-def]
        register("diverging", Diverging)
        register("raising", Raising)
        register("wrong_type", WrongType)

    def crashing_command(parser):  # type: ignore[no-untyped-def]
        return lambda args: {}["a key the plugin forgot"]

    module = types.ModuleType(__name__)  # frames of this test module belong to the plugin, as a package's would
    module.register_solvers = fpdm.hookimpl(hook)
    module.register_commands = fpdm.hookimpl(lambda register: register("crashing", crashing_command))
    info = registry.add_plugin(module, name="badsolvers", source="fpdm-badsolvers 0.1")
    assert info.error is None, info.error
    yield
    for name in ("diverging", "raising", "wrong_type"):
        registry._entries["solver"].pop(name)
    registry._entries["command"].pop("crashing")
    registry._plugins.pop("badsolvers")
    registry._pm.unregister(name="badsolvers")


def test_a_diverging_solver_fails_sampling_with_step_and_residual_and_writes_nothing(trained, tmp_path, bad_solvers):
    out = tmp_path / "samples"
    code, _, err = cli(
        "sample", str(trained), "--solver", "diverging", "--n", "2", "--steps", "3", "--out", str(out), "--no-progress"
    )
    expect = "sampling diverged at model evaluation 1 of 3"
    assert_one_line_error(code, err, codes=(1,), kind="divergence_caught", expect=expect)
    assert "fixed-point residual max inf" in err and not out.exists()


def test_a_plugin_that_raises_or_returns_the_wrong_type_inside_a_solve_is_named(trained, bad_solvers):
    code, _, err = cli("sample", str(trained), "--solver", "raising", "--n", "1", "--steps", "2", "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "in plugin 'badsolvers' (fpdm-badsolvers 0.1): RuntimeError: solver exploded on purpose" in err
    code, _, err = cli("sample", str(trained), "--solver", "wrong_type", "--n", "1", "--steps", "2", "--no-progress")
    assert_one_line_error(
        code,
        err,
        codes=(1,),
        kind="plugin_faults_named",
        expect="solver WrongType (module test_reliability) returned tuple from solve",
    )
    COUNTS["plugin_faults_named"] += 1
    code, _, err = cli("crashing")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "internal error in plugin 'badsolvers' (fpdm-badsolvers 0.1): KeyError" in err
    COUNTS["plugin_faults_named"] += 2
    code, out, err = cli("solve", "--solver", "anderson", "--json")  # built-ins keep working
    assert code == 0 and json.loads(out)[0]["converged_fraction"] == 1.0


# ------------------------------------------------------------------------------------------ 5. plugins, installed


@pytest.mark.slow
def test_broken_installed_plugins_are_named_and_never_take_fpdm_down(tmp_path):
    dup = (
        "import fpdm\nfrom fpdm.plugins.solvers import Anderson\n@fpdm.hookimpl\ndef register_solvers(register):\n"
        "    register('anderson', Anderson)\n"
    )
    wrong = "import fpdm\n@fpdm.hookimpl\ndef register_solvers(register):\n    register('notasolver', dict)\n"
    hook = "import fpdm\n@fpdm.hookimpl\ndef register_reuse_policies(register):\n    raise KeyError('inside hook')\n"
    command = (
        "import fpdm\ndef broken(parser):\n    raise RuntimeError('cannot build parser')\n"
        "@fpdm.hookimpl\ndef register_commands(register):\n    register('broken-cmd', broken)\n"
    )
    plugins = {
        "importfail": ("fpdm-importfail", "raise ImportError('missing dependency xyz')"),
        "dup": ("fpdm-dup", dup),
        "wrongtype": ("fpdm-wrongtype", wrong),
        "hookraise": ("fpdm-hookraise", hook),
        "badcmd": ("fpdm-badcmd", command),
    }
    for name, (dist, source) in plugins.items():
        fake_dist(tmp_path, dist, "0.1", {name: f"mod_{name}"}, {f"mod_{name}": source})
    env = {"PYTHONPATH": str(tmp_path), "FPDM_LOAD_PLUGINS": ",".join(d for d, _ in plugins.values())}
    listing = run_cli("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    infos = {d["name"]: d for d in json.loads(listing.stdout)}
    expected = {
        "importfail": "import failed: ImportError: missing dependency xyz",
        "dup": "solver 'anderson' is already registered by plugin 'solvers'",
        "wrongtype": "dict does not derive from fpdm.Solver",
        "hookraise": "KeyError",
    }
    for name, message in expected.items():
        assert message in (infos[name]["error"] or ""), infos[name]
        COUNTS["plugin_faults_named"] += 1
    # Command parsers are built lazily (a fast `fpdm --help`): a broken one is named when it is invoked.
    broken = run_cli("broken-cmd", env=env)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert broken.stderr.strip().splitlines() == [
        "fpdm: error: command 'broken-cmd' from plugin 'badcmd' is unusable: RuntimeError: cannot build parser"
    ]
    COUNTS["plugin_faults_named"] += 1
    solved = run_cli("solve", "--all", "--json", env=env)
    assert solved.returncode == 0, solved.stderr
    assert [r["solver"] for r in json.loads(solved.stdout)] == ["anderson", "fixed_point"]


# ------------------------------------------------------------------------------------------ 6. long runs


def test_reuse_state_is_per_batch_and_released(trained):
    """Many batches in one process: each batch starts cold and no batch's solutions outlive it."""
    from fpdm.build import build_schedule, load_denoiser
    from fpdm.config import Config, from_dict
    from fpdm.diffusion.gaussian import GaussianDiffusion
    from fpdm.diffusion.sampling import generate
    from fpdm.plugins.reuse import Reuse
    from fpdm.plugins.samplers import DDIM

    seen: list[tuple[int, int]] = []
    refs: list[weakref.ref] = []

    class Spy(Reuse):
        def init(self, solutions, step):  # type: ignore[no-untyped-def]
            seen.append((step, len(solutions)))
            refs.extend(weakref.ref(z) for z in solutions)
            return super().init(solutions, step)

    ckpt = load_checkpoint(trained)
    config = from_dict(Config, ckpt.config)
    model = load_denoiser(ckpt, registry=REGISTRY)
    schedule = build_schedule(config.diffusion, REGISTRY)
    steps = sorted(schedule.sampling_timesteps(4).tolist())
    diffusion = GaussianDiffusion(schedule, learn_sigma=config.model.learn_sigma).respace(steps)
    alive: list[int] = []

    def after_batch(_: int) -> None:
        alive.append(sum(r() is not None for r in refs))

    generate(
        model,
        diffusion,
        n=12,
        batch_size=2,
        seed=0,
        labels=[0, 1],
        progress=after_batch,
        shape=(1, 8, 8),
        sampler=DDIM(),
        solver=REGISTRY.create("solver", "fixed_point"),
        iterations=[2] * 4,
        reuse=Spy(),
    )
    assert [n for step, n in seen if step == 0] == [0] * 6  # every batch starts cold
    assert max(n for _, n in seen) <= Spy.history
    assert alive == [0] * 6  # nothing a batch solved survives it
