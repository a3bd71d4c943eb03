"""jaxattn.layers (see DESIGN.md)."""
