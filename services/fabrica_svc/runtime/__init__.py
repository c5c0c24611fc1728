"""The shared runtime every Fabrica service is built with."""
