"""Media types and annotation keys that bdserver reads or writes.

Kept in one place so that producers (convert/) and consumers (vdev/, trust) cannot drift apart.
"""

from __future__ import annotations

# OCI image-spec v1.1
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_TAR_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_TAR_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

# Docker image manifest v2 schema 2
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_TAR_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER_TAR_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# EROFS image layer format (erofs/erofs-image-spec draft)
EROFS_LAYER = "application/vnd.erofs"
EROFS_LAYER_ZSTD = "application/vnd.erofs+zstd"
EROFS_CHUNK_INDEX = "application/vnd.erofs.chunk-index.v1"
# containerd's native EROFS layers (containerd 2.x: the EROFS differ and snapshotter)
CONTAINERD_EROFS_LAYER = "application/vnd.erofs.layer.v1"
CONTAINERD_EROFS_LAYER_ZSTD = "application/vnd.erofs.layer.v1+zstd"

# bdserver's lazy image
LAZY_ARTIFACT_TYPE = "application/vnd.bdserver.lazy.v1"
# a start trace (blob/starttrace.py), a referrer of the lazy image it was recorded on
PREFETCH_ARTIFACT_TYPE = "application/vnd.bdserver.prefetch.v1"
PREFETCH_TRACE = "application/vnd.bdserver.prefetch.v1+json"

# cosign signatures (sigstore/cosign specs/SIGNATURE_SPEC.md; referrers as `--registry-referrers-mode=oci-1-1`)
COSIGN_SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ANN_COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# What we send as Accept on manifest GETs: distribution 2.8 answers 404 to OCI content without it.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))

TAR_LAYER_TYPES = (
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_LAYER_TAR_ZSTD,
    OCI_LAYER_NONDIST_TAR,
    OCI_LAYER_NONDIST_TAR_GZIP,
    OCI_LAYER_NONDIST_TAR_ZSTD,
    DOCKER_LAYER_TAR_GZIP,
    DOCKER_LAYER_FOREIGN_TAR_GZIP,
    DOCKER_LAYER_TAR_ZSTD,
)
EROFS_LAYER_TYPES = (EROFS_LAYER, EROFS_LAYER_ZSTD)

# Annotations
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CREATED = "org.opencontainers.image.created"
ANN_EROFS_ROLE = "org.erofs.role"
ANN_CHUNK_INDEX_RANGE = "org.erofs.chunk-index.range"
ANN_CHUNK_INDEX_DIGEST = "org.erofs.chunk-index.digest"
ANN_UNCOMPRESSED_DIGEST = "org.erofs.uncompressed-digest"
ANN_CHUNK_INDEX_TARGET = "org.erofs.chunk-index.target"
ANN_BD_SOURCE = "org.bdserver.source"
ANN_BD_ROLE = "org.bdserver.role"
ANN_BD_MAPPED_BLKADDR = "org.bdserver.mapped-blkaddr"
ANN_BD_BLOCKS = "org.bdserver.blocks"

# The empty JSON blob `{}` (image-spec v1.1); must still be uploaded to registries that check blobs.
EMPTY_JSON = b"{}"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def is_manifest(media_type: str | None) -> bool:
    return media_type in MANIFEST_TYPES


def is_index(media_type: str | None) -> bool:
    return media_type in INDEX_TYPES
