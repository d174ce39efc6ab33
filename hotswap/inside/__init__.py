"""Code that runs inside uWSGI's processes: in every master and worker of every generation.

- wsgi        the middleware an app wraps itself in: health path, smoke checks, headers
- entry       `module = hotswap.inside.entry:application`: imports the app `hotswap-app`
              names and wraps it (a project set up by `hotswap init`)
- live_store  the store's app side: the open store, switched in place by `hotswap refresh`
- app_metrics the per-generation request metrics (`hotswap-metrics`), imported only then
- handover    the accepting hook (`python -m hotswap.inside.handover`): tells the old master
              to pause, commits, retires it

The rules of this side: import fast (it runs at every worker's start), never block on the
operator, never take the service down (a failure here fails one release, not the serving
one). It imports only this folder, hotswap.protocol and hotswap.system, never click or the
reload machine: tests/test_layout.py holds it to that.
"""
