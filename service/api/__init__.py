"""HTTP routers: one per resource, thin: read the request, call the core, return a schema."""
