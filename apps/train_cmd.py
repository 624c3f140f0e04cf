"""`fpdm train`: flags -> Config -> `fpdm.train` (fpdm.training.loop.train) -> checkpoints, metrics.jsonl and a
loss plot. Top-level imports stay torch-free (`fpdm train --help` must not load torch)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from fpdm.apps.plots import line_plot
from fpdm.apps.presets import DEFAULT_PRESET, resolve_config
from fpdm.config import Config, load_config
from fpdm.errors import UsageError

Handler = Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"preset name or TOML file (default: the {DEFAULT_PRESET} preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def train_command(parser: argparse.ArgumentParser) -> Handler:
    add_config_arguments(parser)
    # --plugin is the spelling the product card documents (`fpdm train --plugin anderson`): a synonym, not deprecated
    parser.add_argument(
        "--solver",
        "--plugin",
        dest="solver",
        metavar="NAME",
        help="solver of the S-JFB no-grad phase (= --set solver.name=NAME; default: the config's)",
    )
    parser.add_argument("--out", metavar="DIR", help="run folder (= --set train.out_dir=DIR; default: the config's)")
    parser.add_argument("--steps", type=int, metavar="N", help="= --set train.steps=N (default: the config's)")
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="global batch, = --set train.batch_size=N (default: the config's, 64 in the preset)",
    )
    parser.add_argument("--seed", type=int, metavar="N", help="= --set train.seed=N (default: the config's, 0)")
    parser.add_argument(
        "--device", help="auto, cpu, cuda or cuda:N (= --set train.device=...; default: the config's, auto)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run folder from its newest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from fpdm.training.distributed import env_rank
        from fpdm.training.loop import train

        overrides = list(args.set)
        for flag, key in (
            (args.solver, "solver.name"),
            (args.out, "train.out_dir"),
            (args.steps, "train.steps"),
            (args.batch_size, "train.batch_size"),
            (args.seed, "train.seed"),
            (args.device, "train.device"),
        ):
            if flag is not None:
                overrides.append(f"{key}={json.dumps(flag)}")
        config = _config(args, overrides)
        out = Path(config.train.out_dir)
        if env_rank() != 0:  # under torchrun only rank 0 talks; the others train silently
            train(config, resume=args.resume, progress=False)
            return 0
        print(
            f"fpdm train: {config.model.arch} on {config.data.name}, solver {config.solver.name}, "
            f"{config.train.steps} steps -> {out}"
        )
        result = train(config, resume=args.resume, progress=not args.no_progress)
        _report(result.history, out)
        print(f"checkpoint: {result.checkpoint}")
        return 0

    return run


def _config(args: argparse.Namespace, overrides: list[str]) -> Config:
    """Resuming without --config continues the run's own saved config; otherwise the preset or file."""
    if args.resume and args.config is None:
        probe = load_config(resolve_config(DEFAULT_PRESET), overrides)
        saved = Path(probe.train.out_dir) / "config.json"
        if not saved.is_file():
            raise UsageError(f"nothing to resume: {saved} does not exist (pass --out RUN_DIR)")
        try:
            base = json.loads(saved.read_text())
        except ValueError as exc:
            raise UsageError(f"unreadable run config {saved}: {exc}") from None
        return load_config(None, overrides, base=base)
    return load_config(resolve_config(args.config or DEFAULT_PRESET), overrides)


def _report(history: list[dict], out: Path) -> None:
    """Up to ten of the run's log records, one line each, and loss.png (readable from one record up)."""
    if not history:
        return
    print("loss curve (mean over each logging window):")
    picks = history if len(history) <= 10 else [history[round(i * (len(history) - 1) / 9)] for i in range(10)]
    for rec in picks:
        print(f"  {log_line(rec)}")
    points = [(rec["step"], rec["loss"]) for rec in history]
    plot = line_plot(
        {"loss": points}, out / "loss.png", title="training loss", xlabel="step", ylabel="loss", log_y=True
    )
    print(f"loss plot: {plot}")


def log_line(record: dict) -> str:
    """One metrics.jsonl record as a line: loss, gradient norm before clipping (and how often and how hard
    clipping cut it), learning rate, throughput."""
    clipped = record.get("clipped", 0.0)
    clip = f" (clipped {clipped:.0%}, x{record['clip_scale']:.2f})" if clipped else ""
    return (
        f"step {record['step']:>7}  loss {record['loss']:.4f}  grad norm {record['grad_norm']:.3g}{clip}  "
        f"lr {record['lr']:.3g}  {record['img_per_s']:.0f} img/s"
    )
