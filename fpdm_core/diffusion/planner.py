"""Sampling plans: the settings a budget can pay (the grid `fpdm plan` searches, `fpdm.planning`) and the plans it
stores per budget, which `fpdm sample --budget B` / `Pipeline.sample(budget=B)` use.

The grid is sampler x spacing x steps x allocator x solver. Steps come from the budget: for each target number of
fixed-point iterations per evaluation k (`Grid.iters`), the most steps whose evaluations can each pay
pre + k + post blocks (a DiT: its depth); the allocator then spreads the whole budget over them
(`plan_iterations`). `Grid.steps` replaces that ladder. Cells a budget cannot pay are skipped; cells that resolve
to the same iterations are one cell.

Where a plan lives: RUN/plan.toml for a run or checkpoint folder, the [plan] table of a packed folder's
config.toml, or any file named by `fpdm plan --out FILE` (a packed folder may be read-only) and read back with
`fpdm sample --plan FILE` / `pipe.sample(plan=FILE)`. The file holds a format tag and one entry per budget, keyed
by the budget as given ("10dit", "60"): the chosen settings, every candidate's score, the grid, the command that
remakes it, and the sha256 of the weights it was measured on and of the feature extractor that scored it.

Use: a sample whose `budget` matches an entry exactly takes the entry's settings (one note on stderr). Any
sampling choice given with a value other than its default (steps, spacing, sampler, allocator, solver, reuse,
eta, iters) drops the whole plan, also in one note. A corrupt plan, or one made for other weights or another
extractor, is refused in one line that gives the command remaking it; nothing has been sampled by then.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from fpdm.budget import parse_budget
from fpdm.config import Config, SampleConfig, make_config
from fpdm.diffusion.plan import sampling_parts
from fpdm.errors import UsageError
from fpdm.interfaces import Denoiser
from fpdm.io.checkpoint import list_checkpoints, sha256_file, write_text_atomic
from fpdm.io.packed import CONFIG_NAME, WEIGHTS_NAME, dumps_toml
from fpdm.registry import Registry
from fpdm.spacing import SPACINGS
from fpdm.version import __version__

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Say = Callable[[str], None]
DEFAULT_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun", "ddim")
FORMAT = "fpdm-plan"
FORMAT_VERSION = 1
PLAN_NAME = "plan.toml"
PLAN_TABLE = "plan"  # the table of a packed folder's config.toml
# What a plan chooses (with the types a valid entry holds), and the options whose explicit values drop it.
SETTINGS: dict[str, type] = {
    "sampler": str,
    "spacing": str,
    "steps": int,
    "allocator": str,
    "solver": str,
    "reuse": str,
}
EXPLICIT = ("steps", "spacing", "sampler", "allocator", "solver", "iters", "reuse", "eta")
# The extractor fpdm ships (fpdm.eval.features.SHIPPED_SHA256 pins it), located as package data: sampling reads
# the file, and so does not import the evaluation code (which imports the pipeline).
EXTRACTOR_DATA = ("fpdm.eval", "weights/fpdm-fmnist-cnn.safetensors")


def _names(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, (str, int)) else tuple(value)


def _axis(kind: type) -> Any:
    """attrs validator: a non-empty tuple of names (`kind` str) or of integers >= 1 (`kind` int)."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and attribute.name == "steps":
            return
        good = all(isinstance(x, str) if kind is str else type(x) is int and x >= 1 for x in value)
        if not value or not good:
            what = "names" if kind is str else "integers >= 1"
            raise ValueError(f"{attribute.name} must be one or more {what}, got {value!r}")

    return check


@attrs.frozen
class Grid:
    """The settings `fpdm plan` searches: every sampler x spacing x steps x allocator x solver (one reuse policy).
    `iters`: target fixed-point iterations per evaluation, each picking the most steps that pay it; `steps`:
    explicit step counts instead. The default samplers that this registry lacks are skipped with a note."""

    samplers: tuple[str, ...] = attrs.field(default=DEFAULT_SAMPLERS, converter=_names, validator=_axis(str))
    spacings: tuple[str, ...] = attrs.field(default=("official", "trailing"), converter=_names, validator=_axis(str))
    iters: tuple[int, ...] = attrs.field(default=(1, 2, 4), converter=_names, validator=_axis(int))
    steps: tuple[int, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(_names), validator=_axis(int)
    )
    allocators: tuple[str, ...] = attrs.field(default=("uniform", "increasing"), converter=_names, validator=_axis(str))
    solvers: tuple[str, ...] = attrs.field(default=("fixed_point",), converter=_names, validator=_axis(str))
    reuse: str = attrs.field(default="reuse", validator=attrs.validators.instance_of(str))


