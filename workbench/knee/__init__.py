"""Knee MRI analysis pipeline."""
