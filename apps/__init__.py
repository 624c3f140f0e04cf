"""The `fpdm` command line."""
