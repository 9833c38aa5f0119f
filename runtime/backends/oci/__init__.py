"""The daemonless OCI backend: each sandbox is one ``runc run`` on a per-call bundle, no engine in between.

``backend.py`` (``OciBackend``, ``OciSandbox``), ``bundle.py`` (spec -> config.json, pure), ``cgroups.py``
(per-sandbox parent cgroups), ``rootfs.py`` (the unpacked image store), ``stream.py`` (stdio pipes).
"""

from toolcell.backends.oci.backend import DEFAULT_STATE, OciBackend, OciSandbox
from toolcell.backends.oci.rootfs import DEFAULT_STORE, RootfsStore, unpack_docker_image, unpack_docker_image_async

__all__ = ["DEFAULT_STATE", "DEFAULT_STORE", "OciBackend", "OciSandbox", "RootfsStore", "unpack_docker_image",
           "unpack_docker_image_async"]
