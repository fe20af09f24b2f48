"""The workbench: notebook-driven knee MRI analysis and multi-view 3D reconstruction."""

__version__ = "0.1.0"
