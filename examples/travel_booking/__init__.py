"""Travel booking: a flight, a hotel and a car booked in parallel; if one fails, the others
are cancelled.

``saga.py`` holds the definition (``book_flight``, ``book_hotel`` and ``rent_car`` in one
parallel stage); ``services.py`` the three FastAPI booking services, each with its own
database; ``agency.py`` the service that runs the saga (``POST /trips``).
"""
