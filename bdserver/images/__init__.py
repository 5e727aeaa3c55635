"""References become opened devices: the seam between the daemon and oci/, vdev/, convert/.

`NodeServices` (services.py) is built once from the typed Config and owns the node-wide parts
(chunk cache, trust policy, registry options, saved manifests, on-node conversions); `open_image`
(opener.py) dispatches a reference to a local EROFS file, the trusted lazy image (lazy.py) or an
on-node conversion (onnode.py). commands.py holds the in-process CLI commands (convert, inspect).
Nothing here runs a kernel interface: the daemon hands the opened device to a backend. refs.py
(which references a caller may name) is kept light: the CLI imports it before talking to the daemon.
"""
