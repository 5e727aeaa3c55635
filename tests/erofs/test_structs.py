"""On-disk structs: sizes, pack/unpack round trips, CRC32C, checksum against mkfs.erofs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from bdserver.errors import FormatError
from bdserver.erofs import structs as S
from bdserver.erofs.inspect import format_summary, inspect_path


@pytest.mark.parametrize(
    "obj,size",
    [
        (S.Superblock(root_nid=36, inos=5, build_time=-5, uuid=b"u" * 16, volume_name=b"label".ljust(16, b"\0")), 128),
        (S.InodeCompact(format=4, xattr_icount=6, mode=0o40755, nlink=3, size=100, u=7, ino=1, uid=1, gid=2), 32),
        (S.InodeExtended(format=9, mode=0o100644, size=1 << 40, u=3, uid=70000, gid=80000,
                         mtime=-1, mtime_nsec=999, nlink=70000), 64),  # fmt: skip
        (S.Dirent(nid=1 << 40, nameoff=24, file_type=S.FT_DIR), 12),
        (S.XattrIbodyHeader(shared_count=3), 12),
        (S.XattrEntry(name_len=14, name_index=4, value_size=1), 4),
        (S.ChunkIndex(device_id=2, blkaddr=12345), 8),
        (S.DeviceSlot(tag=b"sha256:abc", blocks=10, mapped_blkaddr=20), 128),
    ],
)
def test_pack_unpack(obj: object, size: int) -> None:
    raw = obj.pack()  # type: ignore[attr-defined]
    assert len(raw) == size == type(obj).SIZE  # type: ignore[attr-defined]
    assert type(obj).unpack(raw) == obj  # type: ignore[attr-defined]


def test_crc32c_known_vector() -> None:
    assert S.crc32c(b"123456789") == 0xE3069283
    assert S.crc32c(b"") == 0


def test_rdev_encoding_roundtrip() -> None:
    for major, minor in [(0, 0), (1, 3), (8, 1), (259, 70000), (4000, 1_000_000)]:
        dev = os.makedev(major, minor)
        assert S.decode_rdev(S.encode_rdev(dev)) == dev
    assert S.encode_rdev(os.makedev(1, 3)) == 0x103


def test_xattr_names() -> None:
    assert S.split_xattr_name("security.capability") == (6, b"capability")
    assert S.split_xattr_name("system.posix_acl_access") == (2, b"")
    assert S.split_xattr_name("system.posix_acl_default") == (3, b"")
    assert S.join_xattr_name(4, b"overlay.opaque") == "trusted.overlay.opaque"
    with pytest.raises(FormatError):
        S.split_xattr_name("system.posix_acl_accessX")
    # the verified encoding of trusted.overlay.opaque=y (reference §4.1)
    assert S.xattr_entry_bytes(4, b"overlay.opaque", b"y") == b"\x0e\x04\x01\x00overlay.opaquey\0"


def test_checksum_matches_mkfs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hi")
    img = tmp_path / "img"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", str(img), str(src)], check=True)
    raw = img.read_bytes()
    assert struct.unpack_from("<I", raw, 1028)[0] == S.sb_checksum(raw)
    sb = S.Superblock.unpack(raw, 1024)
    assert sb.magic == S.MAGIC and sb.pack() == raw[1024:1152]


def test_inspect(tmp_path: Path) -> None:
    from tests.erofs.test_roundtrip import edge_tree, _write
    from tests.erofs.helpers import Spool

    spool = Spool(tmp_path / "spool")
    _write(edge_tree(spool), tmp_path / "img")
    s = inspect_path(str(tmp_path / "img"))
    json.dumps(s)
    assert s["superblock"]["feature_incompat"] == ["chunked_file"]
    assert s["tree"]["kinds"]["fifo"] == 1 and s["tree"]["regular_files_with_inline_tail"] == 0
    text = format_summary(s)
    assert "EROFS image" in text and "chunk_based" in text
    spool.close()


def test_verify_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bdserver.erofs.inspect import main, verify
    from bdserver.erofs.reader import ErofsImage
    from tests.erofs.helpers import Spool
    from tests.erofs.test_roundtrip import _write, edge_tree

    spool = Spool(tmp_path / "spool")
    root = edge_tree(spool)
    img = tmp_path / "img"
    _write(root, img)
    with ErofsImage.open(img) as e:
        v = verify(e)
    stored = sum(s.length for _, n in root.walk() if n.data is not None for s in n.data.segments)  # type: ignore[attr-defined]
    # every stored byte is read back once; holes are not read
    assert stored <= v["bytes_read"] < stored + 64 * 4096 * 40
    assert main([str(img), "--json", "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"]["inodes"] == v["inodes"]
    raw = img.read_bytes()
    (tmp_path / "cut").write_bytes(raw[: len(raw) - 8192])
    assert main([str(tmp_path / "cut"), "--verify"]) == 3
    spool.close()