@attrs.frozen
class Cell:
    """One point of the grid under a budget, with the iterations per model evaluation it resolves to."""

    sampler: str
    spacing: str
    steps: int
    allocator: str
    solver: str
    reuse: str
    iterations: tuple[int, ...]  # empty for a DiT (its depth per evaluation)

    @property
    def key(self) -> str:
        return f"{self.sampler} {self.spacing} {self.steps} {self.allocator} {self.solver} {self.reuse}"

    def settings(self) -> dict[str, Any]:
        """What a stored plan chooses (`SETTINGS`)."""
        return {k: getattr(self, k) for k in SETTINGS}


def grid_cells(
    config: Config, model: Denoiser, registry: Registry, budget: str, grid: Grid, *, say: Say
) -> tuple[list[Cell], list[str]]:
    """The cells of `grid` that `budget` can pay for a model of `config`, each once, and notes on what was
    skipped. Unknown names are refused (listing the known ones), as is a budget that pays no cell at all."""
    blocks = parse_budget(budget).blocks(config)
    for kind, names in (("allocator", grid.allocators), ("solver", grid.solvers), ("reuse_policy", [grid.reuse])):
        for name in names:
            registry.entry(kind, name)  # an unknown name lists the known ones
    unknown = [s for s in grid.spacings if s not in SPACINGS]
    if unknown:
        raise UsageError(f"unknown spacing {unknown[0]!r}; known: {', '.join(SPACINGS)}")
    samplers, skipped = _samplers(registry.names("sampler"), grid, say)
    cells: dict[tuple[Any, ...], Cell] = {}
    cheapest: tuple[int, str] | None = None
    for sampler in samplers:
        for spacing in grid.spacings:
            counts = _Evaluations(config, model, registry, sampler, spacing)
            least = counts.least_blocks()
            if least is not None and (cheapest is None or least < cheapest[0]):
                cheapest = (least, f"{sampler} at 1 step")
            steps = grid.steps or counts.ladder(blocks, grid.iters)
            if not steps:
                skipped.append(f"{sampler} {spacing}: no step count fits {blocks} blocks")
            for key, cell in _resolved(config, model, registry, blocks, sampler, spacing, steps, grid):
                cells.setdefault(key, cell)
    if not cells:
        given = budget if budget == str(blocks) else f"{budget} ({blocks} blocks)"
        floor = "" if cheapest is None else f"; the least is {cheapest[0]} blocks ({cheapest[1]})"
        raise UsageError(f"budget {given} cannot pay one step of any sampler in the grid{floor}")
    return list(cells.values()), skipped


def _samplers(known: list[str], grid: Grid, say: Say) -> tuple[list[str], list[str]]:
    """The grid's samplers: a name the registry lacks is an error when asked for, skipped from the default grid."""
    missing = [s for s in grid.samplers if s not in known]
    if missing and grid.samplers != DEFAULT_SAMPLERS:
        raise UsageError(f"unknown sampler {missing[0]!r}; known: {', '.join(known)}")
    if missing:
        say(f"fpdm plan: the default grid's {', '.join(missing)} not registered here; searching without them")
    return [s for s in grid.samplers if s in known], [f"{s}: not registered" for s in missing]


def _resolved(
    config: Config,
    model: Denoiser,
    registry: Registry,
    blocks: int,
    sampler: str,
    spacing: str,
    steps: Sequence[int],
    grid: Grid,
) -> list[tuple[tuple[Any, ...], Cell]]:
    """(what makes a cell distinct, the cell) for every affordable cell: allocators that give the same iterations
    give the same samples, unless one stops early per sample (an adaptive one)."""
    out = []
    for count in steps:
        for allocator in grid.allocators:
            options = SampleConfig(
                steps=count, spacing=spacing, budget=blocks, sampler=sampler, allocator=allocator, reuse=grid.reuse
            )
            try:
                parts = sampling_parts(config, model, options, registry=registry, iters=0)
            except UsageError:  # the budget cannot pay these steps, or there are not that many timesteps
                continue
            iterations = tuple(parts.iterations) if any(parts.iterations) else ()
            for solver in grid.solvers:
                key = (sampler, spacing, count, iterations, solver, allocator if parts.adaptive else None)
                out.append((key, Cell(sampler, spacing, count, allocator, solver, grid.reuse, iterations)))
    return out


