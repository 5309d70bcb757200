"""Loading plugins and collecting what they register, with every plugin's failure isolated.

:func:`create_plugin_manager` builds a fresh :class:`PluginSet` per application (never at import
time, so tests and embedded uses each get their own): a pluggy manager with the hook specs of
:mod:`profilemesh.shared.hookspecs` and the plugins of the ``profilemesh`` entry-point group.

Two kinds of plugin fault are treated differently, on purpose:

- A plugin that does not match the hook specs (an unknown hook name, a parameter the spec does
  not have) is a programming error found at load time: :class:`pluggy.PluginValidationError`
  is raised, loudly, before anything runs.
- A plugin that fails while running (its import raises, its hook raises, it registers an
  invalid class or a name already taken) is isolated: logged, recorded in
  :attr:`PluginSet.failures`, shown by ``profilemesh plugins``; the other plugins still work.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import pluggy
from pydantic import BaseModel

from profilemesh.shared import hookspecs
from profilemesh.shared.errors import NotFound
from profilemesh.shared.extension_points import Activator, SourceConnector

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
"""The entry-point group plugins declare themselves in (``[project.entry-points.profilemesh]``)."""

SOURCE = "source"
ACTIVATOR = "activator"

_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

Extension = TypeVar("Extension", SourceConnector, Activator)


class PluginRegistrationError(Exception):
    """A plugin registered something that is not a valid connector or activator."""


@dataclass(frozen=True, slots=True)
class PluginFailure:
    """A plugin that could not be imported, or failed in one of its hooks.

    ``stage`` is ``"load"`` for an import failure, otherwise the hook's name; ``error`` is the
    exception's type and message.
    """

    plugin: str
    stage: str
    error: str


class PluginDescription(NamedTuple):
    """One line of ``profilemesh plugins``: what one plugin registered for one extension point.

    ``kind`` is ``"source"`` or ``"activator"``, or ``None`` for a plugin that failed to load or
    implements no hook; ``failure`` says why a plugin contributes nothing of that kind.
    """

    plugin: str
    kind: str | None
    names: tuple[str, ...]
    failure: str | None

    def __str__(self) -> str:
        registered = ", ".join(self.names) or "-"
        line = f"{self.plugin:<24} {self.kind or '-':<10} {registered}"
        return f"{line}  FAILED: {self.failure}" if self.failure else line


@dataclass(slots=True)
class _Registrations:
    """What one register hook collected from every plugin, and who failed."""

    classes: dict[str, type[Any]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def names_of(self, plugin: str) -> tuple[str, ...]:
        return tuple(name for name, owner in self.owners.items() if owner == plugin)

    def failure_of(self, plugin: str) -> str | None:
        return next((f.error for f in self.failures if f.plugin == plugin), None)


@dataclass(frozen=True, slots=True)
class _ExtensionPoint:
    kind: str
    hook_name: str
    base: type[Any]


_EXTENSION_POINTS = (
    _ExtensionPoint(SOURCE, "register_sources", SourceConnector),
    _ExtensionPoint(ACTIVATOR, "register_activators", Activator),
)


def create_plugin_manager(
    disabled: Iterable[str] = (), load_entry_points: bool = True
) -> PluginSet:
    """A new plugin set with the ``profilemesh`` entry points loaded, except ``disabled`` ones.

    ``disabled`` holds entry-point names (``inline_source``) or distribution names
    (``profilemesh-webhooks``, which disables every plugin that package declares); the CLI
    passes ``Settings.disabled_plugins`` (``PROFILEMESH_DISABLED_PLUGINS``). With
    ``load_entry_points=False`` the set starts empty, for tests and embedding.

    Raises :class:`pluggy.PluginValidationError` if a loaded plugin implements an unknown hook
    or a hook with parameters its spec does not have.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    plugins = PluginSet(manager, disabled=disabled)
    if load_entry_points:
        plugins.load_entry_points(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return plugins


class PluginSet:
    """The plugins of one application and the connectors and activators they register.

    The register hooks are called the first time their extension point is asked for, and
    again only after another plugin is registered.
    """

    def __init__(self, manager: pluggy.PluginManager, disabled: Iterable[str] = ()) -> None:
        """Wrap ``manager`` (which has the hook specs added); never load the ``disabled`` names."""
        self.manager = manager
        self.disabled = frozenset(_normalise(name) for name in disabled)
        self.skipped: list[str] = []
        """Entry points not loaded because they are disabled."""
        self._load_failures: list[PluginFailure] = []
        self._collected: dict[str, _Registrations] = {}

    def load_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint]) -> None:
        """Import and register each entry point's plugin unless disabled.

        A plugin whose import raises is recorded in :attr:`failures` and skipped. Raises
        :class:`pluggy.PluginValidationError` for a plugin that does not match the hook specs.
        """
        for entry_point in entry_points:
            if self._is_disabled(entry_point):
                logger.info("plugin %s is disabled; not loading it", entry_point.name)
                self.skipped.append(entry_point.name)
                continue
            if self.manager.has_plugin(entry_point.name):
                self._record(
                    PluginFailure(
                        entry_point.name,
                        "load",
                        f"another plugin is already registered as {entry_point.name!r} "
                        f"(entry point {entry_point.value})",
                    )
                )
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:
                self._record(PluginFailure(entry_point.name, "load", _describe(error)), error)
                continue
            try:
                self.manager.register(plugin, name=entry_point.name)
            except ValueError as error:  # the same module declared under two entry points
                self._record(PluginFailure(entry_point.name, "load", _describe(error)))
        self.manager.check_pending()
        self._collected.clear()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Add a plugin object (a module, class or instance with hookimpls) programmatically.

        Returns the name it is registered under, or ``None`` if that name is disabled. Raises
        :class:`pluggy.PluginValidationError` (and registers nothing) if the plugin does not
        match the hook specs, ``ValueError`` if the plugin or name is registered already.
        """
        name = name or self.manager.get_canonical_name(plugin)
        if _normalise(name) in self.disabled:
            logger.info("plugin %s is disabled; not registering it", name)
            return None
        registered = self.manager.register(plugin, name=name)
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError:
            self.manager.unregister(plugin)
            raise
        self._collected.clear()
        return registered

    def source_connectors(self) -> dict[str, type[SourceConnector]]:
        """Every registered source connector class, by its ``name``."""
        return dict(self._collect(_EXTENSION_POINTS[0]).classes)

    def activators(self) -> dict[str, type[Activator]]:
        """Every registered activator class, by its ``name``."""
        return dict(self._collect(_EXTENSION_POINTS[1]).classes)

    def source_connector(self, name: str) -> type[SourceConnector]:
        """The source connector called ``name``; :class:`NotFound` lists the known ones."""
        return _lookup(SOURCE, name, self.source_connectors())

    def activator(self, name: str) -> type[Activator]:
        """The activator called ``name``; :class:`NotFound` lists the known ones."""
        return _lookup(ACTIVATOR, name, self.activators())

    @property
    def failures(self) -> list[PluginFailure]:
        """Every plugin failure: imports that raised, and register hooks that failed."""
        failures = list(self._load_failures)
        for point in _EXTENSION_POINTS:
            failures.extend(self._collect(point).failures)
        return failures

    def describe(self) -> list[PluginDescription]:
        """A row per plugin and extension point it implements, then one per failed import."""
        rows: list[PluginDescription] = []
        for name, plugin in self._plugins():
            implemented = [point for point in _EXTENSION_POINTS if self._implements(plugin, point)]
            for point in implemented:
                collected = self._collect(point)
                rows.append(
                    PluginDescription(
                        name, point.kind, collected.names_of(name), collected.failure_of(name)
                    )
                )
            if not implemented:
                rows.append(PluginDescription(name, None, (), None))
        rows.extend(PluginDescription(f.plugin, None, (), f.error) for f in self._load_failures)
        return rows

    def _is_disabled(self, entry_point: importlib.metadata.EntryPoint) -> bool:
        distribution = entry_point.dist.name if entry_point.dist is not None else None
        return _normalise(entry_point.name) in self.disabled or (
            distribution is not None and _normalise(distribution) in self.disabled
        )

    def _plugins(self) -> list[tuple[str, object]]:
        # A name blocked through pluggy directly is kept in its table with ``None`` as plugin.
        return [(n, p) for n, p in self.manager.list_name_plugin() if p is not None]

    def _implements(self, plugin: object, point: _ExtensionPoint) -> bool:
        hook: pluggy.HookCaller = getattr(self.manager.hook, point.hook_name)
        return any(impl.plugin is plugin for impl in hook.get_hookimpls())

    def _collect(self, point: _ExtensionPoint) -> _Registrations:
        if point.hook_name not in self._collected:
            collected = _Registrations()
            hook: pluggy.HookCaller = getattr(self.manager.hook, point.hook_name)
            impls = hook.get_hookimpls()
            # Plugins are called in the order they were registered, so that when two claim
            # the same name the first one keeps it, whatever pluggy's tryfirst/trylast say.
            for _, plugin in self._plugins():
                for impl in impls:
                    if impl.plugin is plugin:
                        self._call_isolated(impl, point, collected)
            self._collected[point.hook_name] = collected
        return self._collected[point.hook_name]

    def _call_isolated(
        self, impl: pluggy.HookImpl, point: _ExtensionPoint, collected: _Registrations
    ) -> None:
        """Call one plugin's register hook; keep its registrations only if all of it succeeds."""
        pending: dict[str, type[Any]] = {}

        def register(cls: type[Any]) -> None:
            name = validate_registration(cls, point.base)
            owner = collected.owners.get(name) or (impl.plugin_name if name in pending else None)
            if owner is not None:
                raise PluginRegistrationError(
                    f"{point.kind} name {name!r} of {cls.__qualname__} is already registered "
                    f"by plugin {owner!r}"
                )
            pending[name] = cls

        try:
            if impl.hookwrapper or impl.wrapper:
                raise PluginRegistrationError(f"{point.hook_name} cannot be a hook wrapper")
            arguments: dict[str, Callable[[type[Any]], None]] = {"register": register}
            impl.function(*(arguments[name] for name in impl.argnames))
        except Exception as error:
            self._record(
                PluginFailure(impl.plugin_name, point.hook_name, _describe(error)),
                error,
                collected.failures,
            )
            return
        collected.classes.update(pending)
        collected.owners.update(dict.fromkeys(pending, impl.plugin_name))

    def _record(
        self,
        failure: PluginFailure,
        error: BaseException | None = None,
        into: list[PluginFailure] | None = None,
    ) -> None:
        logger.error(
            "plugin %s failed (%s): %s; it is skipped",
            failure.plugin,
            failure.stage,
            failure.error,
            exc_info=error,
        )
        (self._load_failures if into is None else into).append(failure)


