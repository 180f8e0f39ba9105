"""The `taskcast` command and what only it needs: process composition, embedded servers for
`taskcast dev`, and the terminal client (`create`, `watch`)."""
