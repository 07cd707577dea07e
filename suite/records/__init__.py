"""Records: the schema, the append-only JSON Lines store and its reader."""
