"""The `jaxinfer` command: the top of the import graph."""
