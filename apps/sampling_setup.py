"""The sampling flags `fpdm sample`, `fpdm eval` and `fpdm export --whole-loop` share, and parsed flags ->
`SampleConfig`. Argparse-level only (no torch): the commands import the heavy code inside their `run`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from fpdm.budget import FORMS, parse_budget
from fpdm.errors import UsageError

if TYPE_CHECKING:
    from fpdm.config import SampleConfig


def add_process_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    steps: int | None = 50,
    steps_help: str = "sampling steps (respaced)",
) -> None:
    """--steps, --spacing, --budget, --sampler, --eta, --allocator, --reuse, --cfg-scale, --cfg-channels,
    --guidance-rescale, --clip-x0."""
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument(
        "--spacing",
        help="which noise levels the steps visit: official (guided-diffusion's respacing; the default of ddpm "
        "and ddim), trailing (the default of the other samplers), linspace, leading, or karras",
    )
    parser.add_argument(
        "--budget",
        type=budget_text,
        metavar="B",
        help="transformer-block evaluations per sample (60, the paper's unit) or DiT-step equivalents (10dit: 10 x "
        "the depth of the DiT of the model's size)",
    )
    parser.add_argument(
        "--sampler",
        default="ddpm",
        help="ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc (or a plugin's)",
    )
    parser.add_argument("--eta", type=float, help="noise of ddim (default 0), euler_ancestral, dpmpp_2m_sde (1)")
    parser.add_argument("--allocator", default="uniform", help="how --budget is spread over the steps")
    parser.add_argument("--reuse", default="reuse", help="initial iterate per step: cold, reuse, extrapolate")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--cfg-channels", type=int, help="guide only the first N channels (official: 3)")
    parser.add_argument(
        "--guidance-rescale", type=float, default=0.0, help="Lin et al.'s rescale phi in [0, 1] for guided sampling"
    )
    parser.add_argument("--clip-x0", action="store_true", help="clip predicted x0 to [-1, 1]")


def budget_text(text: str) -> int | str:
    """`--budget 60` (blocks) or `--budget 10dit`, checked while the flags are parsed (`fpdm.budget`)."""
    try:
        return parse_budget(text).option
    except UsageError:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: give {FORMS}") from None


def class_value(text: str) -> int | str:
    """`--class 7` is an id, `--class Sneaker` a class name."""
    try:
        return int(text)
    except ValueError:
        return text


def sample_config(args: argparse.Namespace, **fixed: Any) -> SampleConfig:
    """The `SampleConfig` of a command's parsed flags: every field the namespace has (a None flag keeps the
    field's default), `progress` from --no-progress, then `fixed`. Bad values are one-line UsageErrors."""
    import attrs

    from fpdm.config import SampleConfig, make_config

    values: dict[str, Any] = {}
    for field in attrs.fields(SampleConfig):
        value = getattr(args, field.name, None)
        if value is not None or (hasattr(args, field.name) and field.default is None):
            values[field.name] = value
    if hasattr(args, "no_progress"):
        values["progress"] = not args.no_progress
    return make_config(SampleConfig, **{**values, **fixed})
