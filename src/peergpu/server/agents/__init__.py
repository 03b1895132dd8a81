"""Agent sockets: the hub that holds them on this replica and the bus wiring that lets any
replica reach any host."""
