"""Helpers every tier shares: throwaway services, the fake upstreams (real HTTP servers on
127.0.0.1), the imagegate processes under test, and the client flows the tests repeat."""
