"""Every hook a profilemesh plugin can implement: the whole extension surface in one file.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl` whose names
match the specs below. It is found through the ``profilemesh`` entry-point group, loaded by
:func:`profilemesh.shared.plugin_manager.create_plugin_manager` and checked against these specs:
an implementation whose name matches no spec, or whose parameters are not a subset of its spec's,
is a :class:`pluggy.PluginValidationError` when the plugin is loaded.

The hooks are ``register_*`` callbacks: profilemesh calls the hook with a ``register`` function
and the plugin calls ``register(SomeClass)`` once per class it contributes. No hook is
``firstresult``: every plugin's implementation is called, and each one is called on its own, so
a plugin that raises loses its own registrations for that hook and nobody else's.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from profilemesh.shared.extension_points import Activator, SourceConnector

PROJECT_NAME = "profilemesh"
"""The pluggy project name; also the entry-point group plugins are declared in."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks a function of this module as a hook specification."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin's function as the implementation of the hook spec of the same name."""


@hookspec
def register_sources(register: Callable[[type[SourceConnector]], None]) -> None:
    """Contribute source connectors: classes that read events or customer records from elsewhere.

    Called once per plugin set, the first time the source connectors are asked for (ingestion
    does so at start-up; ``profilemesh plugins`` does so to list them). Not ``firstresult``:
    every plugin's implementation is called.

    Receives ``register``, to be called once per connector class: a concrete subclass of
    :class:`~profilemesh.shared.extension_points.SourceConnector` with a unique ``name``, a
    ``description`` and a pydantic ``config_model``. Register the class, not an instance:
    ingestion instantiates it once per import run with that run's configuration.

    Returns nothing. If the implementation raises, or registers something invalid (not a
    concrete ``SourceConnector`` subclass, or a name another plugin already took), none of this
    plugin's connectors are registered and the failure is recorded against the plugin.
    """


@hookspec
def register_activators(register: Callable[[type[Activator]], None]) -> None:
    """Contribute activators: classes that deliver segment entries and exits to a destination.

    Called once per plugin set, the first time the activators are asked for (activation does so
    at start-up; ``profilemesh plugins`` does so to list them). Not ``firstresult``: every
    plugin's implementation is called.

    Receives ``register``, to be called once per activator class: a concrete subclass of
    :class:`~profilemesh.shared.extension_points.Activator` with a unique ``name``, a
    ``description`` and a pydantic ``config_model``. Register the class, not an instance:
    activation instantiates it once per destination with that destination's configuration.

    Returns nothing. If the implementation raises, or registers something invalid (not a
    concrete ``Activator`` subclass, or a name another plugin already took), none of this
    plugin's activators are registered and the failure is recorded against the plugin.
    """
