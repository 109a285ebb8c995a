"""Model DB and (later) checkpoint retention: what trainbox has produced and what it keeps."""
