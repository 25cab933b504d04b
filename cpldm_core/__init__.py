"""The science of cpldm as pure functions and torch modules (no Ray, no storage I/O)."""
__version__ = "0.1.0"
