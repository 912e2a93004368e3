"""edgelora: the CLI entry point; edgelora.v1 holds the stubs generated from proto/ (never edited)."""
