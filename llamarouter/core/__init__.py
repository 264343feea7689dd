"""The supervision core: states, the pure scheduler, one owner task per model, the
supervisor loop, the launcher (the only module touching the OS) and memory accounting.
Imports settings and errors; never the HTTP side."""
