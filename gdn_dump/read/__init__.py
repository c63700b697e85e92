"""Reading a store back without torch or a model: ``open_store``, xarray, batches, figures."""