def validate_registration(cls: object, base: type[Any]) -> str:
    """The name ``cls`` registers under; :class:`PluginRegistrationError` says what is wrong."""
    kind = base.__name__
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise PluginRegistrationError(f"{cls!r} is not a subclass of {kind}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginRegistrationError(f"{cls.__qualname__} is abstract: it lacks {missing}")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and _NAME_PATTERN.fullmatch(name)):
        raise PluginRegistrationError(
            f"{cls.__qualname__}.name must be a lower_snake_case string, not {name!r}"
        )
    description = getattr(cls, "description", None)
    if not (isinstance(description, str) and description.strip()):
        raise PluginRegistrationError(f"{cls.__qualname__}.description must be a non-empty string")
    config_model = getattr(cls, "config_model", None)
    if not (inspect.isclass(config_model) and issubclass(config_model, BaseModel)):
        raise PluginRegistrationError(
            f"{cls.__qualname__}.config_model must be a pydantic BaseModel subclass"
        )
    return name


def _lookup(kind: str, name: str, known: dict[str, type[Extension]]) -> type[Extension]:
    try:
        return known[name]
    except KeyError:
        raise NotFound(
            f"no {kind} called {name!r}; installed: {', '.join(sorted(known)) or 'none'}",
            reason=f"UNKNOWN_{kind.upper()}",
            metadata={kind: name},
        ) from None


def _normalise(name: str) -> str:
    # Distribution names compare case- and separator-insensitively (PEP 503); entry-point
    # names are already lower_snake_case in practice, so one rule serves both.
    return re.sub(r"[-_.]+", "_", name).lower()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