class _Evaluations:
    """Model evaluations per step count for one sampler and spacing (Heun makes two per step but the last), and
    the step counts a budget affords."""

    def __init__(self, config: Config, model: Denoiser, registry: Registry, sampler: str, spacing: str) -> None:
        self.config, self.model, self.registry, self.sampler, self.spacing = config, model, registry, sampler, spacing
        self.known: dict[int, int | None] = {}  # steps -> evaluations (None: no such step count)

    def __call__(self, steps: int) -> int | None:
        if steps not in self.known:
            options = SampleConfig(steps=steps, spacing=self.spacing, sampler=self.sampler)
            try:
                parts = sampling_parts(self.config, self.model, options, registry=self.registry, iters=1)
                self.known[steps] = len(parts.timesteps)
            except UsageError:
                self.known[steps] = None
        return self.known[steps]

    def least_blocks(self) -> int | None:
        evaluations = self(1)
        return None if evaluations is None else evaluations * self.model.blocks_per_call(1)

    def ladder(self, blocks: int, iters: Sequence[int]) -> list[int]:
        """For each k in `iters`, the most steps whose evaluations can each pay k iterations (DiT: its depth)."""
        top = min(blocks // self.model.blocks_per_call(1), self.config.diffusion.num_train_timesteps)
        found: list[int] = []
        for k in iters:
            cost = self.model.blocks_per_call(k)
            steps = next((s for s in range(top, 0, -1) if self.fits(s, cost, blocks)), None)
            if steps is not None and steps not in found:
                found.append(steps)
        return found

    def fits(self, steps: int, cost: int, blocks: int) -> bool:
        evaluations = self(steps)
        return evaluations is not None and evaluations * cost <= blocks


# ---------------------------------------------------------------------------------------------- stored plans
class PlanFileError(Exception):
    """A plan file that cannot be read as a plan; the message is the reason, for the caller's one line."""


@dataclasses.dataclass(frozen=True)
class PlanLocation:
    """Where a model's plans live and what they are bound to."""

    file: Path  # plan.toml, a packed folder's config.toml, or a file of the user's
    table: str | None  # "plan" inside a packed config.toml; None: the whole file
    weights: Path  # the weights file whose sha256 each entry records
    model: str  # the model as commands name it (`fpdm plan MODEL`)
    raw: bool = False  # the raw weights of a checkpoint, not its EMA (`--weights raw`)

    @property
    def cache(self) -> Path:
        """The cell cache of an unfinished `fpdm plan`, beside the plan: plan.toml -> plan.cache.jsonl."""
        stem = "plan" if self.table else self.file.stem
        return self.file.with_name(f"{stem}.cache.jsonl")

    def remake(self, budget: str, entry: Any = None) -> str:
        """The command that remakes the plan for `budget`: the one recorded in `entry`, else the plain one."""
        recorded = entry.get("command") if isinstance(entry, dict) else None
        if isinstance(recorded, str):
            return recorded
        return shlex.join(["fpdm", "plan", self.model, "--budget", budget, *(["--weights", "raw"] if self.raw else [])])


def plan_location(path: Path | None, kind: str, weights: str, *, file: str | Path | None = None) -> PlanLocation:
    """The plans of a model loaded from `path` (`Pipeline.path`: a checkpoint or packed folder; `kind` "checkpoint"
    or "packed"; `weights` "ema" or "raw"); `file` replaces where they are read and written."""
    if path is None:
        raise UsageError("plans are bound to a weights file: use a pipeline loaded from a folder (fpdm.load(path))")
    if kind == "packed":
        weights_file, default, table, model = path / WEIGHTS_NAME, path / CONFIG_NAME, PLAN_TABLE, str(path)
    else:
        weights_file = path / ("ema.safetensors" if weights == "ema" else "model.safetensors")
        in_run = path.parent.name == "checkpoints"
        run = path.parent.parent if in_run else path.parent
        newest = in_run and list_checkpoints(path.parent)[-1:] == [path]
        default, table, model = run / PLAN_NAME, None, str(run if newest else path)
    raw = kind != "packed" and weights != "ema"
    if file is not None:
        return PlanLocation(Path(file).expanduser(), None, weights_file, model, raw)
    return PlanLocation(default, table, weights_file, model, raw)


def read_plans(location: PlanLocation) -> dict[str, Any]:
    """Budget text -> entry, as stored (empty without a plan). Raises PlanFileError with the reason."""
    if location.table is None and not location.file.is_file():
        return {}
    try:
        data = tomllib.loads(location.file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PlanFileError(f"unreadable: {str(exc).splitlines()[0]}") from None
    root = data if location.table is None else data.get(location.table)
    if location.table is not None and root is None:
        return {}
    if not isinstance(root, dict) or root.get("format") != FORMAT:
        raise PlanFileError(f"no format = {FORMAT!r}")
    version = root.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PlanFileError(f"plan format {version!r}; this fpdm reads up to {FORMAT_VERSION}")
    budgets = root.get("budgets", {})
    if not isinstance(budgets, dict) or not all(isinstance(v, dict) for v in budgets.values()):
        raise PlanFileError("[budgets] must hold one table per budget")
    return budgets


def write_plans(location: PlanLocation, entries: dict[str, dict[str, Any]], *, say: Say) -> Path:
    """Add (or replace) `entries` in the plan file, atomically; other budgets' entries stay."""
    try:
        kept = read_plans(location)
    except PlanFileError as exc:
        say(f"fpdm: replacing the plan in {location.file} ({exc})")
        kept = {}
    root = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fpdm_version": __version__,
        "budgets": _without_none({**kept, **entries}),
    }
    data = root
    if location.table is not None:  # a packed folder's config.toml: every other table stays as it is
        data = tomllib.loads(location.file.read_text(encoding="utf-8"))
        data[location.table] = root
    try:
        write_text_atomic(location.file, dumps_toml(data))
    except OSError as exc:
        raise UsageError(
            f"cannot write the plan to {location.file} ({exc.strerror}); give another file (--out)"
        ) from None
    return location.file


def _without_none(value: Any) -> Any:
    """TOML has no null: None values are left out, at any depth."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@functools.cache
def shipped_extractor_sha256() -> str:
    """sha256 of the feature extractor file fpdm ships (what every plan's scores were measured with)."""
    package, name = EXTRACTOR_DATA
    with importlib.resources.as_file(importlib.resources.files(package).joinpath(name)) as path:
        return sha256_file(path)


def checked_entry(entry: dict[str, Any], location: PlanLocation, budget: str) -> dict[str, Any]:
    """The chosen settings of a stored entry, refused (one line, with the remake command) when the entry is
    malformed or was made for other weights or another extractor."""
    again = f"remake it: {location.remake(budget, entry)} (or sample without it: --no-plan, plan=False)"
    where = f"the plan for budget {budget} in {location.file}"
    chosen = entry.get("chosen")
    bad = [
        key
        for key, kind in SETTINGS.items()
        if not isinstance(chosen, dict) or not isinstance(chosen.get(key), kind) or isinstance(chosen.get(key), bool)
    ]
    bad += [key for key in ("weights_sha256", "extractor_sha256") if not isinstance(entry.get(key), str)]
    if bad:
        raise UsageError(f"{where} is corrupt (bad or missing {', '.join(bad)}); {again}")
    assert isinstance(chosen, dict)  # checked above, for the type checker
    weights = sha256_file(location.weights)
    if entry["weights_sha256"] != weights:
        raise UsageError(
            f"{where} was made for other weights (sha256 {entry['weights_sha256'][:12]}, "
            f"{location.weights.name} is {weights[:12]}); {again}"
        )
    if entry["extractor_sha256"] != shipped_extractor_sha256():
        raise UsageError(
            f"{where} was scored with another feature extractor (sha256 {entry['extractor_sha256'][:12]}, fpdm "
            f"ships {shipped_extractor_sha256()[:12]}); {again}"
        )
    return {key: chosen[key] for key in (*SETTINGS, "eta") if key in chosen}


def use_stored_plan(
    options: SampleConfig, location: PlanLocation, *, say: Say
) -> tuple[SampleConfig, dict[str, Any] | None]:
    """`options` with the stored plan for its budget applied, and what was applied (None: no plan used)."""
    if options.budget is None:
        return options, None
    budget = str(parse_budget(options.budget))
    defaults = SampleConfig()
    given = [name for name in EXPLICIT if getattr(options, name) != getattr(defaults, name)]
    if given:  # the user chose: a lenient look, only to say that the plan is left out
        try:
            stored = budget in read_plans(location)
        except PlanFileError:
            stored = False
        if stored:
            say(f"fpdm: {', '.join(given)} given: the plan for budget {budget} in {location.file} is not used")
        return options, None
    try:
        entry = read_plans(location).get(budget)
    except PlanFileError as exc:
        raise UsageError(
            f"the plan in {location.file} is corrupt ({exc}); remake it: {location.remake(budget)} "
            "(or sample without it: --no-plan, plan=False)"
        ) from None
    if entry is None:
        return options, None
    chosen = checked_entry(entry, location, budget)
    planned = make_config(SampleConfig, **{**attrs.asdict(options, recurse=False), **chosen})
    say(f"fpdm: budget {budget}: using the plan in {location.file}: {describe(chosen)}")
    return planned, {"file": str(location.file), "budget": budget, **chosen}


def describe(chosen: dict[str, Any]) -> str:
    """One line of settings: "unipc, 10 steps (trailing), uniform allocation, fixed_point, reuse"."""
    eta = "" if chosen.get("eta") is None else f" eta {chosen['eta']}"
    return (
        f"{chosen['sampler']}{eta}, {chosen['steps']} steps ({chosen['spacing']}), {chosen['allocator']} "
        f"allocation, {chosen['solver']}, {chosen['reuse']}"
    )
