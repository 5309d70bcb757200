"""Code every profilemesh service shares: settings, server bootstrap, errors, plugins, the log."""
