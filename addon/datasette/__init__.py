"""The Datasette side: the plugin (SQL functions, HTTP API) and the metadata (dashboard, canned queries)."""
