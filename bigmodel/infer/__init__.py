"""Inference: sampling from a decoder."""
