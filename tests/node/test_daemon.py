"""The daemon through the real CLI: socket permissions, lifecycle, restart recovery, error messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from bdserver import mounts
from bdserver.errors import BadTarget, FormatError, NoSuchDevice
from tests.node.conftest import REPO, assert_same_tree


def test_socket_is_root_only(daemon, erofs_image) -> None:
    image, _ = erofs_image
    daemon.cli("attach", f"file:{image}")  # auto-starts the daemon
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\nexcept PermissionError: print('denied')\n")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                        str(daemon.socket)], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "denied"


def test_attach_ls_stats_detach(daemon, erofs_image, tmp_path: Path) -> None:
    image, src = erofs_image
    out = daemon.cli("attach", f"file:{image}", "--backend", "fuse").stdout.split()
    path, dev_id = out
    assert os.stat(path).st_size == image.stat().st_size
    info = daemon.json("attach", f"file:{image}")
    assert info["id"] != dev_id and info["backend"] == "fuse" and info["size"] == image.stat().st_size
    devs = daemon.json("ls")
    assert [d["id"] for d in devs] == [dev_id, info["id"]]
    assert all(d["status"] == "attached" for d in devs)
    # read through the device, then stats shows it
    target = tmp_path / "lower"
    mounts.mount_erofs(path, str(target))
    try:
        assert_same_tree(target, src)
    finally:
        mounts.unmount(str(target))
    st = daemon.json("stats", dev_id)
    assert len(st) == 1 and st[0]["stats"]["bytes_read"] > 0 and st[0]["stats"]["reads"] > 0
    lat = st[0]["stats"]["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert dev_id in daemon.cli("stats").stdout.splitlines()[1].split()  # the human table: one line per device
    assert dev_id in daemon.cli("ls").stdout
    daemon.cli("detach", dev_id)
    daemon.cli("detach", info["path"])  # by path works too
    assert daemon.json("ls") == []
    state = json.loads((daemon.state_dir / "state.json").read_text())
    assert state["devices"] == {}
    assert not os.path.exists(path)


def test_mount_overlay_and_umount(daemon, erofs_image, tmp_path: Path) -> None:
    image, src = erofs_image
    target = tmp_path / "rootfs"
    r = daemon.json("mount", f"file:{image}", str(target))
    assert r["target"] == str(target)
    assert_same_tree(target, src, overlay=True)
    (target / "written").write_text("upper\n")  # the overlay upper is writable
    (target / "text").write_text("changed\n")
    kinds = {m.target: m.fstype for m in mounts.list_mounts()}
    assert kinds[str(target)] == "overlay"
    lower_only = tmp_path / "lower"
    daemon.cli("mount", f"file:{image}", str(lower_only), "--lower-only")
    assert {m.target: m.fstype for m in mounts.list_mounts()}[str(lower_only)] == "erofs"
    p = daemon.cli("detach", r["id"], check=False)
    assert p.returncode == 10 and "mounted at" in p.stderr and "umount" in p.stderr
    daemon.cli("umount", str(target))
    daemon.cli("umount", str(lower_only))
    assert not mounts.find_mounts(target=str(target)) and not mounts.find_mounts(target=str(lower_only))
    assert daemon.json("ls") == []  # devices attached by `mount` go with `umount`


def test_restart_reattaches_from_state(daemon, erofs_image, tmp_path: Path) -> None:
    image, src = erofs_image
    a = daemon.json("attach", f"file:{image}")
    target = tmp_path / "rootfs"
    m = daemon.json("mount", f"file:{image}", str(target))
    (target / "kept").write_text("survives a restart\n")
    before = daemon.json("ls")
    # graceful restart
    daemon.stop()
    assert daemon.cli("ls", check=False).returncode == 7
    daemon.start()
    after = daemon.json("ls")
    assert [(d["id"], d["path"], d["mounts"], d["status"]) for d in after] == \
        [(d["id"], d["path"], d["mounts"], d["status"]) for d in before]
    assert (target / "kept").read_text() == "survives a restart\n"
    assert (target / "text").read_text() == "hello bdserver 1\n"
    # crash (SIGKILL) and restart: the FUSE connection is taken over from the fd store, its mounts stay
    daemon.kill()
    daemon.start()
    after = daemon.json("ls")
    assert {d["id"] for d in after} == {a["id"], m["id"]} and all(d["status"] == "attached" for d in after)
    assert (target / "kept").read_text() == "survives a restart\n"
    assert (target / "d" / "big").read_bytes() == (src / "d" / "big").read_bytes()
    daemon.cli("umount", str(target))
    daemon.cli("detach", a["id"])
    assert daemon.json("ls") == []


def test_errors_are_one_line_with_exit_codes(daemon, erofs_image, tmp_path: Path) -> None:
    p = daemon.cli("ls", check=False)  # no daemon yet, and ls does not start one
    assert p.returncode == 7 and p.stderr.count("\n") == 1 and "not running" in p.stderr
    assert "bdserver serve" in p.stderr
    p = daemon.cli("attach", f"file:{tmp_path}/missing.erofs", check=False)  # starts the daemon
    assert p.returncode == 5 and p.stderr.count("\n") == 1 and "missing.erofs" in p.stderr
    p = daemon.cli("detach", "bd42", check=False)
    assert p.returncode == NoSuchDevice.exit_code and p.stderr.startswith("bdserver detach: no device")
    assert p.stderr.count("\n") == 1
    p = daemon.cli("detach", "bd42", "--json", check=False)
    err = json.loads(p.stdout)
    assert p.returncode == NoSuchDevice.exit_code and err["ok"] is False and err["error"]["type"] == "NoSuchDevice"
    p = daemon.cli("umount", str(tmp_path), check=False)
    assert p.returncode == NoSuchDevice.exit_code and "not mounted by bdserver" in p.stderr
    p = daemon.cli("attach", f"file:{erofs_image[0]}", "--backend", "tcmu", check=False)
    assert p.returncode == 8 and p.stderr.count("\n") == 1  # KernelError: tcmu is not on this host
    p = subprocess.run([sys.executable, "-m", "bdserver.cli", "attach"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2  # usage error


def test_concurrent_autostart_starts_one_daemon(daemon, erofs_image) -> None:
    image, _ = erofs_image
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: daemon.cli("attach", f"file:{image}", check=False), range(4)))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    assert len({r.stdout.split()[1] for r in results}) == 4
    assert len(daemon.json("ls")) == 4


def test_inspect(daemon, erofs_image) -> None:
    image, _ = erofs_image
    info = daemon.json("inspect", str(image))
    assert info["superblock"]["blocks"] * info["superblock"]["block_size"] <= image.stat().st_size
    assert "EROFS image" in daemon.cli("inspect", str(image)).stdout


def _kernel_offers() -> dict[str, bool]:
    """What this kernel offers, from the kernel's own files (after `check` loaded what it can)."""
    return {"ublk": os.path.exists("/dev/ublk-control"),
            "tcmu": os.path.isdir("/sys/module/target_core_user") and os.path.isdir("/sys/kernel/config/target/core")
            and os.path.isdir("/sys/module/tcm_loop"),
            "fuse": os.path.exists("/dev/fuse")}


