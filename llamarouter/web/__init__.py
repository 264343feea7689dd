"""The HTTP side: the aiohttp app, the router's own endpoints, the relay to children,
metrics and the web UIs. Imports core and settings."""
