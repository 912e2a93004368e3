"""edgelora: the CLI and client; edgelora.v1 holds stubs generated from proto/ (never edited)."""
