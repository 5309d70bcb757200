"""profilemesh: unified, real-time customer profiles as a mesh of gRPC services.

The generated contracts live in ``profilemesh.<domain>.v1``; shared code in
``profilemesh.shared``; the services in ``profilemesh.services``; built-in plugins in
``profilemesh.plugins``; the plugin conformance kit in ``profilemesh.testing``.
"""
