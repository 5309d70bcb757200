"""The five services of the mesh, the runner that serves one and the supervisor that runs all."""
