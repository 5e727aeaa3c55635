"""A lazy image whose merged metadata was tampered with (and re-digested, as any writer to the
repository can) is refused by `open_lazy_image` before a device exists: the kernel never sees it."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from bdserver.convert.image import convert_image
from bdserver.erofs import structs as S
from bdserver.erofs.reader import ErofsImage
from bdserver.errors import FormatError
from bdserver.oci.layout import OCILayout
from bdserver.oci.model import Manifest, parse_manifest
from bdserver.vdev.pools import FetchPools
from bdserver.vdev.lazyimage import layout_fetcher, open_lazy_image
from tests.fixtures.layers import build_oci_layout
from tests.fixtures.tarwriter import TarWriter


def _layers(tmp: Path) -> list[Path]:
    out = []
    for i, files in enumerate(({"etc/hostname": b"lazy\n", "bin/tool": b"\x7fELF" * 5000}, {"etc/motd": b"hi\n"})):
        w = TarWriter()
        for name, data in files.items():
            w.add(name, b"0", data)
        p = tmp / f"{i}.tar"
        p.write_bytes(w.close())
        out.append(p)
    return out


def test_tampered_merged_metadata_never_becomes_a_device(tmp_path: Path) -> None:
    src = OCILayout(build_oci_layout(_layers(tmp_path), tmp_path / "src"))
    dest = OCILayout(tmp_path / "dest")
    res = convert_image(src, "latest", dest, "lazy")
    m = parse_manifest(res.manifest)
    assert isinstance(m, Manifest)
    fetch = layout_fetcher(str(dest.path / "blobs"))
    open_lazy_image(m, fetch, None, pools=FetchPools()).close()  # the lazy image as converted opens

    meta_desc = m.layers[-1]
    meta = bytearray(dest.blob_path(meta_desc.digest).read_bytes())
    img = ErofsImage(lambda off, n, b=bytes(meta): b[off : off + n])
    tool = img.lookup("/bin/tool")
    # point /bin/tool's data past the end of the device (without the check the device would be
    # served and mounted; the kernel would find out only when the file is read)
    assert tool.layout == S.LAYOUT_CHUNK_BASED
    struct.pack_into("<HHI", meta, (tool.data_off + 7) & ~7, 0, 0, img.devices[1].mapped_blkaddr + img.devices[1].blocks)
    struct.pack_into("<I", meta, 1028, S.sb_checksum(meta))
    digest = dest.put_blob_bytes(bytes(meta))
    evil = dataclasses.replace(m, layers=[*m.layers[:-1], dataclasses.replace(meta_desc, digest=digest)])

    with pytest.raises(FormatError, match=rf"merged metadata {digest}: inode \d+ \(/bin/tool\): chunk 0"):
        open_lazy_image(evil, fetch, None, pools=FetchPools())
