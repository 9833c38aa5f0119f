"""Pure policy: isolation profiles and their compilation into container plans.

Nothing here imports docker, grpc, psutil or the OpenTelemetry SDK; it is data in, data out.
"""
