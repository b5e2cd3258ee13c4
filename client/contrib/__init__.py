"""Integrations with other libraries, each an optional extra:
:mod:`pybroker.contrib.kombu` (Celery, ``pip install pybroker[celery]``) and
:mod:`pybroker.contrib.dramatiq` (``pip install pybroker[dramatiq]``)."""
