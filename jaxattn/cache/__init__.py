"""jaxattn.cache (see DESIGN.md)."""
