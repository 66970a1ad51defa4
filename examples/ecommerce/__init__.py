"""E-commerce: an order saga across inventory, payment and shipping services over HTTP.

``saga.py`` holds the definition (``reserve_inventory`` → ``charge_payment`` →
``arrange_shipping``); ``inventory.py``, ``payment.py`` and ``shipping.py`` are FastAPI services,
each with its own database; ``orders.py`` is the order service that runs the saga
(``POST /orders``, ``GET /orders/{id}``). See README.md in this folder.
"""
