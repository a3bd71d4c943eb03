"""jaxattn.convert (see DESIGN.md)."""
