"""hierprior."""
