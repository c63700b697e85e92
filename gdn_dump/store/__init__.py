"""The Zarr store: where it lives, its layout, creating it, writing rows, the ledger, verify."""
