"""Training text: corpora in, fixed-length token batches out; the built-in corpora."""
