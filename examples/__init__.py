"""Three example systems built with sagaway, each a few real services with their own database.

* :mod:`examples.ecommerce`: inventory, payment and shipping over HTTP, an order service
  that runs the saga (``POST /orders``).
* :mod:`examples.travel_booking`: flight, hotel and car booked in parallel over HTTP.
* :mod:`examples.bank_transfer`: two banks over RabbitMQ commands.

Run one with ``sagaway demo ecommerce|travel|bank`` from a checkout; each package's README
shows how to start its services by hand.
"""
