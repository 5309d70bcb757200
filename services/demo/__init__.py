"""``profilemesh demo``: the whole mesh on generated data, with a summary and a report."""
