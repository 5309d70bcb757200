"""The conformance kit for plugin authors: run these checks in your plugin's own tests.

``check_plugin`` checks your hooks and what they register; ``check_source_connector`` checks a
connector reads everything once and resumes exactly from its checkpoints;
``check_activator`` (``check_activator_async`` in async tests) checks an activator's outcomes
and idempotency. Each raises ``AssertionError`` explaining what broke. See
``profilemesh/plugins/README.md`` for a worked example.
"""

from profilemesh.shared.conformance import (
    check_activator,
    check_activator_async,
    check_plugin,
    check_source_connector,
    sample_deliveries,
)

__all__ = [
    "check_activator",
    "check_activator_async",
    "check_plugin",
    "check_source_connector",
    "sample_deliveries",
]
