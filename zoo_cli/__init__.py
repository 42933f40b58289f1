"""The `zoo` command line: parses, calls the library, renders. No training logic lives here."""
