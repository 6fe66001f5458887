"""Deployment on real devices with Flower: the simulation's client and server steps on a
SuperLink and SuperNodes (TLS, SuperNode authentication).

``fedjax-fm deploy run|keygen`` and Flower's own ``flower-superlink``,
``flower-supernode`` and ``flwr supernode register`` (see ``docs/deploy.md``). Flower is
an optional dependency (``pip install -e ".[deploy]"``), so the modules that import it
are not imported here; use::

    from fedjax_fm.deploy.apps import server_app, client_app      # the Flower App (flower-app/)
    from fedjax_fm.deploy.server import DeployStrategy, serve
    from fedjax_fm.deploy.client import DeviceClient
    from fedjax_fm.deploy.wire import encode_tree, decode_tree

``fedjax_fm.deploy.device_data.DeviceData`` and ``fedjax_fm.deploy.assemble`` need no Flower.
"""
