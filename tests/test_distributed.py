"""Data-parallel training: two gloo ranks on CPU under torchrun against one process on the same global batch.

`torchrun --standalone` picks a free port itself. The ranks run `fpdm.apps.cli.main` through a small launcher
the test writes (no test hook in the product): it spies on `fpdm.training.loop.sjfb_losses` and `ema_update` to
record each rank's S-JFB draws and final weights, and can give one rank an extra `--set` (a config mismatch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fpdm.errors import UsageError
from fpdm.io.checkpoint import load_checkpoint
from fpdm.training.distributed import DistContext, shard
from fpdm.training.loop import train
from support import REGISTRY, ROOT, tiny_config

LAUNCHER = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    import fpdm.training.loop as training

    rank, seen, draws = os.environ["RANK"], {}, []
    sjfb_losses, ema_update = training.sjfb_losses, training.ema_update

    def spy_losses(model, diffusion, solver, x, t, y, noise, **kw):
        draws.append({"n_no_grad": kw["n_no_grad"], "n_grad": kw["n_grad"], "t": t.tolist()})
        return sjfb_losses(model, diffusion, solver, x, t, y, noise, **kw)

    def spy_ema(ema, model, decay):
        seen["ema"], seen["model"] = ema, model
        ema_update(ema, model, decay)

    training.sjfb_losses, training.ema_update = spy_losses, spy_ema
    from fpdm.apps.cli import main

    args = sys.argv[1:]
    if os.environ.get("SKEW_RANK") == rank:
        args += ["--set", "train.lr=0.5"]
    code = main(args)
    if seen:
        digest = hashlib.sha256()
        for module in (seen["model"], seen["ema"]):
            for value in module.state_dict().values():
                digest.update(value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        dump = {"weights": digest.hexdigest(), "draws": draws}
        with open(os.path.join(os.environ["DUMP_DIR"], f"rank{rank}.json"), "w") as fh:
            json.dump(dump, fh)
    sys.exit(code)
""")

STEPS = 4


def torchrun(
    tmp_path: Path, images: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    args = [
        "--set",
        "model.arch='FPDM-XS/2'",
        "--set",
        "model.hidden_size=32",
        "--set",
        "model.num_heads=2",
        "--set",
        "data.name=image_folder",
        "--set",
        f"data.path={json.dumps(str(images))}",
        "--set",
        "data.image_size=8",
        "--set",
        "train.batch_size=8",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        "train.log_every=2",
        "--set",
        "train.ckpt_every=2",
        "--set",
        "train.no_grad_iters=[0, 3]",
        "--set",
        "train.grad_iters=[1, 2]",
        "--set",
        "train.lr=1e-3",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    full_env = {**os.environ, "FPDM_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1", "DUMP_DIR": str(tmp_path), **(env or {})}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(launcher),
        "train",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=240)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume_in_one(images, tmp_path, monkeypatch):
    result = torchrun(tmp_path, images, tmp_path / "ddp", "--set", "train.device='cpu'")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fpdm train:") == 1  # only rank 0 talks
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # model and EMA bit-identical on both ranks
    counts = [[(d["n_no_grad"], d["n_grad"]) for d in r["draws"]] for r in ranks]
    assert counts[0] == counts[1] and len(counts[0]) == STEPS  # same S-JFB draws every step
    assert all(len(d["t"]) == 4 for r in ranks for d in r["draws"])  # each rank holds half the global batch

    import fpdm.training.loop as training

    single_t: list[list[int]] = []
    real = training.sjfb_losses

    def spy(model, diffusion, solver, x, t, *args, **kwargs):  # type: ignore[no-untyped-def]
        single_t.append(t.tolist())
        return real(model, diffusion, solver, x, t, *args, **kwargs)

    monkeypatch.setattr(training, "sjfb_losses", spy)
    config = tiny_config(images, tmp_path / "one", f"train.steps={STEPS}", "train.ckpt_every=2", "train.device=cpu")
    single = train(config, registry=REGISTRY, progress=False)
    ddp_ckpt, one_ckpt = load_checkpoint(tmp_path / "ddp"), load_checkpoint(single.checkpoint)
    close(ddp_ckpt.model, one_ckpt.model)
    close(ddp_ckpt.ema, one_ckpt.ema)
    # the same global batch: rank 0's shard followed by rank 1's is the single process's timestep draw
    assert [a["t"] + b["t"] for a, b in zip(ranks[0]["draws"], ranks[1]["draws"])] == single_t
    ddp_metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for mine, theirs in zip(ddp_metrics, single.history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)  # logged loss is the global batch's

    # the 2-rank checkpoint resumes in one process (nothing world-size specific is saved)
    monkeypatch.undo()
    train(
        tiny_config(images, tmp_path / "ddp", "train.steps=6", "train.ckpt_every=2", "train.device=cpu"),
        resume=True,
        registry=REGISTRY,
        progress=False,
    )
    train(
        tiny_config(images, tmp_path / "one", "train.steps=6", "train.ckpt_every=2", "train.device=cpu"),
        resume=True,
        registry=REGISTRY,
        progress=False,
    )
    resumed, straight = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "one")
    assert resumed.step == 6
    close(resumed.model, straight.model)


@pytest.mark.slow
def test_config_mismatch_across_ranks_fails_with_one_line(images, tmp_path):
    result = torchrun(tmp_path, images, tmp_path / "skew", "--set", "train.device='cpu'", env={"SKEW_RANK": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fpdm train: error:")]
    # torchrun stops the other rank once one has failed, so it may not get to print its line
    assert errors and all("the config differs across ranks (rank 1 vs rank 0" in line for line in errors), result.stderr
    assert not (tmp_path / "skew" / "checkpoints").exists()


def test_global_batch_must_divide_by_the_world_size():
    ctx = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), initialized_here=True)
    assert shard(ctx, 8) == slice(4, 8)
    with pytest.raises(UsageError, match="train.batch_size=7 is the global batch and must divide by the world size 2"):
        shard(ctx, 7)


def test_outside_torchrun_is_one_process_without_a_group(monkeypatch):
    from fpdm.training.distributed import check_same_config, distributed, mean_across_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed(torch.device("cpu")) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
        check_same_config(ctx, {"anything": 1})  # no collective without a group
        assert torch.equal(mean_across_ranks(ctx, torch.tensor([2.0])), torch.tensor([2.0]))
        assert shard(ctx, 7) == slice(0, 7)
    assert not torch.distributed.is_initialized()
