"""Deployment on real devices with Flower: the simulation's client and server steps over gRPC.

``fedjax-fm deploy server|client`` (see ``docs/deploy.md``). Flower is an optional
dependency (``pip install -e ".[deploy]"``), so the modules that import it are not
imported here; use::

    from fedjax_fm.deploy.server import DeployStrategy, run_server
    from fedjax_fm.deploy.client import DeviceClient, run_client
    from fedjax_fm.deploy.wire import encode_tree, decode_tree

``fedjax_fm.deploy.device_data.DeviceData`` and ``fedjax_fm.deploy.assemble`` need no Flower.
"""
