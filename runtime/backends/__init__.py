"""Sandbox engines behind one narrow Protocol (``base.Backend``)."""
