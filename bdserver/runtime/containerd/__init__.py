"""containerd integration: the proxy snapshotter served by the daemon, and `bdserver pull`.

api.py (generated gRPC code), metadata.py (sqlite snapshot graph), remote.py (remote-snapshot
labels -> trusted lazy image), lowers.py (one EROFS mount per image through the DeviceManager),
snapshotter.py (the semantics), service.py (gRPC), pull.py (`bdserver pull`).
"""
