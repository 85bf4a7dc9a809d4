"""HTTP clients of an imagegate server (the `imagegate batch` commands).

Nothing here is imported by the API server or the workers: a client speaks only the public API.
"""
