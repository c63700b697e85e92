"""The ``gdn-dump`` command line: parses, calls the library, renders. Nothing imports it."""
