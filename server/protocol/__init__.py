"""The protocol core: pure code with no I/O. `frames` decodes and checks every client frame
at the edge (PROTOCOL.md, Limits); what lies behind it never re-validates."""
