"""cit-server: routes image+instruction requests to task adapters and generates with one shared backbone."""
