"""Integrations with training code: `tokenhsi` (a TokenHSI checkout's run.py and training yaml) and
`tokenhsi_patch` (the `relay tokenhsi patch` command). Trainer side: Python 3.8, standard library,
pyzmq and msgpack only."""