def test_kernel_check_reports_what_the_kernel_offers() -> None:
    p = subprocess.run([str(REPO / "kernel-setup" / "check"), "--json"], capture_output=True, text=True, check=True)
    r = json.loads(p.stdout)
    assert r["erofs"]["file_backed"] is True and r["fuse"]["status"] in ("builtin", "loaded", "loadable")
    assert r["overlay"]["status"] != "absent"
    offers = _kernel_offers()
    assert {name: r["backends"][name]["available"] for name in offers} == offers
    assert r["auto"] == next(name for name in ("ublk", "tcmu", "fuse") if offers[name])
    assert "auto picks" in subprocess.run([str(REPO / "kernel-setup" / "check")], capture_output=True,
                                          text=True).stdout


def test_a_file_that_is_not_erofs_is_refused_before_anything_is_attached(daemon, tmp_path: Path) -> None:
    for path in ("/etc/passwd", "/etc/hostname"):
        p = daemon.cli("mount", f"file:{path}", str(tmp_path / "t"), check=False)
        assert p.returncode == FormatError.exit_code and "not an EROFS image" in p.stderr, p.stderr
        assert daemon.json("ls") == []
        assert not mounts.is_mountpoint(str(tmp_path / "t"))


def test_more_error_messages(daemon, erofs_image, tmp_path: Path) -> None:
    image, _ = erofs_image
    p = daemon.cli("attach", "Bad Ref!!", check=False)
    assert p.returncode == 2 and "HOST[:PORT]/REPO" in p.stderr and p.stderr.count("\n") == 1
    p = daemon.cli("mount", f"file:{image}", "/proc/nonexistent/x", check=False)
    assert p.returncode == BadTarget.exit_code and "cannot create mount point" in p.stderr and p.stderr.count("\n") == 1
    assert daemon.json("ls") == []  # nothing left attached by the failed mount
    p = daemon.cli("attach", "127.0.0.1:1/nothing/here:v1", check=False)  # nobody listens on port 1
    assert p.returncode == 5 and "reachable" in p.stderr and p.stderr.count("\n") == 1


def test_logs_are_json_and_scrub_credentials(daemon, erofs_image) -> None:
    from bdserver.daemon.logs import scrub

    assert "s3cret" not in scrub("GET https://user:s3cret@reg.example/v2/ Authorization: Bearer s3cret")
    assert "s3cret" not in scrub('{"auth": "s3cret", "password": "s3cret"}')
    image, _ = erofs_image
    daemon.cli("attach", f"file:{image}")
    lines = (daemon.state_dir / "bdserver.log").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert any(r["msg"].startswith("attached bd0") for r in recs)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in recs)


def test_backend_auto_picks_the_first_available_and_a_missing_one_is_refused(daemon, erofs_image) -> None:
    image, _ = erofs_image
    subprocess.run([str(REPO / "kernel-setup" / "check")], capture_output=True)  # loads what it can
    offers = _kernel_offers()
    auto = next(name for name in ("ublk", "tcmu", "fuse") if offers[name])
    cfg = daemon.base / "config.toml"
    cfg.write_text(cfg.read_text().replace('backend = "fuse"', 'backend = "auto"'))
    r = daemon.json("attach", f"file:{image}")  # config default: auto
    assert r["backend"] == auto
    r = daemon.json("attach", f"file:{image}", "--backend", "auto")
    assert r["backend"] == auto
    missing = [name for name in ("ublk", "tcmu") if not offers[name]]
    for name in missing:  # this host (no ublk_drv, no TCMU): both; the lab: none
        p = daemon.cli("attach", f"file:{image}", "--backend", name, check=False)
        assert p.returncode == 8 and name in p.stderr and p.stderr.count("\n") == 1
    assert [d["backend"] for d in daemon.json("ls")] == [auto, auto]
