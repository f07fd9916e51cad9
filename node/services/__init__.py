"""Service functions: the one implementation behind the CLI's admin commands and the REST API."""
