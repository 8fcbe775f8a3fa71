"""Live feeds read from the database: a job subtree's history, one worker's log, the fleet's
status changes.

The feeds read the database, never process memory, so an event that arises in any process
(another API worker, an engine on another host) is delivered. Each poll is one short read
transaction; between polls a feed sleeps until its app's wake-up hub wakes it (wakeups.py).
Resume ids are cursors (cursor.py); on PostgreSQL rows are delivered only up to a horizon that
no slower transaction can still write below (horizon.py). The feeds yield plain messages; the
Server-Sent Events wire format is the API's (orchestrator/api/sse.py).

Modules: cursor, horizon, wakeups, queries (every statement), job_feed, log_feed, fleet_feed.
"""
