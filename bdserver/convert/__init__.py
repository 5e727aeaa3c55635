"""convert: image -> lazy EROFS image (and the node-side fallback building the same device).

Sources are tar images (each layer converted) or EROFS-native images (oci/nativeimage.py: each
layer already an EROFS image, fetched whole, verified and checked); both become layer images on
local disk and share the merge from there.

Modules (imports point down: image -> merge, layer -> tar -> tarheader -> tarstream):

* `tarstream`: magic-byte detection (tar / gzip / zstd), bounded decompression, the diff_id.
* `tarheader`: strict streaming header parser (ustar, GNU L/K and old sparse, PAX incl. GNU
  sparse 0.0/0.1/1.0, xattrs, ACLs, ns mtimes); FormatError on anything malformed.
* `tar`: `read_layer(stream) -> LayerTree` (tree + spool; OCI whiteouts -> overlayfs).
* `layer`: `convert_layer(stream, out_image, *, build_time=0, tmpdir=None, compress="none") -> LayerResult`
  (``compress="lz4"``: file data lz4-compressed inside EROFS, erofs/compress.py).
* `native`: `merge_layer(read_at, nbytes, tag, name=)` (check an EROFS layer from elsewhere, then
  its tree for the merge), `fetch_layer_image(open_blob, layer, out)` (a native layer whole).
* `merge`: `merge_layers(layers, offsets=None) -> Inode`, `build_merged_meta(layers, out) -> MergedMeta`
  (layers: `MergeLayer(root, blocks, tag, implicit)`, roots from `ErofsImage.to_tree()`).
* `image`: `convert_image(src, src_ref, dest, dest_tag=None, *, tmpdir=None, compress="none") -> ConvertResult`,
  `convert_layers_to_device(src, ref, workdir) -> LocalDevice`,
  `convert_tar_layers(openers, workdir, *, expected_diff_ids=None, compress="none") -> LocalDevice`,
  `layer_images` / `merge_layers_of` / `local_device` (the shared steps).
* `limits`: `ConvertLimits`, every cap on what a layer may make the converter hold or write.
* `isolated`: `convert_isolated(store_ref, ref, workdir, ...)`, the on-node conversion in a child
  under memory, file-size and CPU limits (`ResourceLimitError` names the one that stopped it).
* `publish` (registry engineer): pushes a converted layout as a referrer or to DEST.

`bdserver convert SRC [DEST]` = `convert_image(open_store(SRC), SRC.tag or digest, scratch
OCILayout, None, tmpdir=...)` then `publish(scratch, result.digest, source=SRC, dest=DEST)`.
"""
