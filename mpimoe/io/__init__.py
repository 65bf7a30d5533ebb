"""Inputs, outputs and safe file writing (see each module)."""
