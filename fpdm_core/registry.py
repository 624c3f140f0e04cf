"""Plugin loading and the name -> factory registry (the one place names become objects).

Built-ins and third-party plugins arrive the same way: modules named in an entry-point group, each
implementing some `register_<kinds>` hooks (see `fpdm.hookspecs`). Each plugin is loaded and registered
on its own: a plugin that fails to import, implements an unknown hook, registers a bad or duplicate name,
or raises in a hook is reported by name and rolled back, and the others still load.
`FPDM_LOAD_PLUGINS` restricts third-party loading to a comma list of plugin or distribution names, or
disables it when empty; fpdm's own built-ins always load.

Two groups, loaded lazily, so that the CLI's start path never imports torch:
- `fpdm.cli`: plugins that register CLI commands (`register_commands`). Loaded the first time a command is
  looked up. Their modules must import only argparse-level code at the top; a command's factory builds its
  parser and returns a `run` that imports the heavy parts when called.
- `fpdm`: everything else (solvers, denoisers, schedules, ...; these import torch). Loaded the first time
  any other kind is looked up, or a command name is missing from the `fpdm.cli` group (a plugin written
  before the split may still register its commands here: it runs, but `fpdm --help` lists only the
  `fpdm.cli` group's commands until some other lookup has loaded it).
`plugins()` and `add_plugin()` load both groups first. A module named in both groups loads once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

import pluggy

from fpdm import hookspecs
from fpdm.errors import DuplicateNameError, FpdmError, PluginError, UnknownNameError, UsageError

ENTRY_POINT_GROUP = "fpdm"
CLI_ENTRY_POINT_GROUP = "fpdm.cli"
GROUPS = (CLI_ENTRY_POINT_GROUP, ENTRY_POINT_GROUP)
ENV_LOAD_PLUGINS = "FPDM_LOAD_PLUGINS"
BUILTIN_SOURCE = "built-in"

# kind -> (hook that registers it, name of the fpdm.interfaces class its instances must implement; None = any
# callable). Names, not classes: fpdm.interfaces imports torch, which the CLI's start path must not.
KINDS: dict[str, tuple[str, str | None]] = {
    "solver": ("register_solvers", "Solver"),
    "denoiser": ("register_denoisers", "Denoiser"),
    "schedule": ("register_schedules", "Schedule"),
    "reuse_policy": ("register_reuse_policies", "ReusePolicy"),
    "allocator": ("register_budget_allocators", "BudgetAllocator"),
    "sampler": ("register_samplers", None),
    "exporter": ("register_exporters", None),
    "command": ("register_commands", None),
}
# entry-point group -> the kinds its plugins register when it loads. A plugin that came through `fpdm.cli`
# registers its other kinds (if any) once the `fpdm` group has loaded, after the built-ins.
GROUP_KINDS: dict[str, tuple[str, ...]] = {CLI_ENTRY_POINT_GROUP: ("command",), ENTRY_POINT_GROUP: tuple(KINDS)}
# Modules a factory may come from without belonging to its plugin (a lambda in a namespace, functools.partial).
_SHARED_MODULES = frozenset({"builtins", "functools", "types", "fpdm", *sys.stdlib_module_names})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# dataclasses, not attrs: this module is on the CLI's start path, and attrs costs a tenth of a second there.
@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """One plugin as `fpdm plugins` shows it. `error` is None for a plugin that loaded."""

    name: str
    source: str
    registered: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        registered = {kind: list(names) for kind, names in self.registered.items()}
        return {"name": self.name, "source": self.source, "registered": registered, "error": self.error}


class Registry:
    """Names of every kind, the plugin each came from, and the plugins that failed.

    `Registry()` is empty; `Registry.load()` is backed by the installed entry points, each group loaded
    on first need (see the module docstring)."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self._pm.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._plugins: dict[str, PluginInfo] = {}
        self._pending: list[str] = []  # entry-point groups not loaded yet
        self._only: set[str] | None = None
        self._kinds_done: dict[str, tuple[str, ...]] = {}  # plugin -> the kinds its hooks have registered

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, *, only: Iterable[str] | None = None, groups: Iterable[str] = GROUPS) -> Registry:
        """fpdm's built-ins and the installed third-party plugins (restricted to `only` when given) of the
        entry-point `groups`. Nothing is imported yet: each group loads on first need."""
        registry = cls()
        registry._only = None if only is None else set(only)
        registry._pending = [group for group in GROUPS if group in set(groups)]
        return registry

    def _load_group(self, group: str) -> None:
        if group not in self._pending:
            return
        self._pending.remove(group)
        for ep in sorted(metadata.entry_points(group=group), key=_builtin_first):
            source = _source_of(ep)
            if source != BUILTIN_SOURCE and self._only is not None and not ({ep.name, _dist_name(ep)} & self._only):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a plugin's import may fail in any way; it must not take fpdm down
                self._plugins[ep.name] = PluginInfo(ep.name, source, error=f"import failed: {_describe(exc)}")
                continue
            if self._pm.is_registered(module):  # named in both groups: one plugin, loaded once
                continue
            self._add_plugin(module, name=ep.name, source=source, kinds=GROUP_KINDS[group])
        ready = {kind for g, kinds in GROUP_KINDS.items() if g not in self._pending for kind in kinds}
        for name, done in list(self._kinds_done.items()):
            if not ready <= set(done):
                self._extend(name, [kind for kind in KINDS if kind in ready and kind not in done])

    def _load_for(self, kind: str) -> None:
        self._load_group(CLI_ENTRY_POINT_GROUP if kind == "command" else ENTRY_POINT_GROUP)

    def _load_all(self) -> None:
        for group in list(self._pending):
            self._load_group(group)

    def add_plugin(self, plugin: object, *, name: str, source: str = "local") -> PluginInfo:
        """Register one plugin object (module or instance); all of its registrations or none of them.
        The installed plugins load first, so that a name clash is always blamed on the plugin added here."""
        self._load_all()
        return self._add_plugin(plugin, name=name, source=source)

    def _add_plugin(
        self, plugin: object, *, name: str, source: str, kinds: tuple[str, ...] = tuple(KINDS)
    ) -> PluginInfo:
        if name in self._plugins:
            info = PluginInfo(name, source, error=f"a plugin named {name!r} is already loaded")
            self._plugins[f"{name} ({source})"] = info
            return info
        staged: list[Entry] = []
        try:
            self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            info = PluginInfo(name, source, error=f"invalid plugin: {exc}")
            self._plugins[name] = info
            return info
        try:
            self._check_hooks(plugin)
            self._call_hooks(plugin, name, kinds, staged)
            self._commit(staged)
        except Exception as exc:  # roll back: a half-registered plugin is worse than none
            self._pm.unregister(plugin)
            info = PluginInfo(name, source, error=_describe(exc))
        else:
            info = PluginInfo(name, source, _listing(staged))
            self._kinds_done[name] = kinds
        self._plugins[name] = info
        return info

    def _extend(self, name: str, kinds: list[str]) -> None:
        """Register the `kinds` of an already loaded plugin. On failure these are dropped and the plugin is
        marked failed; what it registered before stays (commands already shown, and possibly running)."""
        info = self._plugins[name]
        staged: list[Any] = []
        self._kinds_done[name] = (*self._kinds_done[name], *kinds)
        try:
            self._call_hooks(self._pm.get_plugin(name), name, kinds, staged)
            self._commit(staged)
        except Exception as exc:
            self._plugins[name] = dataclasses.replace(info, error=_describe(exc))
        else:
            self._plugins[name] = dataclasses.replace(info, registered={**info.registered, **_listing(staged)})

    def _call_hooks(self, plugin: object, name: str, kinds: Iterable[str], staged: list[Entry]) -> None:
        for kind in kinds:
            for impl in getattr(self._pm.hook, KINDS[kind][0]).get_hookimpls():
                if impl.plugin is plugin:
                    register = self._stager(kind, name, staged)
                    impl.function(**{arg: register for arg in impl.argnames})

    def _check_hooks(self, plugin: object) -> None:
        known = sorted(hook for hook, _ in KINDS.values())
        for caller in self._pm.get_hookcallers(plugin) or []:
            if caller.spec is None:
                raise PluginError(f"implements unknown hook {caller.name!r}; known hooks: {', '.join(known)}")

    def _stager(self, kind: str, plugin: str, staged: list[Entry]) -> Callable[..., None]:
        interface = interface_of(kind)

        def register(name: str, factory: Callable[..., Any], *, description: str = "") -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(f"bad {kind} name {name!r}: use letters, digits, '_', '.', '-'")
            if not callable(factory):
                raise PluginError(f"{kind} {name!r}: factory {factory!r} is not callable")
            if interface is not None and isinstance(factory, type) and not issubclass(factory, interface):
                raise PluginError(f"{kind} {name!r}: {factory.__name__} does not derive from fpdm.{interface.__name__}")
            if any(e.kind == kind and e.name == name for e in staged):
                raise DuplicateNameError(f"{kind} {name!r} registered twice by plugin {plugin!r}")
            staged.append(Entry(kind, name, factory, plugin, str(description)))

        return register

    def _commit(self, staged: list[Entry]) -> None:
        for entry in staged:
            held = self._entries[entry.kind].get(entry.name)
            if held is not None:
                raise DuplicateNameError(f"{entry.kind} {entry.name!r} is already registered by plugin {held.plugin!r}")
        for entry in staged:
            self._entries[entry.kind][entry.name] = entry

    # ---------------------------------------------------------------------------------------------- lookup
    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def entry(self, kind: str, name: str) -> Entry:
        entries = self._kind(kind)
        if name not in entries and self._pending:  # a command of a plugin outside `fpdm.cli`, or not loaded yet
            self._load_all()
        if name not in entries:
            error = UnknownNameError(kind.replace("_", " "), name, entries)
            failed = sorted(info.name for info in self._plugins.values() if info.error)
            if failed:  # the name may belong to a plugin that did not load: say so
                error.args = (
                    f"{error.args[0]} ({len(failed)} plugin(s) failed to load: {', '.join(failed)}; "
                    "see `fpdm plugins`)",
                )
            raise error
        return entries[name]

    def plugins(self) -> list[PluginInfo]:
        self._load_all()
        return list(self._plugins.values())

    def blame(self, exc: BaseException) -> str | None:
        """'NAME (SOURCE)' of the third-party plugin whose code raised `exc` (innermost frame first), else None.
        Lets the CLI say which plugin failed inside a solve, a step or a command instead of a bare error."""
        owners: dict[str, str] = {}
        for info in self._plugins.values():
            if info.error is None and info.source != BUILTIN_SOURCE:
                plugin = self._pm.get_plugin(info.name)
                if isinstance(plugin, types.ModuleType):
                    owners[plugin.__name__] = f"{info.name!r} ({info.source})"
        for entries in self._entries.values():
            for entry in entries.values():
                registrant = self._plugins.get(entry.plugin)
                module = getattr(entry.factory, "__module__", None)
                if (
                    registrant is not None
                    and registrant.source != BUILTIN_SOURCE
                    and module
                    and module not in _SHARED_MODULES
                ):
                    owners.setdefault(module, f"{registrant.name!r} ({registrant.source})")
        for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
            name = str(frame.f_globals.get("__name__", ""))
            for module, owner in owners.items():
                if name == module or name.startswith(module + "."):
                    return owner
        return None

    def create(self, kind: str, name: str, **options: Any) -> Any:
        """Build a registered `kind` by name with keyword options, validated: unknown options are errors."""
        entry = self.entry(kind, name)
        label = f"{kind.replace('_', ' ')} {name!r}"
        allowed = option_names(entry.factory)
        if allowed is not None:
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                listing = ", ".join(allowed) if allowed else "(none)"
                raise UsageError(f"{label} has no option {unknown[0]!r}; options: {listing}")
        try:
            obj = entry.factory(**options)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{label}: bad option: {exc}") from exc
        except Exception as exc:
            raise PluginError(f"{label} from plugin {entry.plugin!r} failed to build: {_describe(exc)}") from exc
        interface = interface_of(kind)
        if interface is not None and not isinstance(obj, interface):
            raise PluginError(
                f"{label} from plugin {entry.plugin!r} returned {type(obj).__name__}, not an fpdm.{interface.__name__}"
            )
        return obj

    def _kind(self, kind: str) -> dict[str, Entry]:
        if kind not in self._entries:
            raise UnknownNameError("kind", kind, self._entries)
        self._load_for(kind)
        return self._entries[kind]


