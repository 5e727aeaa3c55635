"""OCI: references, media types, manifests, layouts, the registry client, referrers and trust.

Entry points (details in each module):

* ``reference.parse_reference(s) -> Reference`` (``HOST[:PORT]/REPO[:TAG|@DIGEST]``, ``oci:PATH[:TAG]``).
* ``model``: ``Descriptor``, ``Manifest``, ``Index``, ``Platform``, ``parse_manifest``, ``canonical_json``,
  ``select_platform``, ``host_platform``.
* ``store.ImageStore`` (protocol) and ``store.open_store(ref) -> ImageStore`` (layout or registry repo).
* ``layout.OCILayout(path, create=True)``: an OCI image layout directory as an ImageStore.
* ``registry.RegistryClient(host, ...)`` / ``.shared(host)`` / ``.repository(name) -> RegistryRepository``
  (ImageStore + ``read_range``, ``mount_blob``, ``referrers_api``, ``for_writing``).
* ``referrers``: ``list_referrers``, ``add_referrer``, ``update_referrers_tag``, ``referrers_tag``.
* ``trust``: ``TrustPolicy``, ``discover_lazy_image(store, ref, policy) -> (source, lazy)``.
* ``copy.copy_image(src, dst, ref, dst_tag)``: byte-exact copy of an image tree between stores.
* ``signing``: ``sign_lazy_image`` / ``signed_by`` (cosign-format signatures, checked with ``cryptography``).
"""
