"""The command line: parse, check, build, run, map errors to exit codes."""
