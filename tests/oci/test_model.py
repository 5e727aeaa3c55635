import json

import pytest

from bdserver.errors import FormatError, NotFoundError
from bdserver.oci import mediatypes as mt
from bdserver.oci.model import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    canonical_json,
    host_platform,
    parse_manifest,
    select_platform,
)


def d(n: int, mtype: str = mt.OCI_LAYER_TAR_GZIP, **kw) -> Descriptor:
    return Descriptor(media_type=mtype, digest="sha256:" + f"{n:064x}", size=n, **kw)


def test_manifest_roundtrip_canonical_and_unknown_fields_kept():
    m = Manifest(
        config=d(1, mt.OCI_CONFIG),
        layers=[d(2, annotations={"b": "2", "a": "1"}), d(3, mt.EROFS_LAYER_ZSTD)],
        subject=d(4, mt.OCI_MANIFEST),
        artifact_type=mt.LAZY_ARTIFACT_TYPE,
        annotations={mt.ANN_BD_SOURCE: d(4).digest},
        extra={"x-future": [1, 2]},
    )
    b = m.to_bytes()
    assert b == m.to_bytes()
    assert b"\n" not in b and b.index(b'"a"') < b.index(b'"b"')
    m2 = parse_manifest(b)
    assert isinstance(m2, Manifest)
    assert m2.to_bytes() == b
    assert m2.extra == {"x-future": [1, 2]}
    assert m2.subject.digest == d(4).digest
    desc = m2.descriptor()
    assert desc.artifact_type == mt.LAZY_ARTIFACT_TYPE and desc.size == len(b)


def test_docker_schema2_and_list():
    dm = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST,
        "config": d(1, mt.DOCKER_CONFIG).to_dict(),
        "layers": [d(2, mt.DOCKER_LAYER_TAR_GZIP).to_dict()],
    }
    m = parse_manifest(json.dumps(dm).encode())
    assert isinstance(m, Manifest) and m.media_type == mt.DOCKER_MANIFEST
    dl = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST_LIST,
        "manifests": [d(5, mt.DOCKER_MANIFEST, platform=Platform("linux", "amd64")).to_dict()],
    }
    i = parse_manifest(json.dumps(dl).encode())
    assert isinstance(i, Index) and i.media_type == mt.DOCKER_MANIFEST_LIST


def test_manifest_without_media_type_uses_hint_or_shape():
    body = {"schemaVersion": 2, "manifests": []}
    assert isinstance(parse_manifest(json.dumps(body).encode()), Index)
    body = {"schemaVersion": 2, "config": d(1, mt.OCI_CONFIG).to_dict(), "layers": []}
    assert parse_manifest(json.dumps(body).encode()).media_type == mt.OCI_MANIFEST


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"schemaVersion":1,"name":"x"}',
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}',
        b'{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}',
        b'{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:' + b"0" * 64 + b'","size":-1},"layers":[]}',
    ],
)
def test_bad_manifests(raw):
    with pytest.raises(FormatError):
        parse_manifest(raw)


def test_select_platform():
    ms = [
        d(1, mt.OCI_MANIFEST, platform=Platform("linux", "arm", "v7")),
        d(2, mt.OCI_MANIFEST, platform=Platform("linux", "arm64")),
        d(3, mt.OCI_MANIFEST, platform=Platform("linux", "amd64")),
        d(4, mt.OCI_MANIFEST, platform=Platform("unknown", "unknown"),
          annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        d(5, mt.OCI_MANIFEST, platform=Platform("linux", "arm64", "v8")),
    ]
    assert select_platform(ms, Platform("linux", "amd64")).digest == d(3).digest
    assert select_platform(ms, Platform("linux", "arm64", "v8")).digest == d(5).digest
    assert select_platform(ms[:2], Platform("linux", "arm64", "v8")).digest == d(2).digest
    assert select_platform(ms, Platform("linux", "arm", "v7")).digest == d(1).digest
    with pytest.raises(NotFoundError, match="linux/arm64/v8"):
        select_platform(ms[1:], Platform("linux", "s390x"))
    hp = host_platform()
    assert hp.os == "linux" and hp.architecture


def test_canonical_json_is_deterministic_utf8():
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
