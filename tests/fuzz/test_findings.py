"""Regression tests for what fuzzing found (tests/fuzz/FINDINGS.md): each input once escaped a
parser as an untyped exception; now it is a FormatError."""

from __future__ import annotations

import pytest

from bdserver.errors import FormatError
from bdserver.oci.model import parse_manifest

DIGEST = "sha256:" + "0" * 64
DESC = '{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "%s", "size": 1%s}'


@pytest.mark.parametrize("doc", [
    # 2: a descriptor's urls not a list (TypeError from tuple(5)), in a layer and in a subject
    '{"schemaVersion": 2, "config": %s, "layers": [%s]}' % (DESC % (DIGEST, ""), DESC % (DIGEST, ', "urls": 5')),
    '{"schemaVersion": 2, "config": %s, "layers": [], "subject": %s}' % (DESC % (DIGEST, ""),
                                                                         DESC % (DIGEST, ', "urls": true')),
    # 3: a platform's os.features not a list
    '{"schemaVersion": 2, "manifests": [%s]}' % (DESC % (DIGEST, ', "platform": {"os": "linux", '
                                                          '"architecture": "amd64", "os.features": 5}')),
    # 4: JSON nested deeper than the interpreter's recursion limit (RecursionError)
    '{"schemaVersion": 2, "x": %s}' % ("[" * 100_000 + "]" * 100_000),
], ids=["urls-in-layer", "urls-in-subject", "os.features", "deep-json"])
def test_manifest_finding_is_a_format_error(doc: str) -> None:
    with pytest.raises(FormatError):
        parse_manifest(doc.encode())
