"""Decoder models built from jaxattn layers, and Hugging Face checkpoint import/export."""
