"""Blind pairwise annotation in the browser, as in the LIMA paper's human study (its figure 1).

`study` reads the two systems' answer files, `assignment` decides who sees which item in which
order, `log` keeps every choice in the output file, and `server` is the web app (a static page
under `static/` and a small JSON API). `lima-annotate` (lima_jax/cli/annotate.py) runs it.
"""
