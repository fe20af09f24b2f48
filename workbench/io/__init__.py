"""Readers and writers for the workbench's inputs and outputs."""
