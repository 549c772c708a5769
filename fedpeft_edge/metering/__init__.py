"""Metering: bytes at the wire, device resources, and the run report."""
