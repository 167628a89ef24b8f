"""One module per CRM behind the small Protocol in :mod:`connectors.base`."""