def interface_of(kind: str) -> type | None:
    """The fpdm.interfaces class a kind's instances implement (None: any callable). Imported here, not at the
    top: only kinds other than commands need it, and they import torch anyway."""
    name = KINDS[kind][1]
    if name is None:
        return None
    from fpdm import interfaces

    return getattr(interfaces, name)


def option_names(factory: Callable[..., Any]) -> list[str] | None:
    """Keyword options a factory accepts, or None when it takes arbitrary **kwargs (it then validates itself)."""
    if isinstance(factory, type) and getattr(factory, "__attrs_attrs__", None) is not None:  # an attrs class
        import attrs

        return [f.alias for f in attrs.fields(factory) if f.init]
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def plugins_from_env() -> list[str] | None:
    """`FPDM_LOAD_PLUGINS`: unset -> None (load all), "" -> [] (none), "a,b" -> those names."""
    value = os.environ.get(ENV_LOAD_PLUGINS)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry, loaded once on first use (honours FPDM_LOAD_PLUGINS)."""
    return Registry.load(only=plugins_from_env())


def _dist_name(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else ""


def _source_of(ep: metadata.EntryPoint) -> str:
    if ep.dist is None:
        return "unknown distribution"
    if re.sub(r"[-_.]+", "-", ep.dist.name).lower() == "fpdm":
        return BUILTIN_SOURCE
    return f"{ep.dist.name} {ep.dist.version}"


def _builtin_first(ep: metadata.EntryPoint) -> tuple[bool, str, str]:
    return (_source_of(ep) != BUILTIN_SOURCE, _dist_name(ep), ep.name)


def _listing(staged: list[Entry]) -> dict[str, tuple[str, ...]]:
    registered: dict[str, tuple[str, ...]] = {}
    for entry in staged:
        registered[entry.kind] = (*registered.get(entry.kind, ()), entry.name)
    return registered


def _describe(exc: BaseException) -> str:
    """One line: our own errors speak for themselves, anything else is prefixed with its type."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(exc, FpdmError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
