"""Settings and model discovery: the command line, presets and sources become one frozen
RouterConfig and a set of ModelSpecs. Imports nothing else of llamarouter but errors."""
