"""The one place a backend is built from the configuration (``engine.kind``): serve, doctor and bench alike.

Each backend module is imported only when it is the one configured: an ``oci`` supervisor never loads
the Docker SDK, and a ``docker`` one never looks for an OCI runtime binary.
"""

from __future__ import annotations

from toolcell.backends.base import Backend
from toolcell.errors import ConfigError
from toolcell.settings import Config


def open_backend(config: Config) -> Backend:
    """The backend ``config.engine`` names, constructed (no I/O yet: ``ping`` tells whether it works)."""
    engine = config.engine
    if engine.kind == "docker":
        from toolcell.backends.docker import DockerBackend

        docker: Backend = DockerBackend(engine.docker_host, channel_dir=engine.pool_channel_dir,
                                        egress=config.egress, proxy_seccomp_json=config.seccomp["default"].json_text,
                                        cgroup_root=engine.cgroup_root)
        return docker
    if engine.kind == "oci":
        from toolcell.backends.oci import OciBackend

        oci: Backend = OciBackend(runtime_path=engine.oci_runtime, store_dir=engine.oci_rootfs_dir,
                                  state_dir=engine.oci_state_dir)
        return oci
    raise ConfigError(f"unknown engine kind {engine.kind!r} (docker or oci)", key="engine.kind")
