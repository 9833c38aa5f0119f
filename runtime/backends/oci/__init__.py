"""The daemonless OCI backend: each sandbox is one ``runc run`` on a per-call bundle, no engine in between."""
