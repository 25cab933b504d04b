"""Thin Ray stages (read -> cpldm_core -> write), storage, and the ``cpldm`` command line."""
