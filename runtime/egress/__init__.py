"""Network grants, enforced: a per-invocation internal network and filtering proxy (see policy/network.py)."""
