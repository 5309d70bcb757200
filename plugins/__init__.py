"""profilemesh's built-in plugins, loaded through entry points exactly like a third party's."""
