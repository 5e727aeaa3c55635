"""`bdserver ...`: thin, one function per command; the work happens in daemon/, runtime/, convert/.

Errors print one line (what failed, what to do) and exit with the error's code; with --json the
error is a JSON object on stdout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from bdserver.config import Config, load_config
from bdserver.daemon.client import request
from bdserver.errors import BadReference, BdError, DaemonNotRunning, UsageError

if TYPE_CHECKING:
    from bdserver.images.services import NodeServices

BACKENDS = ["auto", "ublk", "tcmu", "fuse"]


def _cfg(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=None, sort_keys=True))
    elif text:
        print(text)


def _note(args: argparse.Namespace, message: str) -> None:
    if message and not getattr(args, "json", False):
        print(message, file=sys.stderr)


def _check_ref(ref: str) -> str:
    """Catch typos here, with a hint about the syntax, before the daemon is involved."""
    from bdserver.images.refs import Origin, check_reference

    check_reference(ref, Origin.ADMIN)
    return ref


# -- commands ----------------------------------------------------------------------------------
def cmd_attach(args: argparse.Namespace) -> int:
    r = request(_cfg(args), "attach", {"ref": _check_ref(args.ref), "backend": args.backend}, autostart=True)
    _note(args, r.get("message", ""))
    _emit(args, r, f"{r['path']} {r['id']}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    r = request(_cfg(args), "mount", {"ref": _check_ref(args.ref), "target": os.path.abspath(args.target),
                                      "backend": args.backend, "lower_only": args.lower_only}, autostart=True)
    _note(args, r.get("message", ""))
    _emit(args, r, f"{r['target']} {r['id']} {r['path']}")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    r = request(_cfg(args), "umount", {"target": os.path.abspath(args.target)})
    _emit(args, r, "")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    r = request(_cfg(args), "detach", {"key": args.device})
    _emit(args, r, "")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    devs = request(_cfg(args), "ls")
    rows = [f"{'ID':<6} {'BACKEND':<7} {'STATUS':<8} {'PATH':<40} {'REF':<40} MOUNTS"]
    for d in devs:
        rows.append(f"{d['id']:<6} {d['backend']:<7} {d['status']:<8} {d['path']:<40} {d['ref']:<40} "
                    f"{','.join(d['mounts']) or '-'}")
    _emit(args, devs, "\n".join(rows))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from bdserver.daemon.statsview import table

    if args.watch is not None and not args.watch > 0:
        raise UsageError("--watch needs a positive number of seconds")
    cfg = _cfg(args)
    ask = {"key": args.device} if args.device else {}
    if args.watch is None:
        devs = request(cfg, "stats", ask)
        _emit(args, devs, table(devs))
        return 0
    prev: dict[str, Any] = {}
    then = 0.0
    try:
        while True:  # until Ctrl-C
            devs, now = request(cfg, "stats", ask), time.monotonic()
            if getattr(args, "json", False):
                print(json.dumps(devs, sort_keys=True), flush=True)
            else:
                clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
                print(f"{clear}bdserver stats every {args.watch:g}s at {time.strftime('%H:%M:%S')}\n"
                      f"{table(devs, prev, now - then if then else 0.0)}", flush=True)
            prev, then = {d["id"]: d for d in devs}, now
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bdserver.daemon.logs import setup_logging
    from bdserver.daemon.server import serve
    from bdserver.runtime.containerd.service import start_snapshotter

    cfg = _cfg(args)
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
    setup_logging(cfg)
    return serve(cfg, extra_services=[start_snapshotter])


def cmd_stop(args: argparse.Namespace) -> int:
    from bdserver.daemon.protocol import call

    cfg = _cfg(args)
    try:
        call(cfg.socket, "shutdown", timeout=30)
    except ConnectionError:
        pass  # not running: nothing to stop
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bdserver.runtime.run import run_container

    cmd = [c for c in args.cmd if c != "--"] if args.cmd[:1] == ["--"] else args.cmd
    return run_container(_cfg(args), _check_ref(args.ref), cmd, backend=args.backend, unsafe_chroot=args.unsafe_chroot)


def cmd_optimize(args: argparse.Namespace) -> int:
    from bdserver.runtime.optimize import optimize

    if bool(args.ref) == bool(args.from_stats):
        raise BadReference("optimize needs REF (record a start) or --from-stats DEVICE (a device that ran), not both")
    cmd = [c for c in args.cmd if c != "--"] if args.cmd[:1] == ["--"] else args.cmd
    r = optimize(_cfg(args), _check_ref(args.ref) if args.ref else None, cmd, backend=args.backend,
                 timeout=args.timeout, from_stats=args.from_stats, output=args.output, publish=not args.no_publish)
    _emit(args, r, r["summary"])
    return 0 if r["status"] == 0 or r["timed_out"] else int(r["status"])  # the container's failure is ours


def cmd_hook(args: argparse.Namespace) -> int:
    from bdserver.runtime.hook import hook_main

    return hook_main(_cfg(args), args.stage, sys.stdin, sys.stdout)


def _services(args: argparse.Namespace) -> "NodeServices":
    from bdserver.images.services import NodeServices

    return NodeServices.from_config(_cfg(args))


def cmd_convert(args: argparse.Namespace) -> int:
    from bdserver.images.commands import convert

    r = convert(_services(args), args.source, args.dest, compress=args.compress)
    _emit(args, r, r.get("summary", ""))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    try:
        r = request(cfg, "cache_prune")
    except DaemonNotRunning:
        r = _services(args).prune_cache()
    _emit(args, r, f"pruned {r.get('pruned_bytes', 0)} bytes")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    """Node trust in lazy images: `trust allow DIGEST` pins one in state_dir/trust/allowed."""
    policy = _services(args).trust
    if args.action == "allow":
        if not args.digest:
            raise BadReference("trust allow needs the lazy manifest DIGEST (sha256:...)")
        try:
            policy.allow(args.digest)
        except BdError as exc:
            raise BadReference(str(exc)) from None
    digests = sorted(policy.allowed_digests())
    _emit(args, {"allowed": digests}, "\n".join(digests))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from bdserver.daemon.client import ping, start_daemon
    from bdserver.runtime.containerd.pull import pull

    cfg = _cfg(args)
    if ping(cfg) is None:  # the snapshotter containerd calls lives in the daemon
        start_daemon(cfg)
    r = pull(cfg, _check_ref(args.ref), args.address, args.namespace)
    _emit(args, r.to_json(), f"{r.name} {r.manifest}: {r.layers - r.unpacked} of {r.layers} layers committed lazily "
                             f"on the bdserver snapshotter, {r.unpacked} unpacked (no trusted lazy image)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bdserver.images.commands import inspect

    r = inspect(_services(args), args.image)
    _emit(args, r, r.get("summary", json.dumps(r, indent=1, default=str)))
    return 0


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="daemon config file (default $BDSERVER_CONFIG or /etc/bdserver/config.toml)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output and errors")
    p = argparse.ArgumentParser(prog="bdserver", description="One lazily fetched EROFS block device per container")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    sp = add("convert", cmd_convert, "convert an image to a lazy EROFS image (no DEST: push as referrer)")
    sp.add_argument("source", metavar="SOURCE")
    sp.add_argument("dest", nargs="?", metavar="DEST")
    sp.add_argument("--compress", choices=["none", "lz4"], default=None,
                    help="file data of tar layers in EROFS: none, or lz4 (the kernel decompresses; the node cache "
                         "holds compressed bytes); default: none, see docs/bench.md")
    sp = add("attach", cmd_attach, "attach an image as a device; prints the device path and id")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("--backend", choices=BACKENDS, default="", help="default: the config's backend (auto)")
    sp = add("mount", cmd_mount, "mount an image: EROFS lower + overlay upper at TARGET")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("target", metavar="TARGET")
    sp.add_argument("--backend", choices=BACKENDS, default="", help="default: the config's backend (auto)")
    sp.add_argument("--lower-only", action="store_true", help="just the read-only EROFS mount")
    sp = add("umount", cmd_umount, "unmount TARGET (and detach the device mount attached)")
    sp.add_argument("target", metavar="TARGET")
    sp = add("detach", cmd_detach, "detach a device by id or path")
    sp.add_argument("device", metavar="DEVICE|ID")
    add("ls", cmd_ls, "list devices and mounts")
    sp = add("stats", cmd_stats, "per device: cache hit ratio, bytes fetched vs size, read latency, errors")
    sp.add_argument("device", nargs="?", metavar="DEVICE")
    sp.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (2) with read and fetch rates, until Ctrl-C")
    sp = add("run", cmd_run, "run a container (runc) on a lazily mounted rootfs")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("--backend", choices=BACKENDS, default="", help="default: the config's backend (auto)")
    sp.add_argument("--unsafe-chroot", action="store_true",
                    help="no runc: run the command as host root in a plain chroot, with NO isolation "
                         "(no namespaces, cgroups, seccomp or capability limits); for debugging only")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    sp = add("optimize", cmd_optimize, "record a start trace of REF and publish it as a referrer of its lazy image")
    sp.add_argument("ref", nargs="?", metavar="REF")
    sp.add_argument("--backend", choices=BACKENDS, default="", help="default: the config's backend (auto)")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="stop recording (and kill the container) after S seconds (default 60)")
    sp.add_argument("--from-stats", metavar="DEVICE", help="take the trace of a device that already ran, no re-run")
    sp.add_argument("--output", metavar="FILE", help="also write the trace to FILE")
    sp.add_argument("--no-publish", action="store_true", help="do not push the trace to the registry")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD... (default: the image's entrypoint)")
    add("serve", cmd_serve, "run the daemon in the foreground")
    add("stop", cmd_stop, "ask the daemon to exit (devices stay in state and come back with it)")
    sp = add("hook", cmd_hook, "OCI runtime hook entry (state JSON on stdin)")
    sp.add_argument("stage", nargs="?", default="auto",
                    choices=["auto", "prestart", "createRuntime", "poststop", "precreate"],
                    help="auto: from the state's status (creating -> createRuntime, stopped -> poststop)")
    sp = add("cache", cmd_cache, "manage the node chunk cache")
    sp.add_argument("action", choices=["prune"])
    sp = add("trust", cmd_trust, "lazy images this node may use: allow a digest, or list them")
    sp.add_argument("action", choices=["allow", "ls"])
    sp.add_argument("digest", nargs="?", metavar="DIGEST")
    sp = add("pull", cmd_pull, "lazy pull into containerd: image record + snapshots, no layer downloaded")
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("--address", default="/run/containerd/containerd.sock", help="containerd's socket")
    sp.add_argument("--namespace", default="default", help="containerd namespace (CRI uses k8s.io)")
    sp = add("inspect", cmd_inspect, "describe an EROFS image file or a lazy image reference")
    sp.add_argument("image", metavar="IMAGE")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BdError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": exc.to_wire()}))
        else:
            print(f"bdserver {args.command}: {exc.user_message()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
