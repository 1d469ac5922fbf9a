"""``ctsearch serve``: the search service (Ray Serve) and its web page.

- :mod:`ctsearch.serve.shards`: shard groups and the exact merge of their top-k (no Ray);
- :mod:`ctsearch.serve.sources`: display windows, thumbnails, source volumes, DICOM SOP UIDs, uploads;
- :mod:`ctsearch.serve.service`: queries, search, cross-exam, thumbnails, RELAX pairs (no Ray);
- :mod:`ctsearch.serve.api`: the HTTP API and the page (FastAPI), bearer-token guard;
- :mod:`ctsearch.serve.deploy`: the Ray Serve deployments, ``start`` and ``stop``;
- ``static/``: the page (plain HTML, CSS and JavaScript; nothing is fetched from elsewhere).

docs/serve.md documents the API with curl examples.
"""
