"""The host agent: the daemon that runs on a GPU machine and takes jobs from the server."""
