"""Bank transfer: money debited in one bank and credited in another, over RabbitMQ commands.

``saga.py`` holds the definition (``debit`` in bank A, undone by ``reverse_debit``, then
``credit`` in bank B); ``bank.py`` is a bank: a :class:`~sagaway.participant.Participant`
taking commands from its queue, with its own database and a small FastAPI app to read
balances; ``transfers.py`` is the service that runs the saga (``POST /transfers``).
"""
