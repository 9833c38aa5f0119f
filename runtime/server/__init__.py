"""gRPC edge: proto <-> model, error -> status table, app wiring. Generated code stops here."""
